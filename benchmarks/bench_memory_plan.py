"""The memory plan of a full-size conversion, without the memory: ``m4v-convert wan2.1 --dry-run`` on a
Wan2.1 checkpoint whose safetensors shards are sparse (a real header, zero-filled data that takes no
disk: the plan reads headers only, never a weight).

    python benchmarks/bench_memory_plan.py                     # 1.3B, the command issue 38 measured
    python benchmarks/bench_memory_plan.py --config recipes/configs/wan2.1-14b.json -- --batch-size 1
    python benchmarks/bench_memory_plan.py --config recipes/configs/wan2.1-14b.json --video 81x720x1280 \
        --as-cuda 80 -- --layers all --batch-size 1 --grad-checkpointing --dtype bfloat16

Prints the plan (estimated peak per process, by part). Compare with a measured peak of the same
command (benchmarks/RESULTS.md keeps both).

``--video FxHxW`` calibrates on samples of that video size (a --calib folder of zero latents, 512 text
tokens, and a copy of the recipe with one sample per held-out batch); ``--as-cuda GB`` plans the run
as on a CUDA device with GB free (everything is planned on the meta device, so no GPU is needed: the
plan then counts CUDA's AdamW temporaries and bf16 autocast, and no CPU load copy or allocator reserve).
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARGS = ["--layers", "all", "--distill-steps", "2", "--stage2-steps", "1", "--batch-size", "1", "--threads", "2"]


SHARD_BYTES = 4_000_000_000  # safetensors maps a whole file: shards a 24 GB machine can map one at a time


def sparse_checkpoint(config_path: Path, folder: Path) -> int:
    """config.json + sparse safetensors shards (and their index) of the model's float32 shapes; returns
    the weights' bytes."""
    import torch
    from diffusers import WanTransformer3DModel

    cfg = json.loads(Path(config_path).read_text())
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    shards, current = [], []
    for key, t in model.state_dict().items():
        if current and sum(n for _, _, n in current) + t.numel() * 4 > SHARD_BYTES:
            shards.append(current)
            current = []
        current.append((key, list(t.shape), t.numel() * 4))
    shards.append(current)
    folder.mkdir(parents=True, exist_ok=True)
    total, weight_map = 0, {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for key, shape, n in shard:
            header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
            weight_map[key] = name
            offset += n
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(8 + len(raw) + offset)  # a hole: no disk, reads as zeros
        total += offset
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "recipes" / "configs" / "wan2.1-1.3b.json")
    ap.add_argument("--video", help="calibrate on FRAMESxHEIGHTxWIDTH pixels, e.g. 81x720x1280")
    ap.add_argument("--as-cuda", type=float, metavar="GB", help="plan as on a CUDA device with GB free")
    ap.add_argument("flags", nargs="*", help="conversion flags after --, default: " + " ".join(DEFAULT_ARGS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "checkpoint"
        size = sparse_checkpoint(args.config, ckpt)
        extra = video_calibration(args.config, args.video, Path(tmp)) if args.video else []
        argv = ["wan2.1", "--checkpoint", str(ckpt), "--out", str(Path(tmp) / "out"), *(args.flags or DEFAULT_ARGS),
                *extra, "--dry-run"]
        print(f"checkpoint {args.config.name}: {size / 1e9:.2f} GB of float32 weights (sparse files)")
        print("$ m4v-convert " + " ".join(argv) + (f"   (planned as on CUDA, {args.as_cuda:g} GB free)"
                                                   if args.as_cuda else ""), flush=True)
        if args.as_cuda:
            sys.exit(plan_as_cuda(argv, args.as_cuda))
        sys.exit(subprocess.run([sys.executable, str(ROOT / "cli.py"), *argv], cwd=ROOT).returncode)


def video_calibration(config_path: Path, video: str, folder: Path) -> list[str]:
    """--calib of two zero samples of ``video`` (FxHxW pixels) and --recipe: wan2.1 with batches of one."""
    import torch
    import yaml
    from safetensors.torch import save_file

    frames, height, width = (int(v) for v in video.lower().split("x"))
    cfg = json.loads(Path(config_path).read_text())
    calib = folder / "calib"
    calib.mkdir()
    for i in range(2):
        save_file({"latents": torch.zeros(cfg["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8),
                   "text_embeds": torch.zeros(512, cfg["text_dim"])}, str(calib / f"sample-{i}.safetensors"))
    recipe = yaml.safe_load((ROOT / "recipes" / "wan2.1.yaml").read_text())
    recipe["calib"].update(batch_size=1, eval_batches=1, num_samples=2)
    path = folder / "wan2.1-one-sample-batches.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return ["--calib", str(calib), "--recipe", str(path)]


def plan_as_cuda(argv: list[str], free_gb: float) -> int:
    """The conversion's --dry-run in this process, its device taken to be CUDA with ``free_gb`` free."""
    import torch
    from typer.testing import CliRunner

    import m4v_convert.jobs.memory as memory
    import m4v_convert.jobs.plan as plan

    sys.path.insert(0, str(ROOT))
    from cli import app

    plan.resolve_device = lambda name: torch.device("cuda")
    memory.available_bytes = lambda device: int(free_gb * 1e9)
    res = CliRunner().invoke(app, argv)
    print(res.output)
    return res.exit_code


if __name__ == "__main__":
    main()
