"""Sharded distillation (``--fsdp``, FSDP2 on gloo): the same training as one process and as data
parallel, the output gathered one tensor at a time, and what a sharded run refuses."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli import app
from m4v_convert import load_converted
from m4v_convert.backbones.wan.testing import make_tiny_wan, save_tiny_wan
from m4v_convert.io.safetensors_io import write_streamed
from test_distill import (ROOT, _args, _cheap_flops_report, _convert, _env, _log, _losses, _recipe,  # noqa: F401
                          runner)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_wan(make_tiny_wan(seed=1), tmp_path_factory.mktemp("ckpt") / "wan")


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    return _recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml")


def _refused(res, *expect: str) -> None:
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in res.output and res.output.count("error:") == 1, res.output
    for part in expect:
        assert part in text, text


def _kill_group_at(proc: subprocess.Popen, run: Path, stage: str, step: int, found: dict) -> None:
    """SIGKILL ``proc`` and every process it launched once ``run`` has checkpointed ``stage`` at
    ``step`` or later, mid-stage (as a machine failure would); ``found``: the state it left."""
    import psutil  # accelerate's dependency

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            state = json.loads((run / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
        if state.get("stage") == stage and state.get("step", 0) >= step and not state.get("stage_done"):
            parent = psutil.Process(proc.pid)
            for p in [parent, *parent.children(recursive=True)]:  # torchrun's workers are in their own sessions
                p.kill()
            break
        time.sleep(0.005)
    found["exit"] = proc.wait(30)
    found["state"] = json.loads((run / "state.json").read_text())


def test_sharded_run_equals_one_process_and_data_parallel_and_resumes_after_sigkill(ckpt, recipe_file, tmp_path):
    """2 processes with FSDP2 (each holding half of every block) train as one process on the combined
    batch and as 2-process data parallel: the same losses every step and the same weights out, with
    --train all (the student's own copies of shared weights), layer groups and gradient checkpointing.
    Killed (all its processes) mid-stage, the sharded run resumes from each process's shards of the
    weights and AdamW states to the uninterrupted run's weights and losses, bit for bit."""
    common = ["--stages", "1,2", "--distill-steps", "3", "--stage2-steps", "16", "--train", "all", "--layers", "all",
              "--layer-groups", "2", "--grad-checkpointing", "--checkpoint-every", "3", "--mixed-precision", "no"]
    sharded = ["--batch-size", "1", "--num-processes", "2", "--fsdp"]
    run, found = tmp_path / "run", {}
    killed = subprocess.Popen([sys.executable, str(ROOT / "cli.py")] +
                              _args(ckpt, tmp_path / "out", recipe_file, *common, *sharded, "--run-dir", str(run)),
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killer = threading.Thread(target=_kill_group_at, args=(killed, run, "stage2.group2", 3, found))
    killer.start()
    runs = {"fsdp": sharded, "dp": ["--batch-size", "1", "--num-processes", "2"], "one": ["--batch-size", "2"]}
    try:
        for name, extra in runs.items():
            res = _convert(ckpt, tmp_path / name, recipe_file, *common, *extra, "--run-dir", str(tmp_path / f"{name}.run"))
            assert res.exit_code == 0, res.output
    finally:
        killer.join()
    logs = {name: _log(tmp_path / name) for name in runs}
    for stage in ("stage1.group1", "stage1.group2", "stage2.group1", "stage2.group2"):
        assert len(_losses(logs["fsdp"], stage)) > 0
        for other in ("one", "dp"):
            torch.testing.assert_close(torch.tensor(_losses(logs["fsdp"], stage)),
                                       torch.tensor(_losses(logs[other], stage)), rtol=1e-4, atol=1e-6)
    weights = {name: load_file(str(tmp_path / name / "diffusion_pytorch_model.safetensors")) for name in runs}
    teacher = load_file(str(ckpt / "diffusion_pytorch_model.safetensors"))
    assert weights["fsdp"].keys() == weights["one"].keys()
    # --train all moved weights the student shares with the teacher in memory: the gathered output has them
    assert any(not torch.equal(weights["fsdp"][k], teacher[k]) for k in teacher if k in weights["fsdp"])
    for k in weights["one"]:  # Adam normalizes tiny gradients: a little more than float rounding
        torch.testing.assert_close(weights["fsdp"][k], weights["one"][k], rtol=1e-3, atol=2e-4)
        torch.testing.assert_close(weights["fsdp"][k], weights["dp"][k], rtol=1e-3, atol=2e-4)
    # the output loads as every converted folder does, with the weights written
    state = load_converted(tmp_path / "fsdp").state_dict()
    assert all(torch.equal(state[k], weights["fsdp"][k]) for k in weights["fsdp"])
    assert json.loads((tmp_path / "fsdp" / "conversion.json").read_text())["distill"]["processes"] == 2

    # the killed run: its checkpoint names the folder with both processes' shards
    state = found["state"]
    assert found["exit"] == -signal.SIGKILL and state["stage"] == "stage2.group2" and 3 <= state["step"] < 16
    assert not (tmp_path / "out").exists()
    assert len(list((run / state["shards"]).glob("*.distcp"))) == 2
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # resuming it otherwise: one error line before anything is launched, the run folder untouched
    _refused(_convert(ckpt, tmp_path / "other", recipe_file, *common, "--batch-size", "1", "--num-processes", "2",
                      "--resume", str(run)),
             "that run was sharded (--fsdp) and had 2 process(es), this one is not and has 2",
             "resume it with --fsdp and --num-processes 2")
    _refused(_convert(ckpt, tmp_path / "other", recipe_file, *common, "--batch-size", "1", "--num-processes", "3",
                      "--fsdp", "--resume", str(run)), "this one is and has 3", "resume it with --fsdp and --num-processes 2")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "other").exists()

    resumed = _convert(ckpt, tmp_path / "out", recipe_file, *common, *sharded, "--resume", str(run))
    assert resumed.exit_code == 0, resumed.output
    log = _log(tmp_path / "out")
    assert [r["step"] for r in log if r.get("event") == "resume"] == [state["step"]]
    for stage in ("stage1.group1", "stage1.group2", "stage2.group1", "stage2.group2"):
        assert _losses(log, stage) == _losses(logs["fsdp"], stage)
    out = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    assert out.keys() == weights["fsdp"].keys() and all(torch.equal(out[k], weights["fsdp"][k]) for k in out)
    # the run folder keeps only its last checkpoint's shards
    assert [p.name for p in run.iterdir() if p.is_dir()] == [json.loads((run / "state.json").read_text())["shards"]]


def test_a_sharded_pass_gathers_one_block_at_a_time(tmp_path):
    """Sharded together, a teacher block and its student block form one FSDP2 group; a pass of the
    teacher alone, and of the student alone (forward and backward), has at most the block it runs
    and the one fetched ahead gathered, never every block at once, and computes what the unsharded
    models compute (oracle: the models before sharding)."""
    import copy

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from m4v_convert.backbones.wan.distill import WanDistillAdapter
    from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
    from m4v_convert.backbones.wan.testing import tiny_wan_inputs
    from m4v_convert.distill.distributed import DistContext
    from m4v_convert.distill.sharding import shard

    layers = [0, 1, 2, 3, 4]
    teacher = make_tiny_wan(seed=2, num_layers=len(layers)).requires_grad_(False)
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    student.convert_(layers, {"temporal_dim": 8, "temporal_heads": 2, "bc_norm": "across_groups"})
    batch = tiny_wan_inputs(teacher, batch=1, frames=2, height=8, width=8, text_len=6)
    whole_t, whole_s = copy.deepcopy(teacher), copy.deepcopy(student)
    expect_t = whole_t(**batch, return_dict=False)[0]
    expect_s = whole_s(**batch, return_dict=False)[0]
    expect_s.square().mean().backward()
    expect_grads = {n: p.grad for n, p in whole_s.named_parameters() if p.grad is not None}

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        blocks = WanDistillAdapter(layers=layers, patch_size=(1, 2, 2)).mmdim_blocks(student)
        shard(teacher, student, blocks, DistContext(world=1, fsdp=True), torch.device("cpu"), bf16=False)
        gathered: list[int] = []

        def count(module, args):  # blocks whose weights are gathered (not the sharded DTensors) when one runs
            gathered.append(sum(not isinstance(b.scale_shift_table, DTensor) for b in teacher.blocks))
        for model in (teacher, student):
            for b in model.blocks:
                b.register_forward_pre_hook(count)
        with torch.no_grad():
            got_t = teacher(**batch, return_dict=False)[0]
        teacher_pass, gathered[:] = list(gathered), []
        got_s = student(**batch, return_dict=False)[0]
        got_s.square().mean().backward()
        student_pass = list(gathered)
        grads = {n: p.grad.full_tensor() for n, p in student.named_parameters() if p.grad is not None}
    finally:
        dist.destroy_process_group()
    assert len(teacher_pass) == len(student_pass) == len(layers)
    assert max(teacher_pass) <= 2 and max(student_pass) <= 2, (teacher_pass, student_pass)
    torch.testing.assert_close(got_t, expect_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_s, expect_s, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expect_grads.keys() and len(grads) > 20
    for n in grads:
        torch.testing.assert_close(grads[n], expect_grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout,train", [("diffusers-sharded", "mmdim"), ("original", "all")])
def test_fsdp_reads_the_teacher_block_by_block_into_its_shards(tmp_path, recipe_file, monkeypatch, layout, train):
    """Under --fsdp the teacher is read one block at a time, each block sharded (with its student block,
    converted from it) before the next is read: when block i is read, the blocks before it are shards
    and those after it not read yet. The weights equal an unsharded run's whole load + conversion
    (oracle: load_teacher, the seed, make_student; --train all: the student's own copies)."""
    import dataclasses

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import m4v_convert.backbones.wan.load as wan_load
    from m4v_convert.backbones import registry
    from m4v_convert.distill.distributed import DistContext
    from m4v_convert.distill.params import own_parameters_, trainable_params
    from m4v_convert.distill.sharding import full_tensors
    from m4v_convert.jobs.convert import _load_sharded
    from m4v_convert.jobs.plan import ConvertFlags, load_for, plan_conversion

    path = save_tiny_wan(make_tiny_wan(seed=4, num_layers=3), tmp_path / "ckpt", layout=layout)
    flags = ConvertFlags(recipe=str(recipe_file), checkpoint=path, out=tmp_path / "out", layers="0,2", train=train,
                         stages="1,2")
    recipe, entry = load_for(flags)
    plan = plan_conversion(flags, recipe, entry)
    steps = registry.resolve(entry.conversion)(plan)
    steps.check_before_loading()
    teacher = steps.load_teacher()
    torch.manual_seed(flags.seed)
    student = steps.make_student(teacher, [0, 2])
    if train == "all":
        own_parameters_(student, trainable_params(student, "all", {}), teacher)
    expect_t, expect_s = dict(teacher.state_dict()), dict(student.state_dict())

    seen = []
    read = wan_load.load_wan_part_

    def load_part(model, ckpt, block, **kw):  # the state of every teacher block as one more is read
        seen.append((block, ["shard" if isinstance(b.scale_shift_table, DTensor) else
                             "unread" if b.scale_shift_table.is_meta else "whole" for b in model.blocks]))
        return read(model, ckpt, block, **kw)
    monkeypatch.setattr(wan_load, "load_wan_part_", load_part)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plan = dataclasses.replace(plan, dist=DistContext(world=1, fsdp=True))
        teacher, student, layers = _load_sharded(plan, steps)
        got_t, got_s = dict(full_tensors(teacher)), dict(full_tensors(student))
        shared = {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
    finally:
        dist.destroy_process_group()
    assert layers == [0, 2]
    assert seen == [(None, ["unread"] * 3), (0, ["unread"] * 3), (1, ["shard", "unread", "unread"]),
                    (2, ["shard", "shard", "unread"])]
    assert got_t.keys() == expect_t.keys() and got_s.keys() == expect_s.keys()
    for got, expect in ((got_t, expect_t), (got_s, expect_s)):
        for k in expect:
            assert got[k].dtype == expect[k].dtype and torch.equal(got[k], expect[k]), k
    # the student shares what it does not train with the teacher (--train all: nothing)
    assert (len(shared) > 20) == (train == "mmdim")


def test_sharded_stage1_steps_each_layer_as_soon_as_its_backward_is_done(tmp_path):
    """Stage 1 feeds each MM-DiM the teacher's recorded input, which needs no gradient; FSDP2 reduces a
    block's gradients when the backward reaches the block's input, so without an input gradient every
    layer's whole gradients waited for the end of the backward (measured: 1.4 GB on Wan2.1-1.3B). Each
    layer's sharded gradient now arrives (and its unit steps) before the backward of the layer below it
    starts; the trained weights equal one unsharded process's (oracle: the same stage on copies)."""
    import copy

    import torch.distributed as dist

    from m4v_convert.backbones.wan.distill import WanDistillAdapter
    from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
    from m4v_convert.backbones.wan.testing import tiny_wan_inputs
    from m4v_convert.distill.distributed import DistContext
    from m4v_convert.distill.sharding import shard
    from m4v_convert.distill.stage1 import run_stage1
    from m4v_convert.distill.trainer import StageSchedule, Trainer

    layers = [0, 1, 2]
    teacher = make_tiny_wan(seed=3, num_layers=len(layers)).requires_grad_(False)
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    student.convert_(layers, {"temporal_dim": 8, "temporal_heads": 2, "bc_norm": "across_groups"})
    student.requires_grad_(False)
    adapter = WanDistillAdapter(layers=layers, patch_size=(1, 2, 2))
    batches = [tiny_wan_inputs(teacher, batch=1, frames=2, height=8, width=8, text_len=6, seed=s) for s in range(3)]
    sched = StageSchedule(steps=2, lr=1e-3)

    def train(t, s, dist_ctx, events=None):
        blocks = adapter.mmdim_blocks(s)
        for b in blocks.values():
            b.requires_grad_(True)
        if events is not None:
            def tap(i):
                def hook(module, args, out):
                    if out[0].requires_grad:
                        out[0].register_hook(lambda g: events.append(("backward reaches output", i)))
                return hook
            for i, b in blocks.items():
                b.register_forward_hook(tap(i))
                for p in b.parameters():
                    p.register_post_accumulate_grad_hook(lambda _, i=i: events.append(("gradient arrives", i)))
        trainer = Trainer(s, dist=dist_ctx, show_progress=False)
        run_stage1(blocks, lambda batch: adapter.record(t, batch), lambda step: batches[1 + step % 2], batches[:1],
                   sched, trainer=trainer)
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in s.named_parameters() if ".mmdim." in n}

    whole = train(copy.deepcopy(teacher), copy.deepcopy(student), DistContext())
    events: list = []
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard(teacher, student, adapter.mmdim_blocks(student), DistContext(world=1, fsdp=True), torch.device("cpu"),
              bf16=False)
        sharded = train(teacher, student, DistContext(world=1, fsdp=True), events)
    finally:
        dist.destroy_process_group()
    assert sharded.keys() == whole.keys() and len(whole) > 10
    for n in whole:
        torch.testing.assert_close(sharded[n], whole[n], rtol=1e-5, atol=1e-6)
    # the last training step's backward: layers from the last down, each one's gradients in before the next
    last = max(k for k, e in enumerate(events) if e == ("backward reaches output", layers[-1]))
    order = list(dict.fromkeys(events[last:]))
    for upper, lower in zip(layers[::-1], layers[::-1][1:]):
        assert order.index(("gradient arrives", upper)) < order.index(("backward reaches output", lower)), order


def test_sharded_run_refusals_are_one_line(ckpt, recipe_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _refused(_convert(ckpt, out, recipe_file, "--fsdp"), "--fsdp shards the weights across processes",
             "--num-processes N")
    _refused(_convert(ckpt, out, recipe_file, "--fsdp", "--num-processes", "2", "--train", "lora"),
             "--fsdp with --train lora")
    # PyramidFlow's teacher records read weights outside its forward; generic recipes run one process
    _refused(runner.invoke(app, ["pyramidflow", "--checkpoint", str(tmp_path / "none"), "--out", str(out), "--fsdp",
                                 "--num-processes", "2"]), "--fsdp: not offered for pyramidflow recipes")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    _refused(_convert(ckpt, out, recipe_file), "accelerate launch --use_fsdp", "--fsdp_version 2")
    assert not out.exists()


def test_streamed_safetensors_equal_what_safetensors_writes(tmp_path):
    """The writer that takes one tensor at a time (a sharded run's gathered output) writes a file
    safetensors reads back to the original tensors and metadata, in every dtype a model holds."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=g), "b.bias": torch.randn(7, generator=g).bfloat16(),
               "c": torch.randn(2, 2, generator=g).half(), "d.scalar": torch.tensor(3.5, dtype=torch.float64),
               "e.steps": torch.arange(5), "f.mask": torch.tensor([True, False, True])}
    layout = [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    write_streamed(tmp_path / "s.safetensors", layout, iter(tensors.items()), metadata={"format": "pt", "x": "1"})
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt", "x": "1"})
    for name in ("s", "ref"):
        back = load_file(str(tmp_path / f"{name}.safetensors"))
        assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype
                                                     for k in tensors)
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt", "x": "1"}
    with pytest.raises(ValueError, match="the layout says"):
        write_streamed(tmp_path / "bad.safetensors", layout, iter(reversed(tensors.items())))
    with pytest.raises(ValueError, match="fewer tensors"):
        write_streamed(tmp_path / "short.safetensors", layout, iter(list(tensors.items())[:2]))


def test_streamed_output_shards_like_before(tmp_path):
    """A model over the shard limit is written as numbered files with a diffusers index (one tensor in
    memory at a time), and loads back to its weights."""
    from m4v_convert.io.converted import INDEX_NAME, save_converted

    model = make_tiny_wan(seed=3)
    names = save_converted(model, tmp_path / "m", {"recipe": "x"}, max_shard_bytes=20_000)
    assert INDEX_NAME in names and len(names) > 3
    index = json.loads((tmp_path / "m" / INDEX_NAME).read_text())
    state = model.state_dict()
    assert index["weight_map"].keys() == state.keys()
    back = {}
    for name in set(index["weight_map"].values()):
        back.update(load_file(str(tmp_path / "m" / name)))
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert Path(tmp_path / "m" / "config.json").is_file()
