"""Issue #6 benchmark: attention vs MM-DiM side by side in one run, ratios printed last.

Sections (all in one process, same device, same dtype):

* ``layer``: one self-attention layer vs its MM-DiM replacement (initialized from it):
  Wan2.1-14B at 720x1280x81 (75,600 tokens, d=5120, 40 heads), Wan2.1-1.3B at 480x832x81
  (32,760 tokens, d=1536, 12 heads), PyramidFlow miniFLUX single block at the 768p last
  autoregressive unit (15,360 video + 128 text tokens, d=1920, 30 heads x 64). The Wan attention
  is diffusers' own ``WanAttention`` (q/k/v/o, q/k RMSNorm, RoPE, SDPA); the PyramidFlow one has
  the same pieces with per-head q/k norms (its single blocks fold the output projection into
  ``proj_out``: the d x d attention share of it is counted here). On CUDA each attention is timed
  under the cuDNN and the flash SDPA backends (``torch.nn.attention.sdpa_kernel``); the SDPA
  kernel alone is timed as well. PyramidFlow's block-causal mask is not applied (the fused
  backends take no arbitrary mask): its attention numbers are those of full attention.
* ``step``: one transformer forward of a Wan2.1-1.3B-shaped model (diffusers
  ``WanTransformer3DModel`` from recipes/configs/wan2.1-1.3b.json, random weights) vs the same
  model with every ``attn1`` converted (recipe wan2.1), at 81 frames and at 2x, 4x the frames.
* ``scan``: the SSD scan at the MM-DiM shapes (one SSM head per attention head, P = N = 128);
  achieved bandwidth = bytes of x, dt, B, C read + y written / time, against the device's
  measured copy bandwidth (bytes read + written by a large tensor copy).

Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` during one call, and that peak
minus what was allocated before the call (the call's own working memory). On CPU memory is not
measured ("n/a").

Timing: warm-up calls first (Triton compiles and autotunes there), then ``--repeats`` timed
calls; CUDA events on GPU, ``perf_counter`` on CPU; best and median are kept, the tables show
the best. Forward passes in ``torch.inference_mode``.

    python benchmarks/bench_gpu.py                       # full sizes on CUDA, --cpu-small without
    python benchmarks/bench_gpu.py --cpu-small           # reduced sizes (< 60 s on 2 cores)
    python benchmarks/bench_gpu.py --sections layer scan --json out/bench_gpu.json

On a GPU machine carry the mamba-ssm and diffusers wheels (shared/gpu/make-wheels.sh) so the
MM-DiM runs the Triton scan and gated RMSNorm; the header says which backends were used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m4v_convert.layers.init_from_attention import AttentionWeights, mmdim_from_attention  # noqa: E402
from m4v_convert.layers.mmdim import MMDiMConfig  # noqa: E402
from m4v_convert.layers.recompose import FrameBlock, VideoLayout  # noqa: E402
from m4v_convert.ops import select_ssd_backend, ssd_scan, triton_scan_error  # noqa: E402
from m4v_convert.ops.gated_rmsnorm import select_norm_backend, triton_rmsnorm_error  # noqa: E402

# ----------------------------------------------------------------------------- cases

WAN_TEXT = 512  # T5 tokens, zero-padded by the pipeline
WAN_CONFIG_1_3B = ROOT / "recipes" / "configs" / "wan2.1-1.3b.json"

# name -> (kind, d_model, heads, video frame blocks (frames, h, w, register), text tokens)
FULL_LAYERS = {
    "wan2.1-14b-720p": ("wan", 5120, 40, [(21, 45, 80, 0)], WAN_TEXT),
    "wan2.1-1.3b-480p": ("wan", 1536, 12, [(21, 30, 52, 0)], WAN_TEXT),
    "pyramidflow-768p-last-unit": ("pyramidflow", 1920, 30,
                                   [(28, 12, 20, 0), (1, 24, 40, 1), (1, 48, 80, 2), (1, 48, 80, 2)], 128),
}
SMALL_LAYERS = {
    "wan2.1-14b-720p": ("wan", 512, 4, [(6, 12, 20, 0)], 32),
    "wan2.1-1.3b-480p": ("wan", 256, 2, [(6, 10, 16, 0)], 32),
    "pyramidflow-768p-last-unit": ("pyramidflow", 256, 4,
                                   [(4, 3, 5, 0), (1, 6, 10, 1), (1, 12, 20, 2), (1, 12, 20, 2)], 16),
}
# the small model of --cpu-small: the 1.3B layout at toy width and depth
SMALL_STEP_OVERRIDES = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 64, "ffn_dim": 256,
                        "text_dim": 64, "freq_dim": 32}
FULL_STEP = {"frames": [81, 161, 321], "height": 480, "width": 832, "text": WAN_TEXT, "valid_text": 64}
SMALL_STEP = {"frames": [9, 17, 33], "height": 128, "width": 128, "text": 16, "valid_text": 8}

PYRAMIDFLOW_MMDIM = {"bc_norm": "per_group", "rotary": True, "conv_activation": "identity", "num_registers": 3,
                     "text_sandwich": True, "registers": True, "zigzag": True, "temporal": True,
                     "temporal_causal": True, "temporal_grid": 2, "temporal_dim": 32, "temporal_heads": 4}

TARGETS = {"layer": ("wan2.1-14b-720p", 6.0), "step": (81, 2.2), "scan": 0.60}  # issue 35's targets


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device, warmup: int, repeats: int) -> dict:
    """Best and median milliseconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"best_ms": min(times), "median_ms": statistics.median(times), "all_ms": times}


def peak_memory(fn, device: torch.device) -> dict:
    """CUDA: peak allocated during one call, and that peak minus what was allocated before it."""
    if device.type != "cuda":
        return {"peak_bytes": None, "working_bytes": None, "note": "not measured on CPU"}
    sync(device)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "working_bytes": peak - before}


def fmt_mem(m: dict) -> str:
    if m.get("peak_bytes") is None:
        return "n/a"
    return f"{m['peak_bytes'] / 2**30:.2f} ({m['working_bytes'] / 2**30:.2f})"


def sdpa_backends(device: torch.device) -> list[tuple[str, object]]:
    """(name, context factory) per SDPA backend to time."""
    if device.type != "cuda":
        return [("default", contextlib.nullcontext)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return [("cudnn", lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)),
            ("flash", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- layers


class PyramidFlowSingleAttention(nn.Module):
    """The attention of a miniFLUX single-stream block: to_q/k/v with biases, per-head RMSNorm on
    q/k, RoPE on q/k, SDPA, plus the d x d share of ``proj_out`` that acts on the attention."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm_q, self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6), nn.RMSNorm(self.head_dim, eps=1e-6)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin):
        b, n, d = x.shape
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.heads, -1)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.heads, -1)))
        v = self.to_v(x).unflatten(-1, (self.heads, -1))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out(o.transpose(1, 2).reshape(b, n, d))

    def weights(self) -> AttentionWeights:
        return AttentionWeights(
            heads=self.heads, head_dim=self.head_dim, q_weight=self.to_q.weight, k_weight=self.to_k.weight,
            v_weight=self.to_v.weight, out_weight=self.out.weight, q_bias=self.to_q.bias, k_bias=self.to_k.bias,
            v_bias=self.to_v.bias, q_norm_weight=self.norm_q.weight, k_norm_weight=self.norm_k.weight)


def rope(x, cos, sin):
    """Interleaved-pair RoPE as diffusers applies it; x (b, n, h, hd), cos/sin (n, hd)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def build_layer_case(name, spec, device, dtype, recipe_mmdim):
    """(attention callable, MM-DiM callable, sdpa-only callable, info) for one layer case."""
    kind, d, heads, blocks, text_len = spec
    hd = d // heads
    layout = VideoLayout(tuple(FrameBlock(*b) for b in blocks))
    n = layout.num_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, n, d, generator=gen, device=device).to(device, dtype)
    text = torch.randn(1, text_len, d, generator=gen, device=device).to(device, dtype)
    if kind == "wan":
        from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

        from m4v_convert.backbones.wan.model import WanSelfAttentionToMMDiM, attention_weights, wan_rotary_to_mmdim

        with torch.device(device):
            attn = WanAttention(dim=d, heads=heads, dim_head=hd, eps=1e-6, processor=WanAttnProcessor()).to(dtype).eval()
            t, h, w = blocks[0][:3]
            rotary = WanRotaryPosEmbed(hd, (1, 2, 2), 1024)(torch.empty(1, 1, t, 2 * h, 2 * w))
        rotary = tuple(r.float() for r in rotary)  # Wan keeps `rope` in fp32 (_keep_in_fp32_modules)
        cfg = WanSelfAttentionToMMDiM(mmdim=dict(recipe_mmdim)).block_config(attn, 1)
        block = mmdim_from_attention(cfg, attention_weights(attn), device=device, dtype=dtype).eval()
        mm_rotary = wan_rotary_to_mmdim(rotary)

        def run_attn():
            return attn(x, None, None, rotary)

        def run_mmdim():
            return block(x, layout, text, None, mm_rotary)
    else:
        attn = PyramidFlowSingleAttention(d, heads).to(device, dtype).eval()
        ang = torch.rand(n, hd // 2, generator=gen, device=device).repeat_interleave(2, -1).to(device) * 6.28
        cos, sin = ang.cos(), ang.sin()
        cos_d, sin_d = cos.to(dtype), sin.to(dtype)
        cfg = MMDiMConfig(d_model=d, nheads=heads, headdim=hd, layer_index=1, **PYRAMIDFLOW_MMDIM)
        block = mmdim_from_attention(cfg, attn.weights(), device=device, dtype=dtype).eval()

        def run_attn():
            return attn(x, cos_d, sin_d)

        def run_mmdim():
            return block(x, layout, text, None, (cos, sin))

    q, k, v = (torch.randn(1, heads, n, hd, generator=gen, device=device).to(device, dtype) for _ in range(3))

    def run_sdpa():
        return F.scaled_dot_product_attention(q, k, v)

    seq_len = block.recomposer(layout).sequence_length(text_len)
    probe = x.new_empty(1, 1, heads, hd)
    info = {"kind": kind, "d_model": d, "heads": heads, "head_dim": hd, "video_tokens": n, "text_tokens": text_len,
            "mmdim_sequence": seq_len, "scan_backend": select_ssd_backend(probe, cfg.chunk_size),
            "norm_backend": select_norm_backend(probe, hd)}
    return run_attn, run_mmdim, run_sdpa, info


def section_layer(args, device, dtype, results):
    from m4v_convert.recipes import load_recipe

    recipe_mmdim = dict(load_recipe("wan2.1").mmdim)
    cases = SMALL_LAYERS if args.cpu_small else FULL_LAYERS
    print("\n== one layer: attention vs MM-DiM (forward, best of "
          f"{args.repeats}; memory GiB: peak (call's own))")
    print(f"{'case':<28} {'tokens':>7} {'what':<22} {'ms':>10} {'median':>10} {'memory':>14}")
    for name in args.layer_cases or list(cases):
        spec = cases[name]
        row = results.setdefault("layer", {}).setdefault(name, {})
        try:
            run_attn, run_mmdim, run_sdpa, info = build_layer_case(name, spec, device, dtype, recipe_mmdim)
            row["info"] = info
            with torch.inference_mode():
                n = info["video_tokens"]
                for backend, ctx in sdpa_backends(device):
                    for what, fn in ((f"attention [{backend}]", run_attn), (f"SDPA only [{backend}]", run_sdpa)):
                        try:
                            with ctx():
                                t = bench(fn, device, args.warmup, args.repeats)
                                t["memory"] = peak_memory(fn, device)
                        except Exception as e:  # noqa: BLE001 - a backend may not support the shape
                            row[what] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
                            print(f"{name:<28} {n:>7} {what:<22} {'failed':>10}  {row[what]['error'][:60]}")
                            continue
                        row[what] = t
                        print(f"{name:<28} {n:>7} {what:<22} {t['best_ms']:>10.2f} {t['median_ms']:>10.2f} "
                              f"{fmt_mem(t['memory']):>14}")
                t = bench(run_mmdim, device, args.warmup, args.repeats)
                t["memory"] = peak_memory(run_mmdim, device)
                row["MM-DiM"] = t
                print(f"{name:<28} {n:>7} {'MM-DiM':<22} {t['best_ms']:>10.2f} {t['median_ms']:>10.2f} "
                      f"{fmt_mem(t['memory']):>14}   (L'={info['mmdim_sequence']}, scan {info['scan_backend']}, "
                      f"norm {info['norm_backend']})")
        except Exception as e:  # noqa: BLE001 - keep the other sections running
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"{name:<28} FAILED: {row['error'][:200]}")
            traceback.print_exc(limit=3)
        free(device)


# ----------------------------------------------------------------------------- full step


def wan_step_config(args) -> dict:
    cfg = {k: v for k, v in json.loads(WAN_CONFIG_1_3B.read_text()).items() if not k.startswith("_")}
    if args.cpu_small:
        cfg.update(SMALL_STEP_OVERRIDES)
    return cfg


def cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` except the modules diffusers keeps in fp32 when loading with ``torch_dtype``."""
    model = model.to(dtype)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype != torch.float32 and keep:
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if keep.intersection(name.split(".")) and t.is_floating_point():
                t.data = t.data.float()
    return model


def section_step(args, device, dtype, results):
    from diffusers import WanTransformer3DModel

    from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
    from m4v_convert.recipes import load_recipe

    sizes = SMALL_STEP if args.cpu_small else FULL_STEP
    cfg = wan_step_config(args)
    out = results.setdefault("step", {"config": cfg})
    torch.manual_seed(0)
    with torch.device(device):
        teacher = WanTransformer3DModel(**cfg)
    teacher = cast_like_from_pretrained(teacher, dtype).eval()
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    student.convert_(list(range(cfg["num_layers"])), dict(load_recipe("wan2.1").mmdim))
    student = student.eval()  # MM-DiM blocks are built in the dtype of the attention they replace
    params = sum(p.numel() for p in teacher.parameters())
    out["params"] = {"original": params, "converted": sum(p.numel() for p in student.parameters())}
    print(f"\n== one denoising step (transformer forward): Wan2.1-1.3B-shaped, {cfg['num_layers']} layers, "
          f"d={cfg['num_attention_heads'] * cfg['attention_head_dim']}, {params / 1e9:.2f}B params; "
          f"original vs all attn1 converted (best of {min(args.repeats, 3)})")
    print(f"{'frames':>7} {'latent':>14} {'tokens':>8} {'model':<22} {'ms':>10} {'median':>10} {'memory':>14}")
    frames_list = args.step_frames or sizes["frames"]
    for frames in frames_list:
        lat = ((frames - 1) // 4 + 1, sizes["height"] // 8, sizes["width"] // 8)
        tokens = lat[0] * (lat[1] // 2) * (lat[2] // 2)
        row = out.setdefault(str(frames), {"latent": lat, "tokens": tokens})
        gen = torch.Generator(device=device).manual_seed(frames)
        try:
            hidden = torch.randn(1, cfg["in_channels"], *lat, generator=gen, device=device).to(device, dtype)
            text = torch.randn(1, sizes["text"], cfg["text_dim"], generator=gen, device=device)
            text[:, sizes["valid_text"]:] = 0  # pipeline padding
            text = text.to(device, dtype)
            timestep = torch.tensor([500.0], device=device)
            kw = {"hidden_states": hidden, "timestep": timestep, "encoder_hidden_states": text, "return_dict": False}
            with torch.inference_mode():
                variants = [(f"original [{b}]", teacher, ctx) for b, ctx in sdpa_backends(device)]
                variants.append(("converted", student, contextlib.nullcontext))
                for what, model, ctx in variants:
                    try:
                        with ctx():
                            t = bench(lambda m=model: m(**kw), device, min(args.warmup, 1), min(args.repeats, 3))
                            t["memory"] = peak_memory(lambda m=model: m(**kw), device)
                    except Exception as e:  # noqa: BLE001
                        row[what] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
                        print(f"{frames:>7} {str(lat):>14} {tokens:>8} {what:<22} failed: {row[what]['error'][:80]}")
                        free(device)
                        continue
                    row[what] = t
                    print(f"{frames:>7} {str(lat):>14} {tokens:>8} {what:<22} {t['best_ms']:>10.1f} "
                          f"{t['median_ms']:>10.1f} {fmt_mem(t['memory']):>14}")
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"{frames:>7} FAILED: {row['error'][:200]}")
        free(device)
    del teacher, student
    free(device)


# ----------------------------------------------------------------------------- scan bandwidth


def copy_bandwidth(device, args) -> dict:
    nbytes = (64 if args.cpu_small else 4096) * 2**20
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, args.warmup, max(args.repeats, 5))
    moved = 2 * nbytes  # read + write
    return {"bytes_moved": moved, **t, "GBps": moved / (t["best_ms"] * 1e-3) / 1e9}


def section_scan(args, device, dtype, results):
    out = results.setdefault("scan", {})
    cp = copy_bandwidth(device, args)
    out["copy"] = cp
    print(f"\n== SSD scan bandwidth vs copy (copy: {cp['bytes_moved'] / 1e9:.2f} GB moved in {cp['best_ms']:.3f} ms "
          f"= {cp['GBps']:.0f} GB/s)")
    print(f"{'shape':<22} {'L':>7} {'h x p, n':>12} {'backend':>8} {'ms':>9} {'GB':>7} {'GB/s':>8} {'of copy':>8} "
          f"{'memory':>14}")
    if args.cpu_small:
        shapes = {"small-a": (4096, 4, 64, 64), "small-b": (4096, 8, 64, 64)}
    else:  # L = video + registers (frames + 1) + 2 x 512 text tokens, as the MM-DiM layer scans it
        shapes = {"wan2.1-1.3b-480p": (32760 + 22 + 1024, 12, 128, 128),
                  "wan2.1-14b-720p": (75600 + 22 + 1024, 40, 128, 128)}
    chunk = 64 if args.cpu_small else 256
    for name, (L, h, p, n) in shapes.items():
        gen = torch.Generator(device=device).manual_seed(L)
        x = torch.randn(1, L, h, p, generator=gen, device=device).to(device, dtype)
        dt = torch.randn(1, L, h, generator=gen, device=device).to(device, dtype)
        A = -torch.rand(h, generator=gen, device=device).to(device) - 0.1
        B = (torch.randn(1, L, h, n, generator=gen, device=device) / math.sqrt(n)).to(device, dtype)
        C = (torch.randn(1, L, h, n, generator=gen, device=device) / math.sqrt(n)).to(device, dtype)
        D = torch.zeros(h, device=device, dtype=dtype)
        dt_bias = torch.full((h,), -4.6, device=device, dtype=dtype)

        def run():
            return ssd_scan(x, dt, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias, dt_softplus=True)

        try:
            with torch.inference_mode():
                t = bench(run, device, args.warmup, max(args.repeats, 5))
                t["memory"] = peak_memory(run, device)
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name:<22} FAILED: {out[name]['error'][:200]}")
            continue
        es = x.element_size()
        moved = es * (2 * x.numel() + dt.numel() + B.numel() + C.numel())  # x, dt, B, C read; y written
        gbps = moved / (t["best_ms"] * 1e-3) / 1e9
        backend = select_ssd_backend(x, chunk)
        out[name] = {"L": L, "heads": h, "headdim": p, "dstate": n, "chunk": chunk, "backend": backend,
                     "bytes_moved": moved, **t, "GBps": gbps, "fraction_of_copy": gbps / cp["GBps"]}
        print(f"{name:<22} {L:>7} {f'{h}x{p}, {n}':>12} {backend:>8} {t['best_ms']:>9.3f} {moved / 1e9:>7.3f} "
              f"{gbps:>8.1f} {gbps / cp['GBps']:>7.1%} {fmt_mem(t['memory']):>14}")
        del x, dt, B, C
        free(device)


# ----------------------------------------------------------------------------- ratios


def ratio(a, b):
    if not a or not b or "best_ms" not in a or "best_ms" not in b:
        return None
    return a["best_ms"] / b["best_ms"]


def print_ratios(args, results) -> None:
    full = not args.cpu_small
    print("\n== ratios (time of the original / time of the MM-DiM version; > 1 = MM-DiM faster)")
    if not full:
        print("   (--cpu-small sizes: the targets below apply to the full sizes on a GPU, not to these numbers)")
    summary = results.setdefault("ratios", {})
    for name, row in results.get("layer", {}).items():
        mm = row.get("MM-DiM")
        for key in [k for k in row if k.startswith(("attention", "SDPA"))]:
            r = ratio(row[key], mm)
            if r is None:
                continue
            summary[f"layer {name}: {key} / MM-DiM"] = r
            target = ""
            if name == TARGETS["layer"][0] and key.startswith("attention"):
                target = f"   target >= {TARGETS['layer'][1]:.1f}x (full attention layer, full size, GPU)"
            print(f"layer {name:<28} {key:<22} / MM-DiM  = {r:6.2f}x{target}")
    step = results.get("step", {})
    for frames, row in step.items():
        if not isinstance(row, dict) or "tokens" not in row:
            continue
        conv = row.get("converted")
        for key in [k for k in row if k.startswith("original")]:
            r = ratio(row[key], conv)
            if r is None:
                continue
            summary[f"step {frames} frames: {key} / converted"] = r
            target = ""
            if full and int(frames) == TARGETS["step"][0]:
                target = f"   target >= {TARGETS['step'][1]:.1f}x"
            print(f"step {frames:>4} frames ({row['tokens']:>6} tokens) {key:<18} / converted = {r:6.2f}x{target}")
    for name, row in results.get("scan", {}).items():
        if name == "copy" or "fraction_of_copy" not in row:
            continue
        summary[f"scan {name}: bandwidth / copy"] = row["fraction_of_copy"]
        target = f"   target >= {TARGETS['scan']:.0%}" if full else ""
        print(f"scan {name:<22} {row['GBps']:.1f} GB/s = {row['fraction_of_copy']:.1%} of copy "
              f"({row['backend']}){target}")


# ----------------------------------------------------------------------------- main


def environment(device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device)}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except Exception:  # noqa: BLE001
        env["diffusers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_bytes=props.total_memory,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try:
            import triton

            env["triton"] = triton.__version__
        except Exception:  # noqa: BLE001
            env["triton"] = None
    probe = torch.empty(1, 1, 1, 128, device=device, dtype=torch.bfloat16)
    env["scan_backend"] = select_ssd_backend(probe, 256)
    env["norm_backend"] = select_norm_backend(probe, 128)
    if device.type == "cuda":
        env["scan_triton_error"] = triton_scan_error()
        env["norm_triton_error"] = triton_rmsnorm_error()
    return env


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--cpu-small", dest="cpu_small", action="store_true", default=None,
                      help="reduced sizes (default when there is no CUDA)")
    size.add_argument("--full", dest="cpu_small", action="store_false", help="full sizes even on CPU (very slow)")
    ap.add_argument("--sections", nargs="+", default=["layer", "step", "scan"], choices=["layer", "step", "scan"])
    ap.add_argument("--layer-cases", nargs="+", default=None, choices=list(FULL_LAYERS))
    ap.add_argument("--step-frames", nargs="+", type=int, default=None,
                    help="video frames of the full-step runs (default 81 161 321; small: 9 17 33)")
    ap.add_argument("--warmup", type=int, default=None, help="default 2 on CUDA, 1 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls, best kept (default 5 CUDA, 2 CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default on CPU: 1)")
    ap.add_argument("--json", type=Path, default=None, help="write all raw numbers here")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cpu_small is None:
        args.cpu_small = device.type != "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    args.warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    args.repeats = args.repeats if args.repeats is not None else (5 if device.type == "cuda" else 2)
    if args.threads is None and device.type == "cpu":
        args.threads = 1  # steadier on shared cores (several threads spin against other jobs)
    if args.threads:
        torch.set_num_threads(args.threads)

    env = environment(device)
    results = {"environment": env, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "dtype": str(dtype)}
    print(f"bench_gpu: {env['date']}  device {env.get('gpu', device)}  dtype {dtype}  torch {env['torch']}  "
          f"diffusers {env['diffusers']}  threads {env['threads']}  sizes {'cpu-small' if args.cpu_small else 'full'}")
    print(f"MM-DiM kernels on this device: scan={env['scan_backend']} gated-norm={env['norm_backend']}"
          + (f"  (scan: {env.get('scan_triton_error')}; norm: {env.get('norm_triton_error')})"
             if device.type == "cuda" and "torch" in (env["scan_backend"], env["norm_backend"]) else ""))
    t0 = time.perf_counter()
    sections = {"layer": section_layer, "step": section_step, "scan": section_scan}
    for name in args.sections:
        try:
            sections[name](args, device, dtype, results)
        except Exception as e:  # noqa: BLE001 - report and keep going
            results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            print(f"section {name} FAILED: {e}")
            traceback.print_exc(limit=4)
        free(device)
    results["wall_s"] = time.perf_counter() - t0
    print_ratios(args, results)
    print(f"total {results['wall_s']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"raw numbers: {args.json}")
    return results


if __name__ == "__main__":
    main()
