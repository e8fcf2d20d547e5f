"""Measured FLOPs with ``torch.utils.flop_counter.FlopCounterMode``, and the cross-check of the
analytic counts against it.

FlopCounterMode counts matmuls (mm/addmm/bmm/baddbmm, einsum through them), convolutions and
SDPA; it ignores elementwise ops. Modules built under ``torch.device("meta")`` run on meta
tensors, so a full-size model needs no weights and no memory (DESIGN §5).
"""

from __future__ import annotations

import dataclasses
import inspect
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from m4v_convert.flops.analytic import (
    mmdim_config_fn_from, mmdim_flops, resolve_layers, wan_config, wan_image_len, wan_latent_grid, wan_model_flops,
)
from m4v_convert.layers.mmdim import MMDiM
from m4v_convert.layers.recompose import VideoLayout

def _extra_formulas() -> dict:
    """FLOP formulas FlopCounterMode lacks: on CPU, SDPA dispatches to
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's table does not list (the
    CUDA kernels and the meta/math path are counted); it costs what the other SDPA kernels cost."""
    import torch.utils.flop_counter as fc  # noqa: PLC0415

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in fc.flop_registry or not hasattr(fc, "sdpa_flop_count"):
        return {}

    def sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: sdpa_cpu_flop}


TOLERANCE = 0.02  # relative difference above which a component is flagged

LINEAR_OPS = {"aten.mm", "aten.addmm", "aten.matmul"}
CONV_OPS = {"aten.convolution", "aten._convolution", "aten.convolution_backward"}
# everything else FlopCounterMode counts is a batched matmul or an attention kernel

# Known reasons for an analytic/measured gap, keyed by the last part of the component name.
EXPLANATIONS = {
    "conv1d": "the depthwise causal conv is computed with elementwise shifted multiply-adds "
                    "(causal_depthwise_conv), which FlopCounterMode does not count; the analytic "
                    "2·N'·conv_dim·d_conv is exact for that code",
    "ssd_state_passing": "state passing across chunks is an elementwise loop (H = decay·H + S) "
                               "that FlopCounterMode does not count",
}


# ----------------------------------------------------------------------------- measuring

def _strip_root(name: str, root: str) -> str | None:
    if name == "Global":
        return None
    if name == root:
        return ""
    if name.startswith(root + "."):
        return name[len(root) + 1:]
    return name


def measure_flop_counts(module: nn.Module, *args, **kwargs) -> dict[str, dict[str, int]]:
    """Run ``module(*args, **kwargs)`` under FlopCounterMode (no grad).

    Returns ``{module_fqn: {op_name: FLOPs}}`` with fqns as in ``module.named_modules()``
    (``""`` is the module itself, which includes everything). CPU SDPA is counted too (see
    :func:`_extra_formulas`).
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        module(*args, **kwargs)
    root = type(module).__name__
    out: dict[str, dict[str, int]] = {}
    for name, ops in counter.get_flop_counts().items():
        key = _strip_root(name, root)
        if key is None:
            continue
        bucket = out.setdefault(key, {})
        for op, flops in ops.items():
            op_name = str(op).removesuffix(".default")
            bucket[op_name] = bucket.get(op_name, 0) + int(flops)
    out.setdefault("", {})
    return out


def measure_flops(module: nn.Module, *args, **kwargs) -> tuple[int, dict[str, int]]:
    """``(total FLOPs, {module_fqn: FLOPs})`` of one forward, counted by FlopCounterMode.

    Works on the ``meta`` device: build the module under ``torch.device("meta")`` and pass meta
    tensors. Only matmul/conv/SDPA FLOPs are counted (see the module docstring).
    """
    counts = measure_flop_counts(module, *args, **kwargs)
    per_module = {k: sum(v.values()) for k, v in counts.items()}
    return per_module[""], per_module


def _ops_sum(counts: dict[str, dict[str, int]], fqn: str, kind: str | None = None) -> int:
    ops = counts.get(fqn, {})
    if kind is None:
        return sum(ops.values())
    if kind == "linear":
        return sum(v for k, v in ops.items() if k in LINEAR_OPS)
    if kind == "conv":
        return sum(v for k, v in ops.items() if k in CONV_OPS)
    if kind == "matmul":  # bmm / sdpa / everything that is neither a linear nor a conv
        return sum(v for k, v in ops.items() if k not in LINEAR_OPS and k not in CONV_OPS)
    raise ValueError(kind)


# ----------------------------------------------------------------------------- comparison

def compare(component: str, analytic: float, measured: float, note: str | None = None) -> dict:
    """One cross-check row: relative difference to the measured value, flagged above 2%."""
    if analytic == measured:
        rel = 0.0
    else:
        rel = abs(analytic - measured) / max(abs(measured), abs(analytic))
    flagged = rel > TOLERANCE
    explanation = None
    if flagged:
        explanation = EXPLANATIONS.get(component.rsplit(".", 1)[-1],
                                       "unexplained: the analytic count does not describe what runs")
    row = {"component": component, "analytic": int(analytic), "measured": int(measured), "rel_diff": rel,
           "flagged": flagged, "explanation": explanation}
    if note:
        row["note"] = note
    return row


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


def mmdim_component_rows(analytic: dict, counts: dict[str, dict[str, int]], prefix: str, label: str) -> list[dict]:
    """Rows comparing :func:`mmdim_flops` with the FlopCounterMode counts of one MMDiM module
    found at ``prefix`` (``""`` for a standalone block)."""
    def fq(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    p = analytic["parts"]
    scan = sum(v for k, v in p.items() if k.startswith("ssd_") and k != "ssd_state_passing")
    rows = [
        compare(f"{label}.in_proj", p["in_proj"], _ops_sum(counts, fq("mixer.in_proj"))),
        compare(f"{label}.ssd_scan", scan, _ops_sum(counts, fq("mixer"), "matmul"),
                note="intra-chunk C·Bᵀ and ·x, chunk states, output from states (bmm inside the mixer)"),
        compare(f"{label}.out_proj", p["out_proj"], _ops_sum(counts, fq("mixer.out_proj"))),
    ]
    if "temporal_down_proj" in p:
        for part in ("down_proj", "qkv", "attn_out", "up_proj"):
            rows.append(compare(f"{label}.temporal_{part}", p[f"temporal_{part}"],
                                _ops_sum(counts, fq(f"temporal.{part}"))))
        rows.append(compare(f"{label}.temporal_attention", p["temporal_attention"],
                            _ops_sum(counts, fq("temporal"), "matmul")))
    for part in analytic["not_measured"]:
        rows.append(compare(f"{label}.{part}", p[part], 0, note="not a matmul in the code"))
    rows.append(compare(f"{label}.matmul_total", analytic["matmul"], _ops_sum(counts, prefix)))
    return rows


def as_run_config(config):
    """``config`` with the chunk the PyTorch scan actually runs at off-GPU (meta and CPU).

    Reports count the Triton kernel's ``chunk_size``; FlopCounterMode on meta sees the PyTorch
    path, so the cross-check compares against the analytic count at that path's chunk.
    """
    from m4v_convert.layers.mixer import torch_scan_chunk  # noqa: PLC0415

    return dataclasses.replace(config, chunk_size=torch_scan_chunk(config.chunk_size))


def crosscheck_mmdim(config, layout: VideoLayout, text_len: int, label: str = "mmdim") -> dict:
    """A standalone MMDiM built on meta, measured and compared with :func:`mmdim_flops` (at the
    PyTorch scan's chunk, see :func:`as_run_config`)."""
    with torch.device("meta"):
        block = MMDiM(config)
    video = torch.empty(1, layout.num_tokens, config.d_model, device="meta")
    text = torch.empty(1, text_len, config.d_model, device="meta") if text_len else None
    counts = measure_flop_counts(block, video, layout, text)
    analytic = mmdim_flops(as_run_config(config), layout, text_len)
    return {"analytic": analytic, "counts": counts, "rows": mmdim_component_rows(analytic, counts, "", label)}


def crosscheck_wan(config: dict, frames: int, height: int, width: int, text_len: int = 512,
                   converted_layers=(), mmdim_config=None) -> dict:
    """Build the full-size diffusers Wan model (and the converted one) on meta, count its FLOPs
    with FlopCounterMode and compare with :func:`wan_model_flops`.

    ``mmdim_config``: None, a dict of MMDiMConfig fields (recipe ``mmdim``), an MMDiMConfig or
    ``index -> MMDiMConfig``. The converted model is
    ``m4v_convert.backbones.wan.M4VWanTransformer3DModel``; if it cannot be built, the check
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
            from m4v_convert.backbones.wan import M4VWanTransformer3DModel  # noqa: PLC0415

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
