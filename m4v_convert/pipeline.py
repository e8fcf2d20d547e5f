"""The Wan2.1 conversion job: load → select → swap → distill → save → report, on a checked
:class:`~m4v_convert.jobs.plan.ConversionPlan` (``m4v_convert.jobs.convert.run_conversion`` plans it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import m4v_convert
from m4v_convert.convert import layer_ranges as _ranges
from m4v_convert.errors import M4VError


def convert(plan) -> dict:
    """Run the planned Wan conversion; returns the summary written to ``conversion.json``. Inside a
    launched process group every process trains its share of each batch and rank 0 writes the output.
    """
    from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
    from m4v_convert.backbones.wan.distill import WanDistillAdapter
    from m4v_convert.backbones.wan.load import load_wan_transformer
    from m4v_convert.convert import parse_layers
    from m4v_convert.distill.calibration import CalibSpec
    from m4v_convert.distill.job import plot_losses, run_distillation
    from m4v_convert.io.converted import save_converted
    from m4v_convert.io.output import atomic_output_dir
    from m4v_convert.jobs.convert import print_distill_report

    opts, recipe, con, device, dtype, dist = plan.flags, plan.recipe, plan.console, plan.device, plan.dtype, plan.dist
    t_start = plan.started

    con.print(f"[bold]m4v-convert[/] {m4v_convert.__version__}  recipe [cyan]{recipe.name}[/]  "
              f"checkpoint {opts.checkpoint}" + (f"  ({dist.world} processes)" if dist.enabled else ""))
    teacher = load_wan_transformer(opts.checkpoint, dtype=dtype, device=device)
    teacher.requires_grad_(False)
    cfg = dict(teacher.config)
    layers = parse_layers(plan.layer_spec, cfg["num_layers"])
    con.print(f"loaded WanTransformer3DModel: {cfg['num_layers']} layers, {cfg['num_attention_heads']} heads × "
              f"{cfg['attention_head_dim']}, {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M params; "
              f"converting layers {_ranges(layers)}")

    torch.manual_seed(opts.seed)
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    try:
        student.convert_(layers, recipe.mmdim)
    except ValueError as e:
        raise M4VError(f"checkpoint and recipe {recipe.name!r} disagree: {e}") from None
    student.requires_grad_(False)

    c = recipe.calib
    spec = CalibSpec(in_channels=cfg["in_channels"], text_dim=cfg["text_dim"], latent_frames=c["latent_frames"],
                     latent_height=c["latent_height"], latent_width=c["latent_width"], text_len=c["text_len"],
                     flow_shift=float(c.get("flow_shift", 1.0)))
    adapter = WanDistillAdapter(layers=layers, patch_size=tuple(cfg["patch_size"]), spec=spec)
    report = run_distillation(teacher, student, adapter, recipe, opts, plan.distill, dist, con, device, dtype)
    result = report.stage1
    print_distill_report(con, report)

    # report + save
    from m4v_convert.backbones.wan.flops import build_wan_flops_report
    from m4v_convert.flops.report import write_flops_report

    height, width = opts.report_size or (480, 832)
    frames = opts.report_frames or 81
    flops = build_wan_flops_report(cfg, frames, height, width,
                                   text_len=int(recipe.video.get("text_len", 512)), converted_layers=layers,
                                   mmdim_config=recipe.mmdim, name=f"{recipe.name} ({Path(opts.checkpoint).name})")
    dplan = plan.distill
    s1 = dplan.schedules[1]
    meta = {
        "toolkit": "m4v-convert", "version": m4v_convert.__version__, "source": str(Path(opts.checkpoint).resolve()),
        "recipe": recipe.name, "layers": layers, "calibration": report.calibration,
        "distill": {"stage1_steps": s1.steps if 1 in dplan.stages else 0, "lr": s1.lr, "stages": dplan.stages,
                    "train": dplan.train, "processes": dist.world,
                    "schedules": {f"stage{k}": dplan.schedules[k].to_dict() for k in dplan.stages},
                    "feature_weight": dplan.feature_weight},
    }
    # config["m4v"]["layers"] holds the per-layer MMDiMConfig dicts; the plain list goes under its own key
    record = {k: v for k, v in meta.items() if k != "layers"}
    student.register_to_config(m4v={**student.config["m4v"], **record, "converted_layers": layers})
    summary = {
        **meta,
        "error_before": {str(k): v for k, v in result.error_before.items()},
        "error_after": {str(k): v for k, v in result.error_after.items()},
        "end_to_end_error": {"before": report.end_to_end_before, "after": report.end_to_end_after},
        "stages": {k: {n: v for n, v in r.items() if n not in ("error_before", "error_after")}
                   for k, r in report.results.items()},
        "original_total_flops": flops["original_total_flops"],
        "converted_total_flops": flops["converted_total_flops"],
        "seconds": None,
    }
    if dist.is_main:
        with atomic_output_dir(opts.out, opts.overwrite) as tmp:
            save_converted(student, tmp, metadata={
                "m4v_version": m4v_convert.__version__, "source": meta["source"], "recipe": recipe.name,
                "layers": ",".join(map(str, layers)), "calibration": report.calibration,
            })
            write_flops_report(flops, tmp)
            (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in report.log))
            plot_losses(report.log, tmp / "loss.png")
            summary["seconds"] = round(time.time() - t_start, 1)
            (tmp / "conversion.json").write_text(json.dumps(summary, indent=2))
            (tmp / "README.md").write_text(_model_card(summary, flops, recipe, cfg))
        con.print(f"[green]wrote[/] {Path(opts.out).resolve()}  ({summary['seconds']} s)")
        con.print(f"FLOPs at {frames}×{height}×{width}: original {flops['original_total_flops'] / 1e12:.3f} "
                  f"TFLOPs → converted {flops['converted_total_flops'] / 1e12:.3f} TFLOPs")
    dist.barrier()
    return summary


def _later_stages(summary: dict) -> str:
    lines = []
    for name, title in (("stage2", "end-to-end distillation"), ("stage3", "flow-matching fine-tune")):
        r = summary.get("stages", {}).get(name)
        if r is None:
            continue
        if r.get("skipped"):
            lines.append(f"; {name} ({title}) skipped: {r['skipped']}")
        else:
            lines.append(f"; {name} ({title}), {r['steps']} steps")
    e2e = summary.get("end_to_end_error") or {}
    if e2e.get("before") is not None:
        lines.append(f"\n- end-to-end relative error vs the teacher (held-out batch): {e2e['before']:.4f} before "
                     f"stages 2/3, {e2e['after']:.4f} after (trained: {summary['distill'].get('train', 'mmdim')})")
    return "".join(lines)


def _model_card(summary: dict, flops: dict, recipe, cfg: dict) -> str:
    before = summary["error_before"]
    after = summary["error_after"]
    rows = "\n".join(f"| {i} | {before[i]:.4f} | {after[i]:.4f} |" for i in before)
    synthetic = summary["calibration"] == "synthetic"
    return f"""# Converted with m4v-convert {summary['version']}

- source: `{summary['source']}`
- recipe: `{recipe.name}` ({recipe.description})
- model: WanTransformer3DModel, {cfg['num_layers']} layers, {cfg['num_attention_heads']} heads × {cfg['attention_head_dim']}
- converted self-attention layers (MM-DiM): {_ranges(summary['layers'])}
- distillation: stage 1 (teacher-forced attention transfer), {summary['distill']['stage1_steps']} steps, lr {summary['distill']['lr']}{_later_stages(summary)}
- calibration data: **{summary['calibration']}**{' — random latents and text embeddings, not real videos: this model is NOT ready for generation quality, distill it on real latents (`--calib`)' if synthetic else ''}

Load it with `m4v_convert.load_converted(path)`; it takes exactly the inputs of the original
`WanTransformer3DModel` and drops into `diffusers.WanPipeline(transformer=...)`.

## Per-layer relative error (held-out calibration batch)

| layer | before distillation | after stage 1 |
|---:|---:|---:|
{rows}

## FLOPs

See `flops.md` / `flops.json` / `flops.png`: original {flops['original_total_flops'] / 1e12:.3f} TFLOPs,
converted {flops['converted_total_flops'] / 1e12:.3f} TFLOPs per forward at the report size.
"""
