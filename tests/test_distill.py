"""Distillation beyond stage 1: end-to-end KD, fine-tune, teacher calibration, resume, processes, guards."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli import app
from m4v_convert import load_converted
from m4v_convert.errors import M4VError, RecipeError
from m4v_convert.backbones.wan.testing import make_tiny_wan, save_tiny_wan

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _cheap_flops_report():
    """These tests are about training: skip the FLOPs report's meta-device cross-check and plot
    (tested in test_flops.py / test_wan_convert.py) in the conversions run in this process, on 1 thread."""
    import m4v_convert.backbones.wan.flops as wan_flops
    import m4v_convert.flops.report as report

    build = wan_flops.build_wan_flops_report
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and much faster on busy shared cores
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(wan_flops, "build_wan_flops_report", lambda *a, **k: build(*a, **{**k, "crosscheck": False}))
            mp.setattr(report, "_plot", lambda rep, path: Path(path).write_bytes(b""), raising=False)
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_wan(seed=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, teacher):
    return save_tiny_wan(teacher, tmp_path_factory.mktemp("ckpt") / "wan")


def _recipe(path: Path, **distill) -> Path:
    import yaml

    from m4v_convert.recipes import RECIPES_DIR

    data = yaml.safe_load((RECIPES_DIR / "wan2.1.yaml").read_text())
    data["published"] = {k: str(RECIPES_DIR / v) for k, v in data["published"].items()}
    data["mmdim"].update(temporal_dim=8, temporal_heads=2)
    data["calib"].update(latent_frames=2, latent_height=8, latent_width=8, text_len=6, num_samples=6, batch_size=2)
    data["distill"]["grad_checkpointing"] = False  # the recipe's default is tested in test_bad_input, test_memory_plan
    for key, value in distill.items():
        if key in ("name", "calib"):
            data[key] = value if key == "name" else {**data["calib"], **value}
        else:
            data["distill"][key] = value if not isinstance(value, dict) else {**data["distill"].get(key, {}), **value}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    return _recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml")


def _args(ckpt, out, recipe, *extra):
    # training tests: the memory plan (a meta-device step per stage before each run) is test_memory_plan's
    return ["wan2.1", "--checkpoint", str(ckpt), "--out", str(out), "--recipe", str(recipe), "--size", "32x32",
            "--frames", "9", "--no-memory-check", *extra]


def _convert(ckpt, out, recipe, *extra):
    return runner.invoke(app, _args(ckpt, out, recipe, *extra))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _losses(log, stage):
    return [r["loss"] for r in log if r.get("stage") == stage and "event" not in r]


# ------------------------------------------------------------------------------------------------ stages


def test_stage2_and_stage3_train_towards_their_targets(ckpt, recipe_file, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(3)
    save_file({"latents": torch.randn(4, 4, 2, 8, 8, generator=g), "text_embeds": torch.randn(4, 6, 32, generator=g)},
              str(data / "a.safetensors"))
    out = tmp_path / "s23"
    res = _convert(ckpt, out, recipe_file, "--stages", "2,3", "--stage2-steps", "20", "--stage3-steps", "15",
                   "--lr", "0.003", "--data", str(data))
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "conversion.json").read_text())
    s2 = summary["stages"]["stage2"]
    # held-out batch, never trained on: the student's prediction moved towards the teacher's
    assert s2["end_to_end_after"] < 0.8 * s2["end_to_end_before"], s2
    log = _log(out)
    losses = _losses(log, "stage2")
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert s2["samples_per_s"] > 0 and s2["tokens_per_s"] > 0
    losses = _losses(log, "stage3")  # flow matching on --data: noise − x0 is learnable
    assert len(losses) == 15 and sum(losses[-5:]) < sum(losses[:5])
    assert summary["stages"]["stage3"]["steps"] == 15
    assert (out / "loss.png").stat().st_size > 1000
    # only the MM-DiM blocks were trained (--train mmdim is the default)
    t_sd = load_file(str(ckpt / "diffusion_pytorch_model.safetensors"))
    s_sd = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(s_sd[k], v) for k, v in t_sd.items() if ".attn1." not in k)


def test_flow_matching_target_is_the_velocity_diffusers_steps_with():
    """noise − x0 is what FlowMatchEulerDiscreteScheduler integrates: one Euler step from σ to 0
    with that velocity lands exactly on x0 (the sign Wan's scheduler uses)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from m4v_convert.distill.calibration import CalibSpec, noised_batch, synthetic_samples

    spec = CalibSpec(in_channels=4, text_dim=8, latent_frames=2, latent_height=4, latent_width=4, text_len=3,
                     flow_shift=3.0)
    samples = synthetic_samples(spec, 1, seed=0)
    batch, target = noised_batch(samples, spec, torch.Generator().manual_seed(0), with_target=True)
    sigma = float(batch["timestep"][0]) / 1000
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=[sigma], device="cpu")  # one step: σ → 0
    x0 = sched.step(target, sched.timesteps[0], batch["hidden_states"]).prev_sample
    torch.testing.assert_close(x0[0], samples[0].latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "all"])
def test_train_modes(mode, ckpt, recipe_file, tmp_path):
    out = tmp_path / mode
    res = _convert(ckpt, out, recipe_file, "--stages", "2,3", "--stage2-steps", "3", "--lr", "0.01", "--train", mode)
    assert res.exit_code == 0, res.output
    assert "stage 3 (flow-matching fine-tune) skipped" in res.output
    assert json.loads((out / "conversion.json").read_text())["stages"]["stage3"]["skipped"] == "no --data"
    t_sd = load_file(str(ckpt / "diffusion_pytorch_model.safetensors"))
    s_sd = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert {k for k in t_sd if ".attn1." not in k} <= set(s_sd)
    assert not [k for k in s_sd if "lora" in k or "base_layer" in k]  # adapters merged into their layers
    changed = {k for k, v in t_sd.items() if ".attn1." not in k and not torch.equal(s_sd[k], v)}
    assert {"blocks.0.attn2.to_q.weight", "blocks.1.ffn.net.2.weight"} <= changed
    if mode == "lora":  # LoRA only touches attn2/ffn weights (biases and the rest stay)
        assert all((".attn2.to_" in k or ".ffn.net." in k) and k.endswith("weight") for k in changed), changed
    else:
        assert "patch_embedding.weight" in changed
    model = load_converted(out)
    assert model.converted_layers == [0, 1]


def test_lora_without_peft_is_a_clear_error(ckpt, recipe_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    res = _convert(ckpt, tmp_path / "o", recipe_file, "--stages", "2", "--stage2-steps", "1", "--train", "lora")
    text = " ".join(res.output.split())
    assert res.exit_code != 0 and "error: --train lora needs the 'peft' package" in text, res.output
    assert not (tmp_path / "o").exists()


def test_teacher_generated_calibration_is_cached_and_reused(ckpt, recipe_file, teacher, tmp_path):
    from m4v_convert.distill.calibration import CalibSpec, synthetic_samples
    from m4v_convert.distill.teacher_samples import sample_with_teacher

    cache = tmp_path / "cache"
    res = _convert(ckpt, tmp_path / "a", recipe_file, "--stages", "1", "--distill-steps", "1", "--calib-cache",
                   str(cache))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a" / "conversion.json").read_text())["calibration"] == "teacher:synthetic"
    assert "teacher samples 6/6" in res.output
    cached = load_file(str(cache / "teacher_samples.safetensors"))
    # oracle: the cache holds exactly the teacher's Euler samples for the recipe's synthetic texts
    spec = CalibSpec(in_channels=4, text_dim=32, latent_frames=2, latent_height=8, latent_width=8, text_len=6,
                     flow_shift=3.0)
    texts = [s.text for s in synthetic_samples(spec, 6, seed=0)]
    direct = sample_with_teacher(teacher, texts, spec, steps=4, seed=0, batch_size=2)
    torch.testing.assert_close(cached["latents"], torch.stack([s.latents for s in direct]), rtol=0, atol=1e-5)
    assert not torch.allclose(cached["latents"][0], cached["latents"][1])
    stamp = (cache / "teacher_samples.safetensors").stat().st_mtime_ns
    res = _convert(ckpt, tmp_path / "b", recipe_file, "--stages", "1", "--distill-steps", "1", "--calib-cache",
                   str(cache))
    assert res.exit_code == 0 and "reused" in res.output
    assert (cache / "teacher_samples.safetensors").stat().st_mtime_ns == stamp
    other = _recipe(tmp_path / "other.yaml", calib={"teacher_steps": 2})
    res = _convert(ckpt, tmp_path / "c", other, "--stages", "1", "--distill-steps", "1", "--calib-cache", str(cache))
    assert res.exit_code != 0 and "other settings" in " ".join(res.output.split()) and "steps" in res.output
    assert not (tmp_path / "c").exists()


def test_gradient_checkpointing_gives_the_same_gradients(teacher):
    teacher = copy.deepcopy(teacher).requires_grad_(False)  # frozen, as a conversion holds it: the student
    # shares its untouched weights, which must gather no gradient
    from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
    from m4v_convert.backbones.wan.distill import WanDistillAdapter
    from m4v_convert.distill.stage1 import Stage1Task
    from m4v_convert.distill.stage2 import Stage2Task
    from m4v_convert.backbones.wan.testing import tiny_wan_inputs

    batch = tiny_wan_inputs(teacher, batch=2, frames=2, height=8, width=8, text_len=6)
    adapter = WanDistillAdapter(layers=[0, 1], patch_size=(1, 2, 2))

    def grads(checkpointing):
        torch.manual_seed(0)
        student = M4VWanTransformer3DModel.from_teacher(teacher)
        student.convert_([0, 1], {"temporal_dim": 8, "temporal_heads": 2, "bc_norm": "across_groups"})
        if checkpointing:
            adapter.enable_gradient_checkpointing(student)
        student.train()
        s2 = Stage2Task(teacher, student, adapter.feature_modules, lambda s: batch)
        s2.loss(batch)[0].backward()
        blocks = adapter.mmdim_blocks(student)
        s1 = Stage1Task(blocks, lambda b: adapter.record(teacher, b), lambda s: batch,
                        grad_checkpointing=checkpointing)
        s1.loss(batch)[0].backward()  # accumulates onto stage 2's
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    plain, ckpted = grads(False), grads(True)
    assert plain.keys() == ckpted.keys() and len(plain) > 20
    for k in plain:
        torch.testing.assert_close(ckpted[k], plain[k], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ guards


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(ckpt, recipe_file, tmp_path, monkeypatch):
    from m4v_convert.distill import stage2

    calls = {"n": 0}
    original = stage2.Stage2Task.loss

    def poisoned(self, batch):
        calls["n"] += 1
        loss, parts = original(self, batch)
        return (loss * float("nan"), parts) if calls["n"] == 5 else (loss, parts)

    monkeypatch.setattr(stage2.Stage2Task, "loss", poisoned)
    run = tmp_path / "run"
    res = _convert(ckpt, tmp_path / "o", recipe_file, "--stages", "2", "--stage2-steps", "10", "--checkpoint-every",
                   "2", "--run-dir", str(run))
    text = " ".join(res.output.split())
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "loss nan at step 5" in text and "stage2, step 4" in text and "--resume" in text
    assert not (tmp_path / "o").exists()
    state = json.loads((run / "state.json").read_text())
    assert state["stage"] == "stage2" and state["step"] == 4
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "non_finite" for r in log)


def test_non_finite_gradient_stops_training():
    from m4v_convert.distill.trainer import StageSchedule, Trainer

    w = torch.nn.Parameter(torch.ones(3))

    class Task:
        name, title, generator = "toy", "toy stage", None

        def batch(self, step):
            return None

        def loss(self, batch):
            s = w.sum()
            return torch.sqrt(s - s.detach()), {}  # value 0, gradient inf

        def count(self, batch):
            return 1, 0

    trainer = Trainer(torch.nn.ParameterList([w]), show_progress=False)
    with pytest.raises(M4VError, match="gradient norm"):
        trainer.fit(Task(), StageSchedule(steps=3), {"w": w})
    assert torch.equal(w.detach(), torch.ones(3))  # the bad step was not applied


class _LayerTask:
    """Three independent regressions, one per layer, summed (stage 1's shape): fixed batches."""

    name, title, generator = "toy", "toy stage", None

    def __init__(self, layers, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.layers = layers
        self.data = [[(torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g) * (1 + 3 * i))
                      for i in range(len(layers))] for _ in range(5)]

    def batch(self, step):
        return self.data[step % len(self.data)]

    def loss(self, batch):
        parts = {f"layer{i}": torch.nn.functional.mse_loss(layer(x), y) for i, (layer, (x, y))
                 in enumerate(zip(self.layers, batch))}
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}

    def count(self, batch):
        return 4, 0


def _layers(seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))
                                for _ in range(3)])


def test_units_train_each_layer_as_it_would_alone_with_one_layers_gradients_at_a_time(monkeypatch):
    """Oracle: each layer trained by itself (its own AdamW, cosine schedule and gradient-norm limit, a
    step after a full backward), by hand. ``units`` gives the same weights bit for bit, while no
    optimizer step ever sees more than one layer's gradients (each unit steps inside the backward and
    frees them); one global limit (no units) gives other weights, so the clipping is really per layer."""
    from m4v_convert.distill.trainer import StageSchedule, Trainer

    sched = StageSchedule(steps=5, lr=0.05, grad_clip=0.5)
    expected = _layers()
    for i, layer in enumerate(expected):
        opt = torch.optim.AdamW(layer.parameters(), lr=sched.lr, weight_decay=sched.weight_decay)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=sched.steps, eta_min=sched.lr * sched.min_lr_ratio)
        task = _LayerTask(expected)
        for step in range(sched.steps):
            opt.zero_grad()
            x, y = task.batch(step)[i]
            torch.nn.functional.mse_loss(layer(x), y).backward()
            torch.nn.utils.clip_grad_norm_(layer.parameters(), sched.grad_clip)
            opt.step()
            cos.step()

    model = _layers()
    params = dict(model.named_parameters())
    units = [[n for n in params if n.startswith(f"{i}.")] for i in range(3)]
    grad_bytes, seen = sum(p.numel() * 4 for p in model[0].parameters()), []
    step = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        seen.append(sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    Trainer(model, show_progress=False).fit(_LayerTask(model), sched, params, units=units)
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)
    assert len(seen) == 3 * sched.steps and max(seen) == grad_bytes  # one layer's gradients at a time
    assert all(p.grad is None for p in model.parameters())

    together = _layers()
    Trainer(together, show_progress=False).fit(_LayerTask(together), sched, dict(together.named_parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(together.parameters(), expected.parameters()))


def test_a_unit_with_a_non_finite_gradient_stops_training_unapplied():
    from m4v_convert.distill.trainer import StageSchedule, Trainer

    model = _layers()
    task = _LayerTask(model)
    real = task.loss

    def loss(batch):  # layer 1's gradient is inf at the third step
        total, parts = real(batch)
        if task.calls == 2:
            s = model[1][0].weight.sum()
            total = total + torch.sqrt(s - s.detach())
        task.calls += 1
        return total, parts

    task.calls, task.loss = 0, loss
    params = dict(model.named_parameters())
    units = [[n for n in params if n.startswith(f"{i}.")] for i in range(3)]
    before = []
    with pytest.raises(M4VError, match="gradient norm inf at step 3"):
        Trainer(model, show_progress=False).fit(task, StageSchedule(steps=5, lr=0.05), params, units=units,
                                                on_step=lambda step, parts: before.append(copy.deepcopy(model[1])))
    assert all(torch.equal(a, b) for a, b in zip(model[1].parameters(), before[-1].parameters()))  # not applied
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_distill_input_is_one_clear_message(ckpt, recipe_file, tmp_path):
    cases = []
    bad_shape = tmp_path / "bad_shape"
    bad_shape.mkdir()
    save_file({"latents": torch.randn(5, 2, 8, 8), "text_embeds": torch.randn(6, 32)}, str(bad_shape / "x.safetensors"))
    cases.append((["--stages", "3", "--data", str(bad_shape)], "--data", "C=4"))
    missing = tmp_path / "missing"
    missing.mkdir()
    save_file({"latents": torch.randn(4, 2, 8, 8)}, str(missing / "x.safetensors"))
    cases.append((["--stages", "3", "--data", str(missing)], "--data", "text_embeds"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_file({"latents": torch.randn(4, 2, 8, 8), "text_embeds": torch.randn(6, 32)}, str(mixed / "a.safetensors"))
    save_file({"latents": torch.randn(4, 2, 4, 4), "text_embeds": torch.randn(6, 32)}, str(mixed / "b.safetensors"))
    cases.append((["--stages", "3", "--data", str(mixed)], "--data", "different shapes"))
    cases.append((["--stages", "1,4"], "--stages", ""))
    cases.append((["--train", "everything"], "--train", ""))
    cases.append((["--stages", "1", "--data", str(missing)], "--data", "stage 3"))
    cases.append((["--num-processes", "5"], "--num-processes 5", "training samples"))
    cases.append((["--resume", str(tmp_path / "nowhere")], "--resume", "not a folder"))
    for extra, flag, detail in cases:
        out = tmp_path / "out"
        res = _convert(ckpt, out, recipe_file, "--stage2-steps", "1", "--distill-steps", "1", *extra)
        text = " ".join(res.output.split())
        assert res.exit_code != 0 and "Traceback" not in res.output, (extra, res.output)
        assert "error:" in text and flag in text and detail in text, (extra, text)
        assert not out.exists()


def test_resume_refuses_another_run_and_overwrites_nothing(ckpt, recipe_file, tmp_path):
    run = tmp_path / "run"
    res = _convert(ckpt, tmp_path / "first", recipe_file, "--stages", "1", "--distill-steps", "2",
                   "--checkpoint-every", "1", "--run-dir", str(run), "--layers", "0")
    assert res.exit_code == 0, res.output
    before = (run / "state.pt").read_bytes()
    other = _recipe(tmp_path / "other.yaml", name="wan2.1-other")
    for recipe, extra, expect in [
        (other, [], "recipe 'wan2.1'"),
        (recipe_file, ["--layers", "0-1"], "converted layers"),
        (recipe_file, ["--layers", "0", "--distill-steps", "3"], "stage schedule"),
    ]:
        out = tmp_path / "again"
        res = _convert(ckpt, out, recipe, "--stages", "1", "--checkpoint-every", "1", "--resume", str(run), *extra)
        text = " ".join(res.output.split())
        assert res.exit_code != 0 and "error:" in text and expect in text, (extra, text)
        assert not out.exists() and (run / "state.pt").read_bytes() == before
    # the same command without --resume does not silently start over in a folder holding a checkpoint
    res = _convert(ckpt, tmp_path / "again", recipe_file, "--stages", "1", "--distill-steps", "2",
                   "--checkpoint-every", "1", "--run-dir", str(run), "--layers", "0")
    assert res.exit_code != 0 and "--resume" in res.output and (run / "state.pt").read_bytes() == before


def test_recipe_schedule_fields_are_validated(tmp_path):
    from m4v_convert.recipes import load_recipe

    good = load_recipe("wan2.1")
    assert good.distill["stage2"]["feature_weight"] == 0.5 and good.distill["stages"] == "1,2,3"
    for distill, field in [({"stage2": {"feature_weight": "big"}}, "distill.stage2.feature_weight"),
                           ({"stage3": {"steps": -1}}, "distill.stage3.steps"),
                           ({"stage2": {"lr": 0}}, "distill.stage2.lr"),
                           ({"stage2": {"epochs": 3}}, "distill.stage2.epochs"),
                           ({"stages": "1,5"}, "distill.stages"),
                           ({"train": "everything"}, "distill.train"),
                           ({"stage2": {"on_policy": 1.5}}, "distill.stage2.on_policy"),
                           ({"stage2": {"on_policy_steps": 0}}, "distill.stage2.on_policy_steps")]:
        path = _recipe(tmp_path / "r.yaml", **distill)
        with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
            load_recipe(path)


# ------------------------------------------------------------------------------------------------ on-policy stage 2


def test_on_policy_batches_are_the_students_own_sampling_states(teacher):
    """distill.stage2.on_policy: a batch's video is replaced, with that probability, by the state after k
    Euler steps of the model's own sampling from fresh noise (k uniform below on_policy_steps), checked
    against the sampler written out here and the generator's draws replayed; 0 draws nothing."""
    from m4v_convert.backbones.wan.distill import WanDistillAdapter
    from m4v_convert.distill.calibration import CalibSpec, noised_batch, shift_sigma, synthetic_samples
    from m4v_convert.distill.distributed import DistContext
    from m4v_convert.distill.job import DistillPlan, on_policy_batch

    spec = CalibSpec(latent_frames=2, latent_height=8, latent_width=8, text_len=6, text_dim=32, in_channels=4,
                     flow_shift=3.0)
    adapter = WanDistillAdapter(layers=[0, 1], patch_size=(1, 2, 2), spec=spec)
    samples = synthetic_samples(spec, 2, seed=0)
    batch = noised_batch(samples, spec, torch.Generator().manual_seed(1))
    steps = 5
    sigmas = shift_sigma(torch.linspace(1.0, 0.0, steps + 1), 3.0)

    def by_hand(noise, k):
        x = noise.clone()
        for i in range(k):
            t = torch.full((x.shape[0],), float(sigmas[i]) * 1000.0)
            x = x + (sigmas[i + 1] - sigmas[i]) * teacher(hidden_states=x, timestep=t,
                                                         encoder_hidden_states=batch["encoder_hidden_states"],
                                                         return_dict=False)[0].float()
        return x

    off = DistillPlan(stages=[2], schedules={})
    gen = torch.Generator().manual_seed(0)
    assert on_policy_batch(batch, teacher, adapter, off, gen, DistContext()) is batch
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn

    for share, world, rank in [(1.0, 1, 0), (0.5, 1, 0), (1.0, 2, 1)]:
        plan = DistillPlan(stages=[2], schedules={}, on_policy=share, on_policy_steps=steps)
        gen, replay = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        ks = []
        for _ in range(8):
            got = on_policy_batch(batch, teacher, adapter, plan, gen, DistContext(rank=rank, world=world))
            if float(torch.rand((), generator=replay)) >= share:
                assert got is batch
                ks.append(None)
                continue
            k = int(torch.randint(steps, (), generator=replay))
            noise = torch.randn((2 * world, *batch["hidden_states"].shape[1:]), generator=replay)[2 * rank:2 * rank + 2]
            torch.testing.assert_close(got["hidden_states"], by_hand(noise, k), rtol=1e-5, atol=1e-5)
            assert torch.equal(got["timestep"], torch.full((2,), float(sigmas[k]) * 1000.0))
            assert got["encoder_hidden_states"] is batch["encoder_hidden_states"]
            ks.append(k)
        assert len({k for k in ks if k is not None}) > 1 and (share == 1.0) == (None not in ks), ks

    # mixed precision: the sampler runs under the bf16 autocast the stage's own forward runs under
    plan = DistillPlan(stages=[2], schedules={}, on_policy=1.0, on_policy_steps=steps, bf16=True)
    for seed in range(20):  # a draw with at least one sampler step
        replay = torch.Generator().manual_seed(seed)
        float(torch.rand((), generator=replay))
        k = int(torch.randint(steps, (), generator=replay))
        if k > 0:
            break
    noise = torch.randn((2, *batch["hidden_states"].shape[1:]), generator=replay)
    got = on_policy_batch(batch, teacher, adapter, plan, torch.Generator().manual_seed(seed), DistContext())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = by_hand(noise, k)
    torch.testing.assert_close(got["hidden_states"], want, rtol=1e-5, atol=1e-5)
    assert (got["hidden_states"] - by_hand(noise, k)).abs().max() > 1e-3  # not the float32 sampler


def test_on_policy_stage2_trains_and_is_refused_outside_wan(ckpt, tmp_path):
    from m4v_convert.recipes import load_recipe

    recipe = _recipe(tmp_path / "on-policy.yaml", stage2={"on_policy": 1.0, "on_policy_steps": 4})
    res = _convert(ckpt, tmp_path / "out", recipe, "--stages", "1,2", "--distill-steps", "4", "--stage2-steps", "12",
                   "--lr", "0.003")
    assert res.exit_code == 0, res.output
    s2 = json.loads((tmp_path / "out" / "conversion.json").read_text())["stages"]["stage2"]
    assert s2["end_to_end_after"] < s2["end_to_end_before"], s2
    assert len(_losses(_log(tmp_path / "out"), "stage2")) == 12
    # a PyramidFlow recipe has no sampler for it: refused when the recipe is read
    import yaml

    from m4v_convert.recipes import RECIPES_DIR

    data = yaml.safe_load((RECIPES_DIR / "pyramidflow-miniflux-768p.yaml").read_text())
    data["published"] = {k: str(RECIPES_DIR / v) for k, v in (data.get("published") or {}).items()}
    data.setdefault("distill", {}).setdefault("stage2", {})["on_policy"] = 0.5
    (tmp_path / "pf.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=r"distill\.stage2\.on_policy.*only used by backbone 'wan'"):
        load_recipe(tmp_path / "pf.yaml")


# ------------------------------------------------------------------------------------------------ processes


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _kill_at(proc: subprocess.Popen, run: Path, stage: str, step: int) -> dict:
    """SIGKILL ``proc`` once its run folder has checkpointed ``stage`` at ``step`` or later; the state it left."""
    deadline = time.time() + 100
    while time.time() < deadline and proc.poll() is None:
        try:
            state = json.loads((run / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
        if state.get("stage") == stage and state.get("step", 0) >= step:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(30) == -signal.SIGKILL, f"the run ended before it could be killed in {stage}"
    return json.loads((run / "state.json").read_text())


@pytest.mark.parametrize("on_policy", [False, True], ids=["calibration-inputs", "on-policy"])
def test_resume_after_sigkill_ends_with_the_uninterrupted_weights(ckpt, recipe_file, tmp_path, on_policy):
    common = ["--stages", "1,2", "--distill-steps", "4", "--stage2-steps", "40", "--checkpoint-every", "3",
              "--deterministic", "--mixed-precision", "no"]
    if on_policy:  # the stage-2 stream depends on the student's weights and the checkpointed generator
        recipe_file = _recipe(tmp_path / "on-policy.yaml", stage2={"on_policy": 0.5, "on_policy_steps": 4})
    run = tmp_path / "run"
    killed = subprocess.Popen([sys.executable, str(ROOT / "cli.py")] +
                              _args(ckpt, tmp_path / "out", recipe_file, *common, "--run-dir", str(run)),
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # the reference and the resumed run happen here, on 1 thread like the subprocess (CPU results are
    # then bitwise reproducible across processes)
    deterministic = torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == 1
    try:
        ref = _convert(ckpt, tmp_path / "ref", recipe_file, *common, "--run-dir", str(tmp_path / "ref_run"))
        assert ref.exit_code == 0, ref.output
        state = _kill_at(killed, run, "stage2", 3)
        assert state["stage"] == "stage2" and 3 <= state["step"] < 40 and not (tmp_path / "out").exists()
        resumed = _convert(ckpt, tmp_path / "out", recipe_file, *common, "--resume", str(run))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {run.resolve()}: stage2 step {state['step']}" in " ".join(resumed.output.split())
    a = load_file(str(tmp_path / "ref" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the log continues where the checkpoint was: every step exactly once, same losses as the reference
    assert _losses(_log(tmp_path / "out"), "stage2") == _losses(_log(tmp_path / "ref"), "stage2")


def test_two_processes_equal_one_process_on_the_combined_batch(ckpt, recipe_file, tmp_path):
    common = ["--stages", "1,2", "--distill-steps", "4", "--stage2-steps", "4", "--mixed-precision", "no"]
    res = _convert(ckpt, tmp_path / "two", recipe_file, *common, "--batch-size", "1", "--num-processes", "2")
    assert res.exit_code == 0, res.output
    one = _convert(ckpt, tmp_path / "one", recipe_file, *common, "--batch-size", "2")
    assert one.exit_code == 0, one.output
    log = _log(tmp_path / "two")
    sums = [r["checksums"] for r in log if r.get("event") == "rank_checksums"]
    assert len(sums) == 2 and all(len(s) == 2 and s[0] == s[1] for s in sums)  # both ranks: identical weights
    for stage in ("stage1", "stage2"):
        torch.testing.assert_close(torch.tensor(_losses(log, stage)),
                                   torch.tensor(_losses(_log(tmp_path / "one"), stage)), rtol=1e-4, atol=1e-6)
    a = load_file(str(tmp_path / "one" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "diffusion_pytorch_model.safetensors"))
    t = load_file(str(ckpt / "diffusion_pytorch_model.safetensors"))
    assert [k for k in a if k not in t]  # the MM-DiM weights (compared below with the rest)
    for k in a:  # Adam normalizes tiny gradients, so allow a little more than float rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=2e-4)
    assert json.loads((tmp_path / "two" / "conversion.json").read_text())["distill"]["processes"] == 2


# ------------------------------------------------------------------------------------------------ layer groups


def test_layer_groups_train_every_layer_and_match_one_group(ckpt, recipe_file, tmp_path):
    """--layer-groups 2: in stages 1 and 2 each converted layer is trained in its own group (its own stage
    in the log and the checkpoints), every layer's error falls; stage 1 gives each layer exactly what
    training them together does, and stage 2 ends as close to the teacher."""
    common = ["--stages", "1,2", "--distill-steps", "12", "--stage2-steps", "6", "--layers", "all",
              "--mixed-precision", "no"]
    res = _convert(ckpt, tmp_path / "groups", recipe_file, *common, "--layer-groups", "2")
    assert res.exit_code == 0, res.output
    one = _convert(ckpt, tmp_path / "one", recipe_file, *common)
    assert one.exit_code == 0, one.output
    log = _log(tmp_path / "groups")
    assert len(_losses(log, "stage1.group1")) == 12 and len(_losses(log, "stage1.group2")) == 12
    assert len(_losses(log, "stage2.group1")) == 6 and len(_losses(log, "stage2.group2")) == 6
    groups = json.loads((tmp_path / "groups" / "conversion.json").read_text())
    together = json.loads((tmp_path / "one" / "conversion.json").read_text())
    assert groups["stages"]["stage1"]["layer_groups"] == [[0], [1]]
    assert groups["stages"]["stage2"]["layer_groups"] == [[0], [1]]
    e2e = groups["end_to_end_error"]
    assert e2e["after"] < e2e["before"]
    # stage 2 one group at a time (the other held fixed) ends as close to the teacher as all at once
    assert e2e["after"] < 1.5 * together["end_to_end_error"]["after"]
    for layer in ("0", "1"):
        assert groups["error_after"][layer] < groups["error_before"][layer]
        # stage 1: a layer's loss reads only its own records and it has its own optimizer, so alone it
        # trains exactly as beside the others
        assert groups["error_after"][layer] == together["error_after"][layer]
    t = load_file(str(ckpt / "diffusion_pytorch_model.safetensors"))
    out = load_file(str(tmp_path / "groups" / "diffusion_pytorch_model.safetensors"))
    init = _convert(ckpt, tmp_path / "init", recipe_file, "--stages", "1", "--distill-steps", "0", "--layers", "all")
    assert init.exit_code == 0, init.output
    start = load_file(str(tmp_path / "init" / "diffusion_pytorch_model.safetensors"))
    for layer in (0, 1):  # both groups moved their own weights
        assert any(not torch.equal(out[k], start[k]) for k in out if k.startswith(f"blocks.{layer}.attn1.mmdim."))
    assert all(torch.equal(out[k], t[k]) for k in t if k in out)  # nothing outside MM-DiM changed


def test_layer_groups_resume_per_group_after_sigkill(ckpt, recipe_file, tmp_path):
    """Killed in stage 2's second group: the finished groups (both of stage 1, the first of stage 2)
    are not trained again, the second continues from its checkpoint, and the weights are the
    uninterrupted run's."""
    common = ["--stages", "1,2", "--distill-steps", "6", "--stage2-steps", "30", "--layers", "all",
              "--layer-groups", "2", "--checkpoint-every", "3", "--deterministic", "--mixed-precision", "no"]
    run = tmp_path / "run"
    killed = subprocess.Popen([sys.executable, str(ROOT / "cli.py")] +
                              _args(ckpt, tmp_path / "out", recipe_file, *common, "--run-dir", str(run)),
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deterministic = torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == 1
    try:
        ref = _convert(ckpt, tmp_path / "ref", recipe_file, *common, "--run-dir", str(tmp_path / "ref_run"))
        assert ref.exit_code == 0, ref.output
        state = _kill_at(killed, run, "stage2.group2", 3)
        assert state["stage"] == "stage2.group2" and 3 <= state["step"] < 30
        resumed = _convert(ckpt, tmp_path / "out", recipe_file, *common, "--resume", str(run))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {run.resolve()}: stage2.group2 step {state['step']}" in " ".join(resumed.output.split())
    log, ref_log = _log(tmp_path / "out"), _log(tmp_path / "ref")
    for stage in ("stage1.group1", "stage1.group2", "stage2.group1", "stage2.group2"):
        assert _losses(log, stage) == _losses(ref_log, stage)
    assert not [r for r in log if r.get("event") == "resume" and r["stage"] != "stage2.group2"]
    a = load_file(str(tmp_path / "ref" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layer_groups_beyond_the_layers_are_refused(ckpt, recipe_file, tmp_path):
    res = _convert(ckpt, tmp_path / "o", recipe_file, "--layers", "0", "--layer-groups", "2")
    assert res.exit_code == 2 and "--layer-groups 2: more groups than the 1 converted layers" in res.output, res.output
