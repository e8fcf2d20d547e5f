"""Wan2.1's FLOPs model: whole ``WanTransformer3DModel`` forwards, original and converted
(DESIGN §5), the report of a conversion, and its cross-check with FlopCounterMode on the meta
device. The per-layer counts (attention, MM-DiM) are the shared ones of :mod:`m4v_convert.flops`.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Callable, Iterable

import torch

from m4v_convert.convert import parse_layers
from m4v_convert.errors import M4VError
from m4v_convert.flops.analytic import MAC, attention_flops, linear_flops, mmdim_flops, resolve_layers
from m4v_convert.flops.measured import (
    EXPLANATIONS, TOLERANCE, _ops_sum, as_run_config, compare, crosscheck_mmdim, measure_flop_counts,
    mmdim_component_rows,
)
from m4v_convert.flops.report import markdown_report
from m4v_convert.layers.mmdim import MMDiMConfig
from m4v_convert.layers.recompose import VideoLayout

# Wan VAE: 4x in time (first frame kept), 8x in space.
WAN_VAE_TEMPORAL = 4
WAN_VAE_SPATIAL = 8
WAN_IMAGE_TOKENS = 257  # CLIP image tokens of Wan2.1 I2V (diffusers' image embedder input)

# Defaults of diffusers' WanTransformer3DModel.__init__ (used for keys a config dict omits).
WAN_DEFAULTS = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "pos_embed_seq_len": None,
}



def wan_config(config: dict) -> dict:
    """A diffusers ``WanTransformer3DModel`` config dict with defaults filled in (private keys
    such as ``_class_name`` dropped)."""
    out = dict(WAN_DEFAULTS)
    out.update({k: v for k, v in config.items() if not k.startswith("_")})
    out["patch_size"] = tuple(out["patch_size"])
    return out


def wan_latent_grid(config: dict, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Pixel video size → token grid (T, H, W) after the VAE (4× time, 8× space) and the patch."""
    cfg = wan_config(config)
    if min(frames, height, width) < 1:
        raise ValueError(f"video: frames, height, width must be >= 1, got {(frames, height, width)}")
    pt, ph, pw = cfg["patch_size"]
    lt = (frames - 1) // WAN_VAE_TEMPORAL + 1
    lh, lw = height // WAN_VAE_SPATIAL, width // WAN_VAE_SPATIAL
    t, h, w = lt // pt, lh // ph, lw // pw
    if min(t, h, w) < 1:
        raise ValueError(f"video {frames}x{height}x{width}: too small for patch {cfg['patch_size']} "
                         f"(latent {lt}x{lh}x{lw})")
    return t, h, w


def wan_image_len(config: dict, image_len: int = WAN_IMAGE_TOKENS) -> int:
    """Image-context tokens of an I2V/FLF2V config (0 for text-to-video)."""
    cfg = wan_config(config)
    if cfg["image_dim"] is None and cfg["added_kv_proj_dim"] is None:
        return 0
    return image_len * (2 if cfg["pos_embed_seq_len"] else 1)


def default_mmdim_config(config: dict, index: int, mmdim: dict | None = None) -> MMDiMConfig:
    """The MM-DiM replacing ``blocks.{index}.attn1`` of a Wan model (one SSM head per attention
    head, ``d_state = headdim``), with recipe hyper-parameters ``mmdim`` on top."""
    cfg = wan_config(config)
    heads, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
    return MMDiMConfig(d_model=heads * hd, nheads=heads, headdim=hd, layer_index=index, **(mmdim or {}))


def mmdim_config_fn_from(config: dict, mmdim=None) -> Callable[[int], MMDiMConfig]:
    """Normalize ``mmdim`` to ``index -> MMDiMConfig``.

    ``mmdim``: None (defaults), a dict of MMDiMConfig fields (a recipe's ``mmdim`` section,
    without d_model/nheads/headdim), an :class:`MMDiMConfig` (used for every layer with its
    ``layer_index`` set), or already a callable.
    """
    if callable(mmdim) and not isinstance(mmdim, (dict, MMDiMConfig)):
        return mmdim
    if isinstance(mmdim, MMDiMConfig):
        return lambda i: dataclasses.replace(mmdim, layer_index=i)
    if mmdim is None or isinstance(mmdim, dict):
        return lambda i: default_mmdim_config(config, i, mmdim)
    raise TypeError(f"mmdim: expected None, a dict, an MMDiMConfig or a callable, got {type(mmdim).__name__}")


def wan_model_flops(config: dict, frames: int, height: int, width: int, text_len: int = 512,
                    converted_layers: Iterable[int] | str = (), mmdim_config_fn=None,
                    image_len: int = WAN_IMAGE_TOKENS) -> dict:
    """Whole-model FLOPs of one ``WanTransformer3DModel`` forward (batch 1), original and with
    ``converted_layers`` self-attentions replaced by MM-DiM.

    ``frames``/``height``/``width`` are pixel sizes; latent ``T = (frames-1)//4 + 1``,
    ``H = height//8``, ``W = width//8``; tokens ``N = T/pt · H/ph · W/pw``. ``mmdim_config_fn``:
    see :func:`mmdim_config_fn_from` (None = defaults). Per block: self-attention (or MM-DiM),
    cross-attention to ``text_len`` projected text tokens (plus the image tokens of an I2V
    config), FFN ``4·N·d·ffn``; plus patch embedding, condition embedder and output head.
    Counts are matmul-like except the MM-DiM ``total`` (see :func:`mmdim_flops`);
    ``converted_total_matmul_flops`` is the FlopCounterMode-comparable converted total.
    """
    cfg = wan_config(config)
    heads, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
    d = heads * hd
    nl = cfg["num_layers"]
    pt, ph, pw = cfg["patch_size"]
    t, h, w = wan_latent_grid(cfg, frames, height, width)
    n = t * h * w
    img = wan_image_len(cfg, image_len)
    layers_conv = set(resolve_layers(converted_layers, nl))
    fn = mmdim_config_fn_from(cfg, mmdim_config_fn)
    layout = VideoLayout.single(t, h, w)

    # embeddings and head
    patch = MAC * n * d * cfg["in_channels"] * pt * ph * pw
    time_emb = linear_flops(1, cfg["freq_dim"], d) + linear_flops(1, d, d) + linear_flops(1, d, 6 * d)
    text_emb = linear_flops(text_len, cfg["text_dim"], d) + linear_flops(text_len, d, d)
    image_emb = 0
    if cfg["image_dim"] is not None:
        idim = cfg["image_dim"]
        image_emb = linear_flops(img, idim, idim) + linear_flops(img, idim, d)
    head = linear_flops(n, d, cfg["out_channels"] * pt * ph * pw)
    embeddings = {"patch_embedding": patch, "time_embedding": time_emb, "text_embedding": text_emb,
                  "image_embedding": image_emb, "head": head}

    self_attn = attention_flops(n, d, heads, hd)
    cross = attention_flops(n, d, heads, hd, kv_tokens=text_len)
    if img:
        added_kv = cfg["added_kv_proj_dim"] or d
        cross = dict(cross, image_projections=2 * linear_flops(img, added_kv, d),
                     image_scores=2 * MAC * n * img * d)
        cross["total"] += cross["image_projections"] + cross["image_scores"]
    ffn = 2 * linear_flops(n, d, cfg["ffn_dim"])

    mmdim_cache: dict[tuple, dict] = {}
    layers = []
    for i in range(nl):
        mc = fn(i)
        key = tuple(sorted((k, v) for k, v in dataclasses.asdict(mc).items() if k not in ("layer_index", "extra")))
        if key not in mmdim_cache:  # the zigzag path changes no count
            mmdim_cache[key] = mmdim_flops(mc, layout, text_len + img)
        mm = mmdim_cache[key]
        rest = cross["total"] + ffn
        converted = i in layers_conv
        layers.append({
            "index": i,
            "converted": converted,
            "attention_flops": self_attn["total"],
            "attention_projections": self_attn["projections"],
            "attention_scores": self_attn["scores"],
            "mmdim_flops": mm["total"],
            "mmdim_matmul_flops": mm["matmul"],
            "mmdim_parts": dict(mm["parts"]),
            "mmdim_elementwise_flops": mm["elementwise_total"],
            "mmdim_sequence_length": mm["shape"]["sequence_length"],
            "cross_attention_flops": cross["total"],
            "ffn_flops": ffn,
            "block_original_flops": self_attn["total"] + rest,
            "block_converted_flops": (mm["total"] if converted else self_attn["total"]) + rest,
        })

    base = sum(embeddings.values())
    original = base + sum(lay["block_original_flops"] for lay in layers)
    converted_total = base + sum(lay["block_converted_flops"] for lay in layers)
    converted_matmul = converted_total - sum(
        lay["mmdim_flops"] - lay["mmdim_matmul_flops"] for lay in layers if lay["converted"])
    return {
        "video": {"frames": frames, "height": height, "width": width},
        "latent": {"frames": (frames - 1) // WAN_VAE_TEMPORAL + 1, "height": height // WAN_VAE_SPATIAL,
                   "width": width // WAN_VAE_SPATIAL},
        "token_grid": {"frames": t, "height": h, "width": w},
        "tokens": n,
        "text_len": text_len,
        "image_len": img,
        "model": {"num_layers": nl, "d_model": d, "heads": heads, "head_dim": hd, "ffn_dim": cfg["ffn_dim"]},
        "converted_layers": sorted(layers_conv),
        "embeddings": embeddings,
        "self_attention": self_attn,
        "cross_attention": cross,
        "ffn_flops": ffn,
        "layers": layers,
        "original_total_flops": original,
        "converted_total_flops": converted_total,
        "converted_total_matmul_flops": converted_matmul,
        "attention_scores_total_flops": sum(lay["attention_scores"] for lay in layers),
        "speedup": original / converted_total,
    }


def wan_frame_grid(max_frames: int, min_frames: int = 1) -> list[int]:
    """Valid Wan pixel frame counts (4k + 1) in [min_frames, max_frames]."""
    start = min_frames + (-(min_frames - 1)) % WAN_VAE_TEMPORAL
    return list(range(max(start, 1), max_frames + 1, WAN_VAE_TEMPORAL))


CURVE_POINTS = 64  # every valid frame count up to the 64th, then 64 more spaced geometrically


def curve_frame_grid(frames: int) -> list[int]:
    """Frame counts of the report's FLOPs-vs-frames curve, up to twice ``frames``: every valid count
    (``1, 5, 9, ...``) up to the 64th, then 64 more spaced geometrically (a 100k-frame report stays
    ~128 points; the crossover, at a few frames, is found exactly)."""
    top = max(2 * frames - 1, 9)
    dense = wan_frame_grid(min(top, WAN_VAE_TEMPORAL * (CURVE_POINTS - 1) + 1))
    if top <= dense[-1]:
        return dense
    last = dense[-1]
    far = {WAN_VAE_TEMPORAL * round((last * (top / last) ** (i / CURVE_POINTS) - 1) / WAN_VAE_TEMPORAL) + 1
           for i in range(1, CURVE_POINTS + 1)}
    return dense + sorted(f for f in far if last < f <= top)


def flops_vs_frames(config: dict, height: int, width: int, frames: Iterable[int] | None = None,
                    text_len: int = 512, converted_layers: Iterable[int] | str = "all", mmdim_config_fn=None,
                    max_frames: int = 161) -> dict:
    """Whole-model FLOPs against the number of pixel frames, original vs converted.

    ``frames``: the frame counts to evaluate (default ``1, 5, ..., max_frames``).
    ``crossover_frames``: the smallest evaluated frame count at which the converted model costs
    less than the original (None if it never does in the range).
    """
    grid = list(frames) if frames is not None else wan_frame_grid(max_frames)
    if not grid:
        raise ValueError("frames: expected at least one frame count")
    original, converted = [], []
    for f in grid:
        r = wan_model_flops(config, f, height, width, text_len, converted_layers, mmdim_config_fn)
        original.append(r["original_total_flops"])
        converted.append(r["converted_total_flops"])
    crossover = next((f for f, o, c in zip(grid, original, converted) if c < o), None)
    return {"frames": grid, "original": original, "converted": converted, "crossover_frames": crossover,
            "height": height, "width": width}


def build_wan_flops_report(config: dict, frames: int, height: int, width: int, text_len: int = 512,
                           converted_layers="all", mmdim_config=None, crosscheck: bool = True,
                           curve_frames=None, name: str | None = None) -> dict:
    """Everything the report shows, for a Wan2.1 config at a pixel video size.

    ``curve_frames``: frame counts of the FLOPs-vs-frames curve (default :func:`curve_frame_grid`,
    up to twice ``frames``). ``crosscheck``: also build the models on meta and compare with
    FlopCounterMode (a few seconds per model).
    """
    cfg = wan_config(config)
    fn = mmdim_config_fn_from(cfg, mmdim_config)
    layers = resolve_layers(converted_layers, cfg["num_layers"])
    report = wan_model_flops(cfg, frames, height, width, text_len, layers, fn)
    grid = list(curve_frames) if curve_frames is not None else curve_frame_grid(frames)
    curve = flops_vs_frames(cfg, height, width, grid, text_len, layers, fn)
    report["name"] = name or "WanTransformer3DModel"
    report["mmdim_config"] = fn(layers[0] if layers else 0).to_dict()
    report["curve"] = curve
    report["crossover_frames"] = curve["crossover_frames"]
    if crosscheck:
        report["crosscheck"] = crosscheck_wan(cfg, frames, height, width, text_len, layers, fn)
    else:
        report["crosscheck"] = {"skipped": "crosscheck=False"}
    return report


def check_report_size(config: dict, frames: int, height: int, width: int) -> None:
    """Refuse a FLOPs-report video the model cannot take (before anything is computed or loaded):
    too small for its patch, or a token grid longer on some axis than its rotary table."""
    try:
        grid = wan_latent_grid(config, frames, height, width)
    except ValueError as e:
        raise M4VError(f"--size {height}x{width} / --frames {frames}: {e}") from None
    limit = int(config.get("rope_max_seq_len", 1024))
    if max(grid) > limit:
        raise M4VError(f"--size {height}x{width} / --frames {frames}: a {'x'.join(map(str, grid))} token grid; the "
                       f"model's rotary embedding covers {limit} positions per axis (rope_max_seq_len)")


def published_flops(recipe, config: dict, model: str, size: tuple[int, int] | None, frames: int | None,
                    layers: str | None, crosscheck: bool) -> tuple[dict, str]:
    """``m4v-convert flops`` for a published Wan config (registry entry ``wan``); defaults:
    480×832, 81 frames (the Wan2.1 release's video)."""
    height, width = size or (480, 832)
    chosen = parse_layers(recipe.layers_or_default(layers), config["num_layers"])
    check_report_size(config, frames or 81, height, width)
    report = build_wan_flops_report(config, frames or 81, height, width,
                                    text_len=int(recipe.video.get("text_len", 512)), converted_layers=chosen,
                                    mmdim_config=recipe.mmdim, crosscheck=crosscheck, name=f"{recipe.name} {model}")
    return report, markdown_report(report)


# ----------------------------------------------------------------------------- cross-check

def _wan_inputs(cfg: dict, frames: int, height: int, width: int, text_len: int, device="meta"):
    pt, ph, pw = cfg["patch_size"]
    t, h, w = wan_latent_grid(cfg, frames, height, width)
    latent = torch.empty(1, cfg["in_channels"], t * pt, h * ph, w * pw, device=device)
    timestep = torch.zeros(1, device=device)
    text = torch.empty(1, text_len, cfg["text_dim"], device=device)
    kwargs = {}
    img = wan_image_len(cfg)
    if img:
        kwargs["encoder_hidden_states_image"] = torch.empty(1, img // (2 if cfg["pos_embed_seq_len"] else 1),
                                                            cfg["image_dim"], device=device)
    return (latent, timestep, text), kwargs


def _diffusers_kwargs(cfg: dict) -> dict:
    from diffusers import WanTransformer3DModel  # noqa: PLC0415

    accepted = set(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}
    return {k: v for k, v in cfg.items() if k in accepted}


def crosscheck_wan(config: dict, frames: int, height: int, width: int, text_len: int = 512,
                   converted_layers=(), mmdim_config=None) -> dict:
    """Build the full-size diffusers Wan model (and the converted one) on meta, count its FLOPs
    with FlopCounterMode and compare with :func:`wan_model_flops`.

    ``mmdim_config``: None, a dict of MMDiMConfig fields (recipe ``mmdim``), an MMDiMConfig or
    ``index -> MMDiMConfig``. The converted model is
    ``m4v_convert.backbones.wan.model.M4VWanTransformer3DModel``; if it cannot be built, the check
    falls back to a standalone MMDiM layer (always run as well, for the per-part breakdown).

    Returns ``{"components": [rows], "layers": [...], "flagged": [...], "unexplained": [...],
    "ok": bool, "converted_model": "checked" | reason, "seconds": float}``; each row has
    ``component, analytic, measured, rel_diff, flagged, explanation``.
    """
    from diffusers import WanTransformer3DModel  # noqa: PLC0415

    start = time.perf_counter()
    cfg = wan_config(config)
    fn = mmdim_config_fn_from(cfg, mmdim_config)
    conv = resolve_layers(converted_layers, cfg["num_layers"])
    analytic = wan_model_flops(cfg, frames, height, width, text_len, conv, fn)
    args, kwargs = _wan_inputs(cfg, frames, height, width, text_len)

    with torch.device("meta"):
        model = WanTransformer3DModel(**_diffusers_kwargs(cfg))
    counts = measure_flop_counts(model, *args, **kwargs)
    del model
    emb = analytic["embeddings"]
    layers = analytic["layers"]
    rows = [
        compare("patch_embedding", emb["patch_embedding"], _ops_sum(counts, "patch_embedding")),
        compare("condition_embedder", emb["time_embedding"] + emb["text_embedding"] + emb["image_embedding"],
                _ops_sum(counts, "condition_embedder")),
        compare("head", emb["head"], _ops_sum(counts, "proj_out")),
    ]
    layer_rows = []
    sums = {"self_attention.projections": [0, 0], "self_attention.scores": [0, 0], "cross_attention": [0, 0],
            "ffn": [0, 0]}
    for lay in layers:
        i = lay["index"]
        meas = {
            "self_attention.projections": _ops_sum(counts, f"blocks.{i}.attn1", "linear"),
            "self_attention.scores": _ops_sum(counts, f"blocks.{i}.attn1", "matmul"),
            "cross_attention": _ops_sum(counts, f"blocks.{i}.attn2"),
            "ffn": _ops_sum(counts, f"blocks.{i}.ffn"),
        }
        ana = {"self_attention.projections": lay["attention_projections"],
               "self_attention.scores": lay["attention_scores"],
               "cross_attention": lay["cross_attention_flops"], "ffn": lay["ffn_flops"]}
        for k in sums:
            sums[k][0] += ana[k]
            sums[k][1] += meas[k]
        layer_rows.append({"index": i, "attention_analytic": lay["attention_flops"],
                           "attention_measured": meas["self_attention.projections"] + meas["self_attention.scores"],
                           "attention_scores_analytic": lay["attention_scores"],
                           "attention_scores_measured": meas["self_attention.scores"]})
    rows += [compare(k, a, m, note=f"summed over {len(layers)} layers") for k, (a, m) in sums.items()]
    rows.append(compare("original_total", analytic["original_total_flops"], _ops_sum(counts, "")))

    # converted model
    converted_status = "no layers converted"
    if conv:
        try:
            from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel  # noqa: PLC0415

            m4v = {"layers": {str(i): fn(i).to_dict() for i in conv}}
            with torch.device("meta"):
                student = M4VWanTransformer3DModel(**_diffusers_kwargs(cfg), m4v=m4v)
            ccounts = measure_flop_counts(student, *args, **kwargs)
            del student
        except Exception as exc:  # noqa: BLE001 (the adapter is optional; say why it was skipped)
            converted_status = f"skipped: {type(exc).__name__}: {exc}"
        else:
            converted_status = "checked"
            run_fn = lambda i: as_run_config(fn(i))  # noqa: E731
            analytic_run = wan_model_flops(cfg, frames, height, width, text_len, conv, run_fn)
            by_index = {lay["index"]: lay for lay in analytic_run["layers"]}
            lz = text_len + analytic["image_len"]
            layout = VideoLayout.single(*(analytic["token_grid"][k] for k in ("frames", "height", "width")))
            mm_a = mm_m = 0
            for i in conv:
                mm_a += by_index[i]["mmdim_matmul_flops"]
                mm_m += _ops_sum(ccounts, f"blocks.{i}.attn1")
                layer_rows[i]["mmdim_analytic"] = by_index[i]["mmdim_matmul_flops"]
                layer_rows[i]["mmdim_measured"] = _ops_sum(ccounts, f"blocks.{i}.attn1")
            rows.append(compare("converted.mmdim_layers", mm_a, mm_m, note=f"matmul parts, layers {conv}"))
            first = conv[0]
            rows += mmdim_component_rows(mmdim_flops(run_fn(first), layout, lz), ccounts,
                                         f"blocks.{first}.attn1.mmdim", f"converted.blocks.{first}.mmdim")
            rows.append(compare("converted_total", analytic_run["converted_total_matmul_flops"],
                                _ops_sum(ccounts, ""),
                                note="analytic total at the PyTorch scan's chunk, without the non-matmul "
                                     f"multiply-adds (with them: {analytic_run['converted_total_flops']})"))

    # standalone layer (always; the fallback when the converted model cannot be built)
    index = conv[0] if conv else 0
    tg = analytic["token_grid"]
    layout = VideoLayout.single(tg["frames"], tg["height"], tg["width"])
    mc = fn(index)
    standalone = crosscheck_mmdim(mc, layout, text_len + analytic["image_len"], label="standalone.mmdim")
    rows += standalone["rows"]

    flagged = [r["component"] for r in rows if r["flagged"]]
    unexplained = [r["component"] for r in rows
                   if r["flagged"] and r["component"].rsplit(".", 1)[-1] not in EXPLANATIONS]
    return {
        "components": rows,
        "layers": layer_rows,
        "standalone_mmdim": {"layer_index": index, "config": dataclasses.asdict(mc),
                             "sequence_length": standalone["analytic"]["shape"]["sequence_length"]},
        "converted_model": converted_status,
        "tolerance": TOLERANCE,
        "flagged": flagged,
        "unexplained": unexplained,
        "ok": not unexplained,
        "seconds": time.perf_counter() - start,
    }
