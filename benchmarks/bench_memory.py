"""Peak resident memory of a full-size conversion, against the checkpoint's bytes (issue 38).

Builds a full-size Wan2.1-1.3B in the diffusers layout (random float32 weights in 3 shards, as the
release; ``recipes/configs/wan2.1-1.3b.json``) and runs the conversion issue 38 measured, each
variant in a fresh process that reports its own peak RSS (``ru_maxrss``):

    python benchmarks/bench_memory.py                      # every variant below (about 35 min)
    python benchmarks/bench_memory.py --variants default layer-groups-4   # the two goals (about 17 min)
    python benchmarks/bench_memory.py --variants default   # one variant

Needs about 22 GB of free memory and 12 GB of disk; run it alone (no test suite beside it). Prints
peak RSS / checkpoint bytes per variant (for ``fsdp-2``, of the larger process); the goals are <= 2.2x
(default), <= 1.6x (--layer-groups 4) and <= 1.2x per process (fsdp-2, issue 39).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERT = ["--layers", "all", "--distill-steps", "2", "--stage2-steps", "1", "--batch-size", "1", "--threads", "2"]
VARIANTS = {"default": [], "layer-groups-4": ["--layer-groups", "4"],  # gradient checkpointing on (the recipe's)
            "no-grad-checkpointing": ["--no-grad-checkpointing"],
            "no-grad-checkpointing + layer-groups-4": ["--no-grad-checkpointing", "--layer-groups", "4"],
            # 2 processes, weights sharded (issue 39): the peak is the larger of the two processes' (each
            # on one thread, the 2 cores between them)
            "fsdp-2": ["--num-processes", "2", "--fsdp", "--threads", "1"],
            "fsdp-2 + layer-groups-4": ["--num-processes", "2", "--fsdp", "--threads", "1", "--layer-groups", "4"]}

LOAD = """
import resource, sys
from m4v_convert.backbones.wan.load import load_wan_transformer
model = load_wan_transformer(sys.argv[1])
print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} EXIT 0", flush=True)
"""

MAKE = """
import json, sys, torch
from diffusers import WanTransformer3DModel
cfg = json.load(open(sys.argv[1]))
torch.manual_seed(0)
model = WanTransformer3DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
model.save_pretrained(sys.argv[2], max_shard_size=total // 3 + 1)  # 3 shards, as the release
"""

RUN = """
import resource, runpy, sys
sys.argv = ["m4v-convert", *sys.argv[1:]]
try:
    runpy.run_path(%r, run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
# the launched processes of --num-processes (accelerate's launcher, its workers) are waited for:
# RUSAGE_CHILDREN's peak is the largest of theirs, one process's, not their sum
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(f"PEAK_RSS_KB {peak} EXIT {code}", flush=True)
""" % str(ROOT / "cli.py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "recipes" / "configs" / "wan2.1-1.3b.json")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "wan2.1-1.3b-random"
        t0 = time.time()
        subprocess.run([sys.executable, "-c", MAKE, str(args.config), str(ckpt)], check=True)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        print(f"checkpoint: {ckpt.name}, {len(list(ckpt.glob('*.safetensors')))} shards, {size / 1e9:.2f} GB "
              f"(made in {time.time() - t0:.0f} s)", flush=True)
        rows = []
        for name in ["load the teacher alone", *args.variants]:
            out = Path(tmp) / f"out-{name.replace(' ', '')}"
            cmd = ([sys.executable, "-c", LOAD, str(ckpt)] if name not in VARIANTS else
                   [sys.executable, "-c", RUN, "wan2.1", "--checkpoint", str(ckpt), "--out", str(out), *CONVERT,
                    *VARIANTS[name]])
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            seconds = time.time() - t0
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            peak = next((int(line.split()[1]) * 1024 for line in lines if line.startswith("PEAK_RSS_KB")), None)
            code = next((line.split()[3] for line in lines if line.startswith("PEAK_RSS_KB")), str(proc.returncode))
            plan = next((line for line in lines if line.startswith("memory plan:")), "memory plan: (none printed)")
            print(f"\n== {name}: {' '.join(CONVERT + VARIANTS[name]) if name in VARIANTS else 'load_wan_transformer'}",
                  flush=True)
            print("\n".join(lines[-6:]))
            if peak is None or code != "0":
                rows.append((name, None, seconds, f"failed (exit {code})"))
                continue
            rows.append((name, peak, seconds, plan))
        print("\n| variant | peak RSS (GB) | peak / checkpoint | seconds | the memory plan said |")
        print("|---|---|---|---|---|")
        for name, peak, seconds, note in rows:
            if peak is None:
                print(f"| {name} | - | - | {seconds:.0f} | {note} |")
            else:
                print(f"| {name} | {peak / 1e9:.2f} | {peak / size:.2f}x | {seconds:.0f} | {note} |")


if __name__ == "__main__":
    main()
