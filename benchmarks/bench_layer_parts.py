"""Where one MM-DiM layer's time goes on CPU, part by part, for before/after comparisons.

Times (best of ``--repeats`` after a warm-up, inference mode) of the block's pieces through their
public functions: re-composition, its inverse, RoPE on B and C, the temporal branch, the mixer and
the whole block. ``--repo`` imports ``m4v_convert`` from another checkout (e.g. an older commit
unpacked with ``git archive``), so two versions can be timed alternately on the same machine:

    git archive 3a73f56 | tar -x -C /tmp/base
    python benchmarks/bench_layer_parts.py --repo /tmp/base; python benchmarks/bench_layer_parts.py

Prints one table; one thread by default (steadier on shared cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--grid", type=int, nargs=3, default=[16, 22, 23], metavar=("T", "H", "W"))
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.repo.resolve()))

    import torch

    from m4v_convert.layers import mixer as mixer_mod
    from m4v_convert.layers.mmdim import MMDiM, MMDiMConfig
    from m4v_convert.layers.recompose import VideoLayout

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, heads = args.dim, args.heads
    hd = d // heads
    cfg = MMDiMConfig(d_model=d, nheads=heads, headdim=hd, layer_index=1, bc_norm="across_groups", rotary=True,
                      temporal_causal=False, temporal_dim=32, temporal_heads=4)
    block = MMDiM(cfg).eval()
    layout = VideoLayout.single(*args.grid)
    n = layout.num_tokens
    video, text = torch.randn(1, n, d), torch.randn(1, args.text, d)
    ang = torch.randn(n, hd // 2).repeat_interleave(2, -1)
    rot = (ang.cos(), ang.sin())
    rc = block.recomposer(layout)
    parts = {}
    with torch.inference_mode():
        seq = rc.forward(video, block.register_tokens, text, None)
        lz = args.text
        one, zero = torch.ones(hd), torch.zeros(hd)
        mixer_rot = (rc.permute_rows(rot[0], one, lz), rc.permute_rows(rot[1], zero, lz))
        bc = torch.randn(1, seq.shape[1], heads, hd)
        parts["re-composition"] = best_ms(lambda: rc.forward(video, block.register_tokens, text, None), args.repeats)
        parts["inverse"] = best_ms(lambda: rc.inverse(seq, text, None), args.repeats)
        parts["RoPE tables (permute)"] = best_ms(
            lambda: (rc.permute_rows(rot[0], one, lz), rc.permute_rows(rot[1], zero, lz)), args.repeats)
        parts["RoPE on B and C"] = best_ms(
            lambda: [mixer_mod.apply_rotary_interleaved(bc, *mixer_rot) for _ in range(2)], args.repeats)
        parts["temporal branch"] = best_ms(lambda: block.temporal(video, layout, None), args.repeats)
        parts["mixer"] = best_ms(lambda: block.mixer(seq, rotary=mixer_rot), args.repeats)
        parts["whole block"] = best_ms(lambda: block(video, layout, text, None, rot), args.repeats)
    print(f"repo {args.repo}  torch {torch.__version__}  {torch.get_num_threads()} thread(s)  d={d} heads={heads}x{hd} "
          f"grid {tuple(args.grid)} ({n} tokens) text {args.text}  L'={seq.shape[1]}  best of {args.repeats}")
    for name, ms in parts.items():
        print(f"  {name:<24} {ms:>9.2f} ms")


if __name__ == "__main__":
    main()
