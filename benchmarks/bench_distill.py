"""Throughput of distillation stages 1 and 2 (samples/s, video tokens/s) on the real training loop.

    python benchmarks/bench_distill.py                 # CPU: the shipped tiny Wan2.1-layout model
    python benchmarks/bench_distill.py --steps 5 --batch 1
    python benchmarks/bench_distill.py --gpu           # CUDA only: Wan2.1-1.3B shape, 480p x 81 frames

CPU: the shipped untrained tiny checkpoint (4 layers, 4 heads x 32), all layers converted,
latents (16, 3, 16, 16) = 192 tokens per sample, float32.
GPU (``--gpu``; skipped with a message when CUDA is missing): the published Wan2.1-1.3B config
with random weights (fp32 master weights, bf16 autocast, as ``m4v-convert`` trains), all 30
layers converted, 480x832 x 81 frames = latents (16, 21, 60, 104) = 32,760 tokens per sample,
optionally with ``--grad-checkpointing``.

Each stage runs ``--warmup`` untimed steps, then ``--steps`` timed steps through
``Trainer.fit`` (teacher forward, student forward/backward, AdamW step). Prints a table only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel  # noqa: E402
from m4v_convert.backbones.wan.distill import WanDistillAdapter  # noqa: E402
from m4v_convert.distill.calibration import CalibSpec, noised_batch, synthetic_samples  # noqa: E402
from m4v_convert.distill.stage1 import Stage1Task  # noqa: E402
from m4v_convert.distill.stage2 import Stage2Task  # noqa: E402
from m4v_convert.distill.trainer import StageSchedule, Trainer  # noqa: E402
from m4v_convert.recipes import load_recipe  # noqa: E402


def build(gpu: bool, device, seed: int = 0):
    """(teacher, latent shape (C, F, H, W), text length)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    if gpu:
        cfg = json.loads((ROOT / "recipes" / "configs" / "wan2.1-1.3b.json").read_text())
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        with torch.device(device):
            teacher = WanTransformer3DModel(**cfg)
        return teacher.eval(), (16, 21, 60, 104), 512
    shipped = ROOT / "checkpoints" / "wan2.1-tiny-untrained"
    if (shipped / "config.json").is_file():
        from m4v_convert.backbones.wan.load import load_wan_transformer

        teacher = load_wan_transformer(shipped, dtype=torch.float32, device=device)
    else:
        from m4v_convert.backbones.wan.testing import make_tiny_wan

        teacher = make_tiny_wan(seed=seed, num_layers=4, num_attention_heads=4, attention_head_dim=32,
                                in_channels=16, out_channels=16, text_dim=64, freq_dim=64, ffn_dim=256)
    return teacher.eval(), (16, 3, 16, 16), 16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="Wan2.1-1.3B shape at 480p on CUDA")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="samples per step (GPU default: 1)")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device on this machine; GPU benchmark skipped")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    batch = 1 if args.gpu and args.batch == 2 else args.batch

    teacher, (c, f, h, w), text_len = build(args.gpu, device)
    teacher.requires_grad_(False)
    cfg = dict(teacher.config)
    layers = list(range(cfg["num_layers"]))
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    student.convert_(layers, load_recipe("wan2.1").mmdim)
    student.requires_grad_(False)
    adapter = WanDistillAdapter(layers=layers, patch_size=tuple(cfg["patch_size"]))
    spec = CalibSpec(in_channels=c, text_dim=cfg["text_dim"], latent_frames=f, latent_height=h, latent_width=w,
                     text_len=text_len, flow_shift=3.0)
    samples = synthetic_samples(spec, batch, seed=0)
    gen = torch.Generator().manual_seed(0)

    def draw(step):
        return noised_batch(samples, spec, gen, device, torch.float32)

    blocks = adapter.mmdim_blocks(student)
    params = {n: p for n, p in student.named_parameters() if ".attn1.mmdim." in n}
    for p in params.values():
        p.requires_grad_(True)
    if args.grad_checkpointing:
        adapter.enable_gradient_checkpointing(student)
    trainer = Trainer(student, device=device, bf16=args.gpu, show_progress=False)
    tasks = {
        "stage 1 (attention transfer)": Stage1Task(blocks, lambda b: adapter.record(teacher, b), draw,
                                                    grad_checkpointing=args.grad_checkpointing,
                                                    counter=adapter.count),
        "stage 2 (end-to-end)": Stage2Task(teacher, student, adapter.feature_modules, draw, counter=adapter.count),
    }
    tokens = adapter.tokens_per_sample((c, f, h, w))
    name = "Wan2.1-1.3B shape, random weights" if args.gpu else "shipped tiny Wan2.1-layout model"
    print(f"{name}: {cfg['num_layers']} layers, {cfg['num_attention_heads']} heads x {cfg['attention_head_dim']}, "
          f"all layers converted; batch {batch} x {tokens} tokens; {device.type}"
          f"{', bf16 autocast' if args.gpu else ', float32, ' + str(torch.get_num_threads()) + ' threads'}"
          f"{', gradient checkpointing' if args.grad_checkpointing else ''}")
    print(f"{'stage':<30} {'s/step':>9} {'samples/s':>10} {'tokens/s':>12}")
    for title, task in tasks.items():
        trainer.fit(task, StageSchedule(steps=args.warmup, lr=1e-5), params)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = trainer.fit(task, StageSchedule(steps=args.steps, lr=1e-5), params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / max(out.steps_run, 1)
        mem = f"  peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"{title:<30} {dt:>9.3f} {batch / dt:>10.2f} {batch * tokens / dt:>12.0f}{mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
