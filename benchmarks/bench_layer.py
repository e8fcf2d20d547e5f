"""One MM-DiM layer vs the softmax attention layer it replaces, side by side in one run.

The attention layer is Wan2.1's self-attention (Q/K/V/O projections, q/k RMSNorm across heads,
SDPA); the MM-DiM is what the wan2.1 recipe puts in its place (text sandwich with ``--text``
tokens, registers, zigzag, RoPE on B/C, temporal branch), initialized from that attention.
Both run forward in inference mode at growing token counts; the table prints times, the ratio
attention / MM-DiM, the MM-DiM time per token (flat = linear growth) and the crossover.

    python benchmarks/bench_layer.py                    # CPU default: d=512, 1k..32k tokens
    python benchmarks/bench_layer.py --quick            # a few seconds
    python benchmarks/bench_layer.py --device cuda --dtype bfloat16 --dim 5120 --heads 40 --tokens 75600

Prints tables only. Record GPU numbers in benchmarks/RESULTS.md (device, date, command, output).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m4v_convert.layers.init_from_attention import AttentionWeights, mmdim_from_attention  # noqa: E402
from m4v_convert.layers.mmdim import MMDiMConfig  # noqa: E402
from m4v_convert.layers.recompose import VideoLayout  # noqa: E402
from m4v_convert.recipes import load_recipe  # noqa: E402


def grid_for(tokens: int, frames: int) -> tuple[int, int, int]:
    """A (T, H, W) latent token grid with about ``tokens`` tokens and aspect ~ 480x832."""
    per_frame = max(1, tokens // frames)
    h = max(1, round(math.sqrt(per_frame * 30 / 52)))
    w = max(1, per_frame // h)
    return frames, h, w


class AttentionLayer(torch.nn.Module):
    """Wan-style self-attention: q/k/v/o with biases, RMSNorm across heads on q/k, SDPA."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(d, d) for _ in range(4))
        self.norm_q, self.norm_k = torch.nn.RMSNorm(d, eps=1e-6), torch.nn.RMSNorm(d, eps=1e-6)

    def forward(self, x):
        b, n, d = x.shape
        q = self.norm_q(self.to_q(x)).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.norm_k(self.to_k(x)).view(b, n, self.heads, -1).transpose(1, 2)
        v = self.to_v(x).view(b, n, self.heads, -1).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(o.transpose(1, 2).reshape(b, n, d))

    def weights(self) -> AttentionWeights:
        hd = self.to_q.out_features // self.heads
        return AttentionWeights(
            heads=self.heads, head_dim=hd, q_weight=self.to_q.weight, k_weight=self.to_k.weight,
            v_weight=self.to_v.weight, out_weight=self.to_out.weight, q_bias=self.to_q.bias,
            k_bias=self.to_k.bias, v_bias=self.to_v.bias, out_bias=self.to_out.bias,
            q_norm_weight=self.norm_q.weight, k_norm_weight=self.norm_k.weight)


def timed(fn, repeats: int, device) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--frames", type=int, default=16, help="latent frames of the token grid")
    ap.add_argument("--text", type=int, default=64, help="text tokens in the MM-DiM sandwich")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--recipe", default="wan2.1")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.dim, args.repeats = [512, 1024, 2048], 256, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    attn = AttentionLayer(args.dim, args.heads).to(device, dtype).eval()
    mmdim_settings = dict(load_recipe(args.recipe).mmdim)
    cfg = MMDiMConfig(d_model=args.dim, nheads=args.heads, headdim=args.dim // args.heads, layer_index=1,
                      **mmdim_settings)
    block = mmdim_from_attention(cfg, attn.weights(), device=device, dtype=dtype).eval()
    # the same block with the scan in one direction only (what a causal recipe uses): the reversed
    # scan's cost, measured side by side
    one_way = None
    if cfg.bidirectional:
        one_way = mmdim_from_attention(MMDiMConfig(**{**cfg.__dict__, "bidirectional": False}), attn.weights(),
                                       device=device, dtype=dtype).eval()
    hd = args.dim // args.heads

    print(f"device {device} ({torch.get_num_threads()} threads)  dtype {args.dtype}  d={args.dim}  "
          f"heads={args.heads}x{hd}  text={args.text}  recipe {args.recipe}  torch {torch.__version__}")
    print(f"{'tokens':>8} {'grid':>12} {'attention s':>12} {'MM-DiM s':>10} {'attn/MM-DiM':>12} "
          f"{'MM-DiM us/token':>16}" + (f" {'forward-only s':>15} {'bidir/fwd':>10}" if one_way else ""))
    rows = []
    for n in args.tokens:
        t, h, w = grid_for(n, args.frames)
        layout = VideoLayout.single(t, h, w)
        n_real = layout.num_tokens
        x = torch.randn(1, n_real, args.dim, device=device, dtype=dtype)
        text = torch.randn(1, args.text, args.dim, device=device, dtype=dtype)
        ang = torch.randn(n_real, hd // 2, device=device).repeat_interleave(2, -1)
        rot = (ang.cos(), ang.sin())
        with torch.inference_mode():
            t_attn = timed(lambda: attn(x), args.repeats, device)
            t_mm = timed(lambda: block(x, layout, text, rotary=rot), args.repeats, device)
            t_fwd = timed(lambda: one_way(x, layout, text, rotary=rot), args.repeats, device) if one_way else None
        rows.append((n_real, t_attn, t_mm))
        print(f"{n_real:>8} {f'{t}x{h}x{w}':>12} {t_attn:>12.4f} {t_mm:>10.4f} {t_attn / t_mm:>11.2f}x "
              f"{1e6 * t_mm / n_real:>16.2f}" + (f" {t_fwd:>15.4f} {t_mm / t_fwd:>9.2f}x" if one_way else ""))
    faster = [n for n, ta, tm in rows if tm < ta]
    print(f"crossover: MM-DiM faster than attention from {faster[0]} tokens" if faster
          else "crossover: MM-DiM never faster in this range")
    if len(rows) >= 2:
        (n0, _, m0), (n1, _, m1) = rows[0], rows[-1]
        print(f"MM-DiM growth {n0}->{n1} tokens: time x{m1 / m0:.2f} for tokens x{n1 / n0:.2f} "
              f"(linear = equal); attention time x{rows[-1][1] / rows[0][1]:.2f}")
    print("ratios (attention / MM-DiM): " + ", ".join(f"{n}: {ta / tm:.2f}x" for n, ta, tm in rows))


if __name__ == "__main__":
    main()
