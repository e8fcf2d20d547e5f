"""Does training in layer groups lose quality? The README's default conversion of the shipped trained
teacher with ``--layer-groups 1`` and ``--layer-groups 4`` (one layer per group: stage 1 per layer,
stage 2 by block-coordinate descent, one layer at a time), each measured with ``m4v-convert eval``
against the teacher, side by side (issue 38 part 2).

    python benchmarks/bench_layer_groups.py                 # ~25 min on 2 CPU cores
    python benchmarks/bench_layer_groups.py --steps 300 100 # shorter schedule

Prints the eval metrics of both and the stage-1 wall time; raw output goes in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "checkpoints" / "wan2.1-tiny-shapes-coded"
METRICS = ("pred_rel_error_mean", "psnr_db", "psnr_db_without_codes", "ssim", "adherence_delta_points")


def run(cmd: list[str]) -> float:
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *cmd], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: m4v-convert {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", nargs=2, type=int, default=[1200, 200], metavar=("STAGE1", "STAGE2"))
    ap.add_argument("--groups", nargs="+", type=int, default=[1, 4])
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.groups:
            out, ev = Path(tmp) / f"k{k}", Path(tmp) / f"eval-k{k}"
            seconds = run(["wan2.1", "--checkpoint", str(TEACHER), "--calib", str(TEACHER / "calib"), "--layers", "all",
                           "--distill-steps", str(args.steps[0]), "--stage2-steps", str(args.steps[1]), "--out", str(out),
                           "--layer-groups", str(k), "--threads", "1"])
            run(["eval", str(TEACHER), str(out), "--out", str(ev), "--threads", "1"])
            summary = json.loads((out / "conversion.json").read_text())
            metrics = json.loads((ev / "metrics.json").read_text())
            flat = metrics
            rows[k] = {"seconds": round(seconds), "stage1_seconds": summary["stages"]["stage1"].get("seconds"),
                       "stage2_seconds": summary["stages"]["stage2"].get("seconds"),
                       "error_after": summary["error_after"], "end_to_end_error": summary["end_to_end_error"],
                       **{m: flat.get(m) for m in METRICS}}
            print(f"--layer-groups {k}: {json.dumps(rows[k])}", flush=True)
    print("\n| --layer-groups | " + " | ".join(METRICS) + " | conversion s |")
    print("|---" * (len(METRICS) + 2) + "|")
    for k, r in rows.items():
        vals = " | ".join("-" if r[m] is None else f"{r[m]:.4g}" if isinstance(r[m], float) else str(r[m])
                          for m in METRICS)
        print(f"| {k} | {vals} | {r['seconds']} |")


if __name__ == "__main__":
    main()
