"""The memory plan of a full-size conversion, without the memory: ``m4v-convert wan2.1 --dry-run`` on a
Wan2.1 checkpoint whose safetensors file is sparse (a real header, zero-filled data that takes no
disk: the plan reads headers only, never a weight).

    python benchmarks/bench_memory_plan.py                     # 1.3B, the command issue 38 measured
    python benchmarks/bench_memory_plan.py --config recipes/configs/wan2.1-14b.json -- --batch-size 1

Prints the plan (estimated peak per process, by part). Compare with a measured peak of the same
command (benchmarks/RESULTS.md keeps both).
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


def sparse_checkpoint(config_path: Path, folder: Path) -> int:
    """config.json + a sparse diffusion_pytorch_model.safetensors of the model's float32 shapes; returns its bytes."""
    import torch
    from diffusers import WanTransformer3DModel

    cfg = json.loads(Path(config_path).read_text())
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    header, offset = {}, 0
    for key, t in model.state_dict().items():
        n = t.numel() * 4
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)  # a hole: no disk, reads as zeros
    (folder / "config.json").write_text(json.dumps(cfg))
    return offset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "recipes" / "configs" / "wan2.1-1.3b.json")
    ap.add_argument("flags", nargs="*", help="conversion flags after --, default: " + " ".join(DEFAULT_ARGS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "checkpoint"
        size = sparse_checkpoint(args.config, ckpt)
        cmd = [sys.executable, str(ROOT / "cli.py"), "wan2.1", "--checkpoint", str(ckpt), "--out", str(Path(tmp) / "out"),
               *(args.flags or DEFAULT_ARGS), "--dry-run"]
        print(f"checkpoint {args.config.name}: {size / 1e9:.2f} GB of float32 weights (sparse file)")
        print("$ m4v-convert " + " ".join(cmd[2:]))
        sys.exit(subprocess.run(cmd, cwd=ROOT).returncode)


if __name__ == "__main__":
    main()
