"""CPU benchmark of the SSD scan: chunked PyTorch path vs the step-by-step recurrence, and the
chunked path's time per token as the sequence grows (it should stay flat: linear in L).

    python benchmarks/bench_scan.py            # default run, well under a minute on 2 cores
    python benchmarks/bench_scan.py --quick    # a few seconds
    python benchmarks/bench_scan.py --compare-lengths 256 1024 --scale-lengths 1024 8192 --heads 8

Prints tables only; writes no files. Forward pass, float32, inference mode; the best of
``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from m4v_convert.ops import ssd_scan_chunked, ssd_scan_ref


def make_inputs(batch, L, heads, headdim, dstate, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, L, heads, headdim, generator=g),
        torch.rand(batch, L, heads, generator=g) * 0.1,
        -torch.rand(heads, generator=g),
        torch.randn(batch, L, groups, dstate, generator=g) / dstate**0.5,
        torch.randn(batch, L, groups, dstate, generator=g) / dstate**0.5,
    )


def best_time(fn, repeats, warmup=True):
    """(best wall time over ``repeats`` runs, output of the last run)."""
    if warmup:
        fn()
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--headdim", type=int, default=32)
    ap.add_argument("--dstate", type=int, default=32)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--compare-lengths", type=int, nargs="+", default=[256, 1024, 4096],
                    help="lengths for chunked vs step-by-step")
    ap.add_argument("--scale-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                    help="lengths for chunked time vs L")
    ap.add_argument("--chunk-sizes", type=int, nargs="*", default=[32, 64, 128, 256],
                    help="chunk sizes to compare at --chunk-sizes-length (none: skip the table)")
    ap.add_argument("--chunk-sizes-length", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny run: a few seconds")
    args = ap.parse_args(argv)
    if args.quick:
        args.compare_lengths, args.scale_lengths, args.repeats = [128, 512], [512, 1024, 2048], 1
        args.chunk_sizes, args.chunk_sizes_length = [64, 256], 1024
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = (f"batch={args.batch} heads={args.heads} headdim={args.headdim} dstate={args.dstate} "
             f"groups={args.groups} chunk={args.chunk_size}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 forward; {shape}")

    def chunked(inp):
        return lambda: ssd_scan_chunked(*inp, chunk_size=args.chunk_size)

    def stepwise(inp):
        # the oracle's loop over time, in float32 like the chunked path
        return lambda: ssd_scan_ref(*inp, compute_dtype_override=None)

    dims = (args.heads, args.headdim, args.dstate, args.groups)
    with torch.inference_mode():
        print("\nchunked vs step-by-step recurrence")
        print(f"{'L':>8} {'step-by-step ms':>16} {'chunked ms':>11} {'speed-up':>9} {'max |diff|':>11}")
        for L in args.compare_lengths:
            inp = make_inputs(args.batch, L, *dims)
            # the python loop has no warm-up effects worth a second pass over thousands of steps
            t_step, y_step = best_time(stepwise(inp), 1, warmup=L <= 512)
            t_chunk, y_chunk = best_time(chunked(inp), args.repeats)
            diff = (y_chunk - y_step).abs().max().item()
            print(f"{L:>8} {t_step * 1e3:>16.1f} {t_chunk * 1e3:>11.1f} {t_step / t_chunk:>8.1f}x {diff:>11.2e}")

        print("\nchunked scan vs sequence length (flat time per token = linear in L)")
        print(f"{'L':>8} {'ms':>10} {'us/token':>9} {'Mtok/s':>8}")
        for L in args.scale_lengths:
            inp = make_inputs(args.batch, L, *dims)
            t, _ = best_time(chunked(inp), args.repeats)
            tokens = args.batch * L
            print(f"{L:>8} {t * 1e3:>10.1f} {t / tokens * 1e6:>9.2f} {tokens / t / 1e6:>8.2f}")

        if args.chunk_sizes:
            L = args.chunk_sizes_length
            inp = make_inputs(args.batch, L, *dims)
            print(f"\nchunk size at L={L} (same result up to rounding; the intra-chunk part costs "
                  "O(L * chunk) per head)")
            print(f"{'chunk':>8} {'ms':>10} {'us/token':>9}")
            for cs in args.chunk_sizes:
                t, _ = best_time(lambda: ssd_scan_chunked(*inp, chunk_size=cs), args.repeats)
                print(f"{cs:>8} {t * 1e3:>10.1f} {t / (args.batch * L) * 1e6:>9.2f}")


if __name__ == "__main__":
    main()
