"""The memory plan (issue 27 item 4, issue 38 part 3): the counting against hand counts, a run that
cannot fit refused before any weight is read, ``--dry-run`` loading nothing, and the estimate
against the peak a real conversion reaches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli import app
from m4v_convert.backbones.wan.testing import make_tiny_wan, save_tiny_wan
from m4v_convert.jobs import memory
from m4v_convert.jobs.memory import MemoryPhase, MemoryPlan, saved_bytes, tensor_bytes
from m4v_convert.recipes import RECIPES_DIR

pytestmark = pytest.mark.memory_plan
runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(10, 4)  # 160 bytes
    b = torch.zeros(3, dtype=torch.float64)  # 24 bytes
    assert tensor_bytes([a, a[2:], {"x": a.t(), "y": (b,)}]) == 160 + 24
    assert tensor_bytes([a, b], seen={id(a)}) == 24
    assert tensor_bytes(torch.zeros(5, device="meta", dtype=torch.bfloat16)) == 10


def test_saved_bytes_counts_what_autograd_keeps_for_backward():
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    # x @ w keeps x (for w's gradient) and w (excluded: a weight); tanh keeps its output (4 x 8)
    assert saved_bytes(lambda: torch.tanh(x @ w), exclude={id(w)}) == 2 * 4 * 8 * 4
    with torch.no_grad():  # saved_bytes turns grad on: the count does not depend on the caller's mode
        assert saved_bytes(lambda: torch.tanh(x @ w), exclude={id(w)}) == 2 * 4 * 8 * 4


def test_a_step_peak_counts_live_tensors_until_they_are_freed():
    """Hand count: four exp in a row each keep their output for backward (4 x 4000 bytes at the end of
    the forward); backward makes each output's gradient (4000) before it frees that output, so the
    peak is five such tensors; the input copy ``w * 1.0`` was freed after the first exp; views (the
    loss gradient's expand) are no new memory; the parameter's own gradient is dropped on arrival."""
    from m4v_convert.jobs.memory import step_peak_bytes

    w = torch.nn.Parameter(torch.randn(1000, device="meta"))

    def loss():
        t = w * 1.0
        for _ in range(4):
            t = t.exp()
        return t.sum(), {}

    assert 5 * 4000 <= step_peak_bytes(loss, [w]) < 5 * 4000 + 64
    assert w.grad is None


def test_attention_is_counted_as_the_fused_kernel_not_the_meta_math_path():
    """The meta device runs ``scaled_dot_product_attention`` as matmul + softmax, holding the L x L
    scores; GPUs and the CPU run a fused kernel that keeps the output and one log-sum-exp per row.
    Hand count for the fused step (b=1, h=2, L=4096, d=16; q = k = v): the output and its gradient,
    the log-sum-exp, q's gradient: far below one L x L matrix (134 MB), which the math path holds."""
    from m4v_convert.jobs.memory import fused_attention_on_meta, step_peak_bytes

    q = torch.nn.Parameter(torch.randn(1, 2, 4096, 16, device="meta"))
    scores = 2 * 4096 * 4096 * 4

    def loss():
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, None, 0.0, False).sum(), {}

    assert step_peak_bytes(loss, [q]) > scores  # the meta device's own path
    with fused_attention_on_meta():
        fused = step_peak_bytes(loss, [q])
    assert q.nbytes * 2 <= fused <= q.nbytes * 6


def test_dry_run_with_grad_checkpointing_counts_a_smaller_step_and_the_same_cpu_reserve(wan, tmp_path, monkeypatch):
    """Checkpointing shrinks what a step holds live (measured on meta), not what glibc's heap keeps on
    CPU (see CPU_HEAP_RESERVE): the reserve is the same with and without it."""
    _no_weights_read(monkeypatch)
    rows = {}
    for flag in ("--grad-checkpointing", "--no-grad-checkpointing"):
        res = runner.invoke(app, ["wan2.1", "--checkpoint", str(wan), "--out", str(tmp_path / "out"), "--dry-run",
                                  "--stages", "2", "--distill-steps", "0", "--stage2-steps", "1", flag])
        assert res.exit_code == 0, res.output
        rows[flag] = {k: float(line.split()[-1]) for line in res.output.splitlines()
                      for k in ("one training step", "allocator reserve") if line.strip().startswith(k)}
    on, off = rows["--grad-checkpointing"], rows["--no-grad-checkpointing"]
    assert 0 < on["one training step"] < off["one training step"], rows
    assert on["allocator reserve"] == off["allocator reserve"] > 0, rows


def test_the_plan_adds_up_and_scales_with_processes_and_batch():
    phase = MemoryPhase("stage 2 (end-to-end)", {"gradients": 100, "activations": 400}, batch=4, per_sample=100)
    mp = MemoryPlan(device="cpu", processes=2, weights={"teacher": 1000, "student": 1000}, phases=[phase],
                    available=5000)
    assert mp.peak == 2500 and mp.needed == 5000 and mp.fits
    mp.available = 4999
    assert not mp.fits
    # 2 processes × (2000 + 100 + 100·b) <= 4999 -> b <= 3
    assert mp.largest_batch_that_fits() == 3
    flags = type("F", (), {"dtype": "auto"})()
    distill = type("D", (), {"grad_checkpointing": False, "layer_groups": 1})()
    text = mp.refusal(flags, distill)
    assert "--batch-size 3" in text and "--grad-checkpointing" in text and "fewer --num-processes" in text
    assert "--layer-groups K > 1" in text
    distill.grad_checkpointing = True  # already on (the Wan recipe's default): not suggested
    assert "--grad-checkpointing" not in mp.refusal(flags, distill)


@pytest.fixture
def wan(tmp_path):
    ckpt = save_tiny_wan(make_tiny_wan(seed=0), tmp_path / "ckpt")
    return ckpt


def _no_weights_read(monkeypatch):
    from m4v_convert.backbones.wan import load

    def refuse(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(load, "load_wan_transformer", refuse)
    monkeypatch.setattr(load, "read_state_dict", refuse)


def test_a_batch_that_cannot_fit_is_refused_before_any_weight_is_read(wan, tmp_path, monkeypatch):
    """``--batch-size 100000`` was accepted and the process OOM-killed at 24 GB."""
    _no_weights_read(monkeypatch)
    out = tmp_path / "out"
    res = runner.invoke(app, ["wan2.1", "--checkpoint", str(wan), "--out", str(out), "--batch-size", "100000",
                              "--layers", "all"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.output.count("error:") == 1
    assert "memory plan: this run needs about" in text and "is available on cpu" in text
    assert "try --batch-size" in text and "--no-memory-check runs anyway" in text
    assert not out.exists()


def test_dry_run_prints_the_plan_and_reads_no_weight(wan, tmp_path, monkeypatch):
    _no_weights_read(monkeypatch)
    out = tmp_path / "out"
    res = runner.invoke(app, ["wan2.1", "--checkpoint", str(wan), "--out", str(out), "--dry-run",
                              "--stage2-steps", "1"])
    assert res.exit_code == 0, res.output
    for part in ("memory plan on cpu", "weights: teacher", "stage 1 (attention transfer) (batch 2)",
                 "stage 2 (end-to-end) (batch 2)", "one training step at its peak", "peak:",
                 "--dry-run: stopped before loading any weight"):
        assert part in res.output, res.output
    assert not out.exists()


def test_layer_groups_plan_one_groups_training_state_in_every_stage(wan, tmp_path, monkeypatch):
    """--layer-groups 2 on two equal layers: every stage holds half the AdamW states of training both
    layers together, and one layer's gradients either way."""
    _no_weights_read(monkeypatch)
    plans = []
    plan_memory = memory.plan_memory
    monkeypatch.setattr(memory, "plan_memory", lambda *a, **k: plans.append(plan_memory(*a, **k)) or plans[-1])
    for extra in ([], ["--layer-groups", "2"]):
        res = runner.invoke(app, ["wan2.1", "--checkpoint", str(wan), "--out", str(tmp_path / "out"), "--dry-run",
                                  "--layers", "all", "--stage2-steps", "1", *extra])
        assert res.exit_code == 0, res.output
    assert "stage 2 (end-to-end, largest of 2 layer groups)" in res.output, res.output

    def state(mp, stage):
        phase = next(p for p in mp.phases if p.name.startswith(stage))
        return next(v for k, v in phase.parts.items() if "AdamW states" in k)

    # two AdamW moments of each layer trained in the group (one layer, or both without groups) and one
    # layer's gradients at a time (each layer steps inside the backward), in every stage
    layer = state(plans[1], "stage 2") / 3
    for stage in ("stage 1", "stage 2"):
        assert state(plans[1], stage) == 3 * layer > 0 and state(plans[0], stage) == 5 * layer


def test_fsdp_plans_each_process_s_shard(wan, tmp_path, monkeypatch):
    """--fsdp --num-processes 2: each process holds half of every weight and of the training state,
    plus one layer's whole gradients, two blocks' gathered weights, and while it loads block by block
    one whole block (the whole teacher where --teacher-calib samples with it first); hand counts from
    the tiny model."""
    _no_weights_read(monkeypatch)
    plans = []
    plan_memory = memory.plan_memory
    monkeypatch.setattr(memory, "plan_memory", lambda *a, **k: plans.append(plan_memory(*a, **k)) or plans[-1])
    for extra in (["--teacher-calib", "--fsdp"], [], ["--fsdp"]):
        res = runner.invoke(app, ["wan2.1", "--checkpoint", str(wan), "--out", str(tmp_path / "out"), "--dry-run",
                                  "--layers", "all", "--stage2-steps", "1", "--num-processes", "2", *extra])
        assert res.exit_code == 0, res.output
    loaded_whole, replicated, sharded = plans
    teacher = make_tiny_wan(seed=0)
    whole = sum(t.numel() * 4 for t in (*teacher.parameters(), *teacher.buffers()))
    assert replicated.weights["teacher"] == whole and sharded.weights["teacher, 1/2 shard"] == whole // 2
    for key, value in replicated.weights.items():  # the calibration samples: every process holds them all
        assert sharded.weights[key if key == "calibration samples" else f"{key}, 1/2 shard"] == \
            (value if key == "calibration samples" else -(-value // 2))
    loading = next(p for p in loaded_whole.phases if p.name == "loading")
    assert loading.parts["the whole teacher, before it is sharded"] == whole - whole // 2

    def part(mp, stage, key):
        phase = next(p for p in mp.phases if p.name.startswith(stage))
        return next(v for k, v in phase.parts.items() if key in k)

    # L: one layer's MM-DiM (both layers equal). Replicated: gradients 2L + moments 4L; sharded: half
    # the moments, one layer's whole gradients before they are reduce-scattered and then its shard
    layer = part(replicated, "stage 1", "AdamW states") / 6
    teacher_block = sum(p.numel() * 4 for p in teacher.blocks[0].parameters())
    block = teacher_block + layer
    outside = sum(p.numel() * 4 for n, p in teacher.named_parameters() if not n.startswith("blocks."))
    assert next(p for p in sharded.phases if p.name == "loading").parts == {
        "one block whole (read and converted), before it is sharded": block,
        "what precedes and follows the blocks, whole until sharded": outside,
        "its part of the checkpoint while it is copied in": teacher_block}
    for stage in ("stage 1", "stage 2"):
        assert part(replicated, stage, "AdamW states") == 6 * layer > 0
        assert part(sharded, stage, "AdamW states") == 2 * layer + layer + layer / 2
        assert part(sharded, stage, "gathered weights") == 2 * block
    assert "sharded across" not in res.output  # a plan, nothing launched or loaded
    assert any("sharded on CPU, measured once" in n for n in sharded.notes)  # what was measured, said


def test_dry_run_for_every_backbone(tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    from m4v_convert.backbones.pyramidflow import save_pyramidflow
    from m4v_convert.backbones.pyramidflow.testing import make_tiny_miniflux

    save_pyramidflow(make_tiny_miniflux(seed=0), tmp_path / "pf", "768p")
    torch.manual_seed(0)
    CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=8, use_rotary_positional_embeddings=True).save_pretrained(tmp_path / "cog")
    for cmd in (["pyramidflow", "--checkpoint", str(tmp_path / "pf"), "--layers", "1-2"],
                ["convert", "cogvideox", "--checkpoint", str(tmp_path / "cog")]):
        res = runner.invoke(app, [*cmd, "--out", str(tmp_path / "out"), "--dry-run", "--stage2-steps", "1"])
        assert res.exit_code == 0, res.output
        assert "stage 1 (attention transfer)" in res.output and "stage 2 (end-to-end)" in res.output, res.output
        assert not (tmp_path / "out").exists()


def test_a_run_that_does_not_fit_runs_with_no_memory_check(wan, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    args = ["wan2.1", "--checkpoint", str(wan), "--out", str(tmp_path / "out"), "--distill-steps", "1",
            "--stage2-steps", "0"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "memory plan: this run needs about" in res.output, res.output
    assert not (tmp_path / "out").exists()
    res = runner.invoke(app, [*args, "--no-memory-check"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "conversion.json").is_file() and "memory plan" not in res.output


MEASURE = r"""
import json, sys
from typer.testing import CliRunner
from cli import app

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

args = sys.argv[1:]
res = CliRunner().invoke(app, args + ["--dry-run"])
assert res.exit_code == 0, res.output
peak_line = next(l for l in res.output.splitlines() if l.strip().startswith("peak:"))
estimate = float(peak_line.split("peak:")[1].split()[0]) * 1e9
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the resident high-water mark to what is resident now
res = CliRunner().invoke(app, args)
assert res.exit_code == 0, res.output
print(json.dumps({"estimate": estimate, "measured": status("VmHWM") - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
@pytest.mark.parametrize("stage,checkpointing", [("1", "--grad-checkpointing"), ("2", "--grad-checkpointing"),
                                                  ("1", "--no-grad-checkpointing")])
def test_the_estimate_is_within_25_percent_of_the_measured_peak(stage, checkpointing, tmp_path):
    """A Wan model of 4 layers × 256 wide at 1024 tokens per sample, batch 2: the plan against the
    resident peak the conversion reaches above what the process held before it started (3 steps:
    malloc's heap reaches its working size after the first)."""
    model = make_tiny_wan(seed=0, num_attention_heads=4, attention_head_dim=64, ffn_dim=512, num_layers=4,
                          text_dim=64)
    ckpt = save_tiny_wan(model, tmp_path / "ckpt")
    data = yaml.safe_load((RECIPES_DIR / "wan2.1.yaml").read_text())
    data["published"] = {k: str(RECIPES_DIR / v) for k, v in data["published"].items()}
    data["calib"].update(latent_frames=4, latent_height=32, latent_width=32, text_len=16, num_samples=6, batch_size=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    steps = ["--stages", "1", "--distill-steps", "3"] if stage == "1" else \
        ["--stages", "2", "--distill-steps", "0", "--stage2-steps", "3"]
    args = ["wan2.1", "--checkpoint", str(ckpt), "--recipe", str(recipe), "--out", str(tmp_path / "out"),
            "--batch-size", "2", "--threads", "2", checkpointing, *steps]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = got["estimate"] / got["measured"]
    assert 0.75 <= ratio <= 1.25, got
