"""The FLOPs report: ``flops.json``, ``flops.md`` and ``flops.png`` (DESIGN §1 step 4, §5).

A backbone's report builder (e.g. :func:`m4v_convert.backbones.wan.flops.build_wan_flops_report`)
computes everything (analytic counts at the target size, the curve against the number of frames
with its crossover, the FlopCounterMode cross-check); :func:`write_flops_report` only formats what
the dict holds, so no number is written that was not computed.
"""

from __future__ import annotations

import json
from pathlib import Path


T = 1e12  # FLOPs per TFLOP


def format_tflops(x) -> str:
    """FLOPs → TFLOPs text: 3 decimals, or 3 significant digits below 0.01 TFLOPs (tiny models)."""
    v = x / T
    return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.3g}"


_tf = format_tflops


def markdown_report(report: dict) -> str:
    v, m = report["video"], report.get("model", {})
    lines = [f"# FLOPs report: {report.get('name', 'model')}", ""]
    lines.append(f"Video {v['frames']} frames × {v['height']}×{v['width']} px → {report['tokens']:,} video tokens"
                 + (f" (token grid {report['token_grid']['frames']}×{report['token_grid']['height']}×"
                    f"{report['token_grid']['width']})" if "token_grid" in report else "")
                 + f", text {report.get('text_len', 0)} tokens. One forward, batch 1; "
                   "a multiply-add counts 2 FLOPs.")
    if m:
        lines.append(f"Model: {m['num_layers']} layers, d={m['d_model']}, {m['heads']}×{m['head_dim']} heads, "
                     f"FFN {m['ffn_dim']}. Converted layers: {report.get('converted_layers')}.")
    orig, conv = report["original_total_flops"], report["converted_total_flops"]
    lines += ["", "## Whole model", "", "| | TFLOPs |", "|---|---:|",
              f"| original | {_tf(orig)} |", f"| converted | {_tf(conv)} |",
              f"| speed-up (original / converted) | {orig / conv:.2f}× |"]
    if "attention_scores_total_flops" in report:
        lines.append(f"| of the original: self-attention scores | {_tf(report['attention_scores_total_flops'])} |")
    cross = report.get("crossover_frames")
    lines += ["", ("Crossover: the converted model costs less than the original from "
                   f"**{cross} frames** on (at {v['height']}×{v['width']})." if cross is not None else
                   "Crossover: the converted model is not cheaper anywhere in the evaluated frame range.")]

    lines += ["", "## Per layer", "",
              "Attention sub-layer (self-attention vs the MM-DiM replacing it) and whole block "
              "(with cross-attention and FFN), TFLOPs.", "",
              "| layer | converted | attention | MM-DiM | attention / MM-DiM | block original | block converted |",
              "|---:|:---:|---:|---:|---:|---:|---:|"]
    for lay in report["layers"]:
        ratio = lay["attention_flops"] / lay["mmdim_flops"] if lay["mmdim_flops"] else float("nan")
        lines.append(f"| {lay['index']} | {'yes' if lay.get('converted') else 'no'} | {_tf(lay['attention_flops'])} | "
                     f"{_tf(lay['mmdim_flops'])} | {ratio:.2f}× | {_tf(lay.get('block_original_flops', 0))} | "
                     f"{_tf(lay.get('block_converted_flops', 0))} |")
    attn_sum = sum(lay["attention_flops"] for lay in report["layers"] if lay.get("converted"))
    mm_sum = sum(lay["mmdim_flops"] for lay in report["layers"] if lay.get("converted"))
    if mm_sum:
        lines.append(f"| **converted layers** | | {_tf(attn_sum)} | {_tf(mm_sum)} | {attn_sum / mm_sum:.2f}× | | |")

    if report["layers"] and "mmdim_parts" in report["layers"][0]:
        lay = next((x for x in report["layers"] if x.get("converted")), report["layers"][0])
        lines += ["", f"## MM-DiM breakdown (layer {lay['index']}, SSM sequence length "
                      f"{lay.get('mmdim_sequence_length', '?'):,})", "", "| part | GFLOPs |", "|---|---:|"]
        lines += [f"| {k} | {val / 1e9:.3f} |" for k, val in lay["mmdim_parts"].items()]
        ew = lay.get("mmdim_elementwise_flops", 0)
        lines.append(f"| elementwise (estimate, not in the totals) | {ew / 1e9:.3f} |")

    curve = report.get("curve")
    if curve:
        lines += ["", "## FLOPs vs frames", "", "| frames | original TFLOPs | converted TFLOPs |", "|---:|---:|---:|"]
        lines += [f"| {f} | {_tf(o)} | {_tf(c)} |" for f, o, c in zip(curve["frames"], curve["original"],
                                                                    curve["converted"])]

    cc = report.get("crosscheck") or {}
    lines += ["", "## Cross-check against FlopCounterMode (meta device)", ""]
    if "components" in cc:
        lines += [f"Converted model: {cc.get('converted_model')}. Tolerance {cc.get('tolerance', 0.02):.0%}; "
                  f"unexplained mismatches: {cc.get('unexplained') or 'none'}.", "",
                  "| component | analytic | measured | rel. diff | flagged | explanation |",
                  "|---|---:|---:|---:|:---:|---|"]
        for r in cc["components"]:
            lines.append(f"| {r['component']} | {r['analytic']:,} | {r['measured']:,} | {r['rel_diff']:.2e} | "
                         f"{'yes' if r['flagged'] else ''} | {r.get('explanation') or ''} |")
    else:
        lines.append(f"Not run ({cc.get('skipped', 'no cross-check in the report')}).")
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    curve = report["curve"]
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(curve["frames"], [x / T for x in curve["original"]], marker="o", ms=3, label="original (attention)")
    ax.plot(curve["frames"], [x / T for x in curve["converted"]], marker="s", ms=3, label="converted (MM-DiM)")
    cross = curve.get("crossover_frames")
    if cross is not None:
        ax.axvline(cross, color="grey", ls="--", lw=1)
        ax.annotate(f"crossover: {cross} frames", xy=(cross, 0.97), xycoords=("data", "axes fraction"),
                    xytext=(4, 0), textcoords="offset points", ha="left", va="top", fontsize=9)
    target = report["video"]["frames"]
    ax.axvline(target, color="tab:red", ls=":", lw=1, label=f"target: {target} frames")
    ax.set_xlabel("frames (pixel space)")
    ax.set_yscale("log")  # the curves cross at small frame counts; a log scale keeps that visible
    ax.set_ylabel("TFLOPs per forward (log scale)")
    ax.set_title(f"{report.get('name', 'model')} at {curve['height']}×{curve['width']}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def write_flops_report(report: dict, out_dir) -> dict[str, Path]:
    """Write ``flops.json`` (the dict), ``flops.md`` (tables) and ``flops.png`` (FLOPs vs frames,
    original vs converted, crossover marked) into ``out_dir``; return their paths.

    ``report`` is what a backbone's report builder returns (:func:`m4v_convert.backbones.wan.flops.build_wan_flops_report`) (any dict with the same keys:
    ``original_total_flops``, ``converted_total_flops``, ``layers``, ``video``, ``tokens``,
    ``crossover_frames``, ``crosscheck``, ``curve``).
    """
    required = ("original_total_flops", "converted_total_flops", "layers", "video", "tokens", "crossover_frames",
                "crosscheck", "curve")
    missing = [k for k in required if k not in report]
    if missing:
        raise ValueError(f"report: missing keys {missing}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "flops.json", "md": out / "flops.md", "png": out / "flops.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown_report(report))
    _plot(report, paths["png"])
    return paths
