"""The PyramidFlow conversion job: load → select → swap → distill → save → report.

Same shape as the Wan job (:mod:`m4v_convert.pipeline`), on the same plan
(:mod:`m4v_convert.jobs.plan`); what differs is the teacher (the release folder layout, variant
and resolution from the recipe), the layer selection (single-stream blocks; double-stream ones
only where the recipe allows), the pyramid-shaped calibration batches and the output layout: the
converted transformer is written where the release keeps its own,
``<out>/diffusion_transformer_<resolution>/{config.json, diffusion_pytorch_model.safetensors}``,
next to ``conversion.json``, ``README.md`` and ``flops.{json,md}``. ``load_converted(<out>)``
reads it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import m4v_convert
from m4v_convert.convert import layer_ranges as _ranges
from m4v_convert.errors import M4VError


def check_layer_selection(layers: list[int], num_double: int, variant: str, allow_double_stream: bool,
                          num_single: int | None = None, source: str = "--layers") -> None:
    """Refuse double-stream layers, with the reason, unless the recipe allows them.

    ``source`` names where the layer list came from (``--layers`` or the recipe's default).
    """
    double = [i for i in layers if i < num_double]
    if not double or allow_double_stream:
        return
    if variant == "sd3":
        where = f"SD3 has only joint (double-stream) blocks, transformer_blocks.0-{num_double - 1}"
    else:
        where = f"layers {_ranges(double)} are double-stream blocks (transformer_blocks.0-{num_double - 1})"
    last = f"{num_double + num_single - 1}" if num_single else "..."
    tail = ("; the SD3 variant has nothing else: use the recipe pyramidflow-sd3-768p, which allows them"
            if variant == "sd3" else f"; convert the single-stream blocks (--layers {num_double}-{last}), or use a "
            "recipe with allow_double_stream: true to convert these too")
    raise M4VError(
        f"{source}: {where}, and this recipe does not allow converting them (allow_double_stream: false). "
        "M4V converts single-stream attention only and keeps the double-stream blocks, whose separate text and "
        f"video weights an MM-DiM can take over only with its own text projections (text_projections){tail}"
    )


def _calibration_line(calibration: str) -> str:
    if calibration == "synthetic":
        return ("- calibration data: **synthetic** — random latents and text embeddings, not real videos: this model "
                "is NOT ready\n  for generation quality; distill it further on real latents (`--calib DIR`)")
    if calibration.startswith("teacher:"):
        source = calibration.removeprefix("teacher:")
        texts = "synthetic text conditions" if source == "synthetic" else f"the text conditions of `{source.removeprefix('folder:')}`"
        return (f"- calibration data: videos **sampled by the teacher** (the release's pyramid sampler, no guidance) "
                f"for {texts}; pyramid-shaped batches")
    return f"- calibration data: `{calibration.removeprefix('folder:')}` (real latents, pyramid-shaped batches)"


def _layer_source(opts_layers, recipe) -> str:
    return "--layers" if opts_layers else f"recipe {recipe.name} (default_layers: {recipe.default_layers})"


def check_flags(flags, recipe) -> None:
    """PyramidFlow's own refusals of a conversion's flags and recipe, before any weight is read
    (registry entry ``pyramidflow``)."""
    from .calibration import NUM_STAGES

    if recipe.mmdim.get("registers", True) and int(recipe.mmdim.get("num_registers", 1)) < NUM_STAGES:
        raise M4VError(f"recipe {recipe.name!r}: mmdim.num_registers must be >= {NUM_STAGES} (one register per "
                       "pyramid stage; a frame's register is its pyramid level)")
    # auto: float32 weights, so untouched weights are saved exactly as released (fp32 on disk) and the
    # trained MM-DiM parameters keep fp32 master values; on CUDA the passes run under bf16 autocast
    # (--mixed-precision auto), the precision the release runs in. --dtype bfloat16 halves memory but
    # stores and trains everything in bf16.
    if flags.dtype in ("float16", "fp16"):
        raise M4VError("--dtype float16: PyramidFlow's activations overflow float16; use bfloat16 or float32")
    for flag, folder in (("--calib", flags.calib), ("--data", flags.data)):
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise M4VError(f"{flag} {folder}: not a folder")


def convert_pyramidflow(plan) -> dict:
    """Run the planned PyramidFlow conversion; returns the summary written to ``conversion.json``.
    Inside a launched process group every process trains its share of each batch (whole samples,
    each with all its pyramid stages) and rank 0 writes the output.
    """
    from m4v_convert.convert import parse_layers
    from m4v_convert.distill.job import plot_losses, run_distillation
    from m4v_convert.backbones.pyramidflow.flops import RESOLUTIONS, markdown_report, pyramidflow_flops_report
    from m4v_convert.io.converted import save_converted
    from m4v_convert.io.output import atomic_output_dir
    from m4v_convert.jobs.convert import print_distill_report

    from .calibration import PyramidCalibSpec
    from .converted import CONVERTED_FOR_VARIANT
    from .distill import PyramidDistillAdapter
    from .layout import LATENT_PATCH
    from .loader import _FOLDER_RE, _resolve_folder, load_pyramidflow, transformer_folder_name

    opts, recipe, con, device, dtype, dist = plan.flags, plan.recipe, plan.console, plan.device, plan.dtype, plan.dist
    t_start = plan.started
    con.print(f"[bold]m4v-convert[/] {m4v_convert.__version__}  recipe [cyan]{recipe.name}[/]  "
              f"checkpoint {opts.checkpoint}")
    _check_layers_before_loading(opts, recipe)
    source_folder = _resolve_folder(Path(opts.checkpoint), recipe.resolution)  # resolved once, loaded from
    teacher = load_pyramidflow(source_folder, variant=recipe.variant, resolution=recipe.resolution,
                               dtype=dtype, device=device)
    teacher.requires_grad_(False)
    if not _FOLDER_RE.match(source_folder.name):
        # the release's 384p and 768p configs are the same architecture: only the folder name tells them apart
        con.print(f"note: {source_folder} is not named {transformer_folder_name(recipe.resolution)}/, so its resolution "
                  f"cannot be checked; the recipe's {recipe.resolution} is assumed")
    cfg = dict(teacher.config)
    n_double, n_single = _block_counts(cfg, recipe.variant)
    layers = parse_layers(plan.layer_spec, n_double + n_single)
    check_layer_selection(layers, n_double, recipe.variant, recipe.allow_double_stream, n_single,
                          _layer_source(opts.layers, recipe))
    con.print(f"loaded PyramidFlow {recipe.variant} {recipe.resolution}: {n_double} double-stream + {n_single} "
              f"single-stream blocks, {cfg['num_attention_heads']} heads × {cfg['attention_head_dim']}, "
              f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M params; converting layers {_ranges(layers)}")

    height, width, max_frames = RESOLUTIONS[recipe.resolution]
    spatial = int(recipe.video.get("spatial_compression", 8))
    full_grid = [height // spatial // LATENT_PATCH, width // spatial // LATENT_PATCH]
    torch.manual_seed(opts.seed)
    student = CONVERTED_FOR_VARIANT[recipe.variant].from_teacher(teacher)
    try:
        student.convert_(layers, recipe.mmdim, meta={"full_grid": full_grid, "resolution": recipe.resolution,
                                                     "variant": recipe.variant})
    except ValueError as e:
        raise M4VError(f"checkpoint and recipe {recipe.name!r} disagree: {e}") from None
    student.requires_grad_(False)

    # calibration / fine-tune data: pyramid-shaped, all stages per call, noised the release's way
    c = recipe.calib
    # miniFLUX's in_channels count the 2x2 patch (64 = 16·4); SD3's are the latent channels
    channels = cfg["in_channels"] if recipe.variant == "sd3" else cfg["in_channels"] // (LATENT_PATCH * LATENT_PATCH)
    spec = PyramidCalibSpec(latent_channels=channels,
                            text_dim=cfg["joint_attention_dim"], pooled_dim=cfg["pooled_projection_dim"],
                            latent_frames=c["latent_frames"], latent_height=c["latent_height"],
                            latent_width=c["latent_width"], text_len=c["text_len"],
                            flow_shift=float(c.get("flow_shift", 1.0)),
                            corrupt_ratio=float(c.get("corrupt_ratio", 1 / 3)),
                            max_token_grid=cfg.get("pos_embed_max_size") if recipe.variant == "sd3" else None)
    spec.validate(f"recipe {recipe.name} calib")
    adapter = PyramidDistillAdapter(layers=layers, spec=spec)
    report = run_distillation(teacher, student, adapter, recipe, opts, plan.distill, dist, con, device, dtype)
    result = report.stage1
    print_distill_report(con, report, scope=", all stages")
    calibration = report.calibration

    # report + save
    dplan = plan.distill
    flops = pyramidflow_flops_report(cfg, max_frames, height, width, text_len=int(recipe.video.get("text_len", 128)),
                                     converted_layers=layers, mmdim=recipe.mmdim,
                                     name=f"{recipe.name} ({Path(opts.checkpoint).name})")
    meta = {
        "toolkit": "m4v-convert", "version": m4v_convert.__version__, "source": str(Path(opts.checkpoint).resolve()),
        "recipe": recipe.name, "layers": layers, "calibration": calibration,
        "distill": {"stage1_steps": dplan.schedules[1].steps if 1 in dplan.stages else 0,
                    "lr": dplan.schedules[1].lr, "stages": dplan.stages, "train": dplan.train, "processes": dist.world,
                    "schedules": {f"stage{k}": dplan.schedules[k].to_dict() for k in dplan.stages},
                    "stage2": _later_stage(report.results, dplan, 2), "stage3": _later_stage(report.results, dplan, 3)},
    }
    record_meta = {k: v for k, v in meta.items() if k != "layers"}
    student.register_to_config(m4v={**student.config["m4v"], **record_meta, "converted_layers": layers})
    folder = transformer_folder_name(recipe.resolution)
    summary = {
        **meta,
        "transformer_folder": folder,
        "error_before": {str(k): v for k, v in result.error_before.items()},
        "error_after": {str(k): v for k, v in result.error_after.items()},
        "end_to_end_error": {"before": report.end_to_end_before, "after": report.end_to_end_after},
        "original_total_flops": flops["original_total_flops"],
        "converted_total_flops": flops["converted_total_flops"],
        "seconds": None,
    }
    if dist.is_main:
        with atomic_output_dir(opts.out, opts.overwrite) as tmp:
            save_converted(student, tmp / folder, metadata={
                "m4v_version": m4v_convert.__version__, "source": meta["source"], "recipe": recipe.name,
                "layers": ",".join(map(str, layers)), "calibration": calibration,
            })
            (tmp / "flops.json").write_text(json.dumps(flops, indent=2))
            (tmp / "flops.md").write_text(markdown_report(flops))
            (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in report.log))
            plot_losses(report.log, tmp / "loss.png")
            summary["seconds"] = round(time.time() - t_start, 1)
            (tmp / "conversion.json").write_text(json.dumps(summary, indent=2))
            (tmp / "README.md").write_text(_model_card(summary, flops, recipe, cfg, n_double, n_single))
        con.print(f"[green]wrote[/] {Path(opts.out).resolve()}  ({summary['seconds']} s)")
        con.print(f"FLOPs of the {flops['curve']['scope']} ({max_frames}×{height}×{width}): original "
                  f"{flops['original_total_flops'] / 1e12:.3f} TFLOPs → converted "
                  f"{flops['converted_total_flops'] / 1e12:.3f} TFLOPs")
    dist.barrier()
    return summary


def _later_stage(results: dict, plan, k: int) -> dict:
    """conversion.json's view of stage ``k`` (2: end-to-end, 3: flow-matching fine-tune)."""
    r = results.get(f"stage{k}")
    if r is None or k not in plan.stages:
        return {"steps": 0}
    if r.get("skipped"):
        return {"steps": 0, "skipped": r["skipped"]}
    if not r.get("steps"):
        return {"steps": 0}
    out = {"steps": r["steps"], "lr": plan.schedules[k].lr, "final_loss": r.get("final_loss")}
    for key in ("end_to_end_before", "end_to_end_after", "seconds", "samples_per_s"):
        if key in r:
            out[key] = r[key]
    return out


def _block_counts(config: dict, variant: str) -> tuple[int, int]:
    return int(config.get("num_layers", 0)), (0 if variant == "sd3" else int(config.get("num_single_layers", 0)))


def _check_layers_before_loading(opts, recipe) -> None:
    """Refuse a bad ``--layers`` from the checkpoint's config.json, before reading any weight.

    Anything unexpected about the folder is left to the loader, which says what is wrong.
    """
    from m4v_convert.convert import parse_layers

    from .loader import CLASS_NAMES, _read_config, _resolve_folder

    try:
        config = _read_config(_resolve_folder(Path(opts.checkpoint), recipe.resolution))
    except M4VError:
        return
    if CLASS_NAMES.get(config.get("_class_name")) != recipe.variant:
        return
    n_double, n_single = _block_counts(config, recipe.variant)
    layers = parse_layers(opts.layers or recipe.default_layers, n_double + n_single)
    check_layer_selection(layers, n_double, recipe.variant, recipe.allow_double_stream, n_single,
                          _layer_source(opts.layers, recipe))


def _stage2_line(stage2: dict) -> str:
    if not stage2.get("steps"):
        return "stage 2 (end-to-end) not run"
    return (f"stage 2 (end-to-end against the teacher's predictions), {stage2['steps']} steps: end-to-end error "
            f"{stage2['end_to_end_before']:.4f} → {stage2['end_to_end_after']:.4f}")


def _stage3_line(stage3: dict) -> str:
    if not stage3.get("steps"):
        why = f" ({stage3['skipped']})" if stage3.get("skipped") else ""
        return f"stage 3 (flow-matching fine-tune) not run{why}"
    return (f"stage 3 (the release's pyramidal flow matching on `--data`), {stage3['steps']} steps: end-to-end error "
            f"vs the teacher {stage3['end_to_end_before']:.4f} → {stage3['end_to_end_after']:.4f}")


def _model_card(summary: dict, flops: dict, recipe, cfg: dict, n_double: int, n_single: int) -> str:
    before, after = summary["error_before"], summary["error_after"]
    rows = "\n".join(f"| {i} | {before[i]:.4f} | {after[i]:.4f} |" for i in before)
    folder = summary["transformer_folder"]
    return f"""# Converted with m4v-convert {summary['version']}

- source: `{summary['source']}`
- recipe: `{recipe.name}` ({recipe.description})
- model: PyramidFlow {recipe.variant} {recipe.resolution}, {n_double} double-stream + {n_single} single-stream blocks,
  {cfg['num_attention_heads']} heads × {cfg['attention_head_dim']}
- converted layers: {_ranges(summary['layers'])} (MM-DiM in place of the attention; double-stream / joint
  blocks, layers below {n_double}, get an MM-DiM with its own text projections)
- distillation: stage 1 (teacher-forced attention transfer), {summary['distill']['stage1_steps']} steps,
  lr {summary['distill']['lr']}; {_stage2_line(summary['distill']['stage2'])};
  {_stage3_line(summary['distill']['stage3'])} (trained in stages 2/3: {summary['distill']['train']})
{_calibration_line(summary['calibration'])}

The transformer is in `{folder}/` (the release's folder layout). Load it with
`m4v_convert.load_converted(path)`; it takes exactly the inputs of `PyramidFluxTransformer`.

## Per-layer relative error (held-out calibration batch, all pyramid stages)

| layer | before distillation | after |
|---:|---:|---:|
{rows}

## FLOPs

See `flops.md` / `flops.json`: {flops['curve']['scope'].split(' at ')[0]} at the last unit of a {flops['video']['frames']}-frame
{flops['video']['height']}×{flops['video']['width']} video: original {flops['original_total_flops'] / 1e12:.3f} TFLOPs,
converted {flops['converted_total_flops'] / 1e12:.3f} TFLOPs.
"""


def published_flops(recipe, config: dict, model: str, size: tuple[int, int] | None, frames: int | None,
                    layers: str | None, crosscheck: bool) -> tuple[dict, str]:
    """``m4v-convert flops`` for a published PyramidFlow config (registry entry ``pyramidflow``);
    defaults: the recipe's resolution and the release's maximum frames."""
    from m4v_convert.convert import parse_layers
    from m4v_convert.backbones.pyramidflow.flops import RESOLUTIONS, markdown_report, pyramidflow_flops_report

    height, width, max_frames = RESOLUTIONS[recipe.resolution]
    if size is not None:
        height, width = size
    n_double = int(config.get("num_layers", 8))
    n_single = 0 if recipe.variant == "sd3" else int(config.get("num_single_layers", 16))
    chosen = parse_layers(layers or recipe.default_layers, n_double + n_single)
    check_layer_selection(chosen, n_double, recipe.variant, recipe.allow_double_stream, n_single,
                          _layer_source(layers, recipe))
    try:
        report = pyramidflow_flops_report(config, frames or max_frames, height, width,
                                          text_len=int(recipe.video.get("text_len", 128)), converted_layers=chosen,
                                          mmdim=recipe.mmdim, name=recipe.name, crosscheck=crosscheck)
    except ValueError as e:
        raise M4VError(str(e)) from None
    return report, markdown_report(report)
