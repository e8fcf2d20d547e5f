"""Measured FLOPs with ``torch.utils.flop_counter.FlopCounterMode``, and the cross-check of the
analytic counts against it.

FlopCounterMode counts matmuls (mm/addmm/bmm/baddbmm, einsum through them), convolutions and
SDPA; it ignores elementwise ops. Modules built under ``torch.device("meta")`` run on meta
tensors, so a full-size model needs no weights and no memory (DESIGN §5).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from m4v_convert.flops.analytic import mmdim_flops
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
        linears = [k.removeprefix("temporal_") for k in p if k.startswith("temporal_") and k != "temporal_attention"]
        for part in linears:
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
