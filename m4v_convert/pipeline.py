"""The conversion job, one way through: load → select → swap → distill → save → report.

The CLI only parses flags into :class:`ConvertOptions` and calls :func:`convert`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import m4v_convert
from m4v_convert.errors import M4VError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ConvertOptions:
    recipe: str
    checkpoint: Path
    out: Path
    layers: str | None = None
    distill_steps: int | None = None
    calib: Path | None = None
    device: str = "auto"
    dtype: str = "float32"
    overwrite: bool = False
    seed: int = 0
    report_size: tuple[int, int] = (480, 832)
    report_frames: int = 81


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise M4VError(f"--device: expected auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise M4VError("--device cuda: no CUDA device is available on this machine")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise M4VError(f"--dtype: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _console(console):
    if console is not None:
        return console
    from rich.console import Console

    return Console(stderr=True)


def convert(opts: ConvertOptions, console=None) -> dict:
    """Run the whole conversion; returns the summary written to ``conversion.json``."""
    from m4v_convert.backbones.wan import M4VWanTransformer3DModel, record_teacher_layers
    from m4v_convert.backbones.wan_io import load_wan_transformer
    from m4v_convert.convert import parse_layers
    from m4v_convert.distill.calibration import CalibSpec, folder_samples, noised_batch, synthetic_samples
    from m4v_convert.distill.stage1 import Stage1Settings, run_stage1
    from m4v_convert.io.converted import save_converted
    from m4v_convert.io.output import atomic_output_dir, check_output_dir
    from m4v_convert.recipes import load_recipe

    con = _console(console)
    t_start = time.time()
    recipe = load_recipe(opts.recipe)  # validated before any weight is read
    if recipe.backbone != "wan":
        raise M4VError(f"recipe {recipe.name!r} is for backbone {recipe.backbone!r}; this command converts Wan2.1")
    check_output_dir(opts.out, opts.overwrite)
    device, dtype = resolve_device(opts.device), resolve_dtype(opts.dtype)
    if opts.distill_steps is not None and opts.distill_steps < 0:
        raise M4VError(f"--distill-steps: expected >= 0, got {opts.distill_steps}")

    con.print(f"[bold]m4v-convert[/] {m4v_convert.__version__}  recipe [cyan]{recipe.name}[/]  "
              f"checkpoint {opts.checkpoint}")
    teacher = load_wan_transformer(opts.checkpoint, dtype=dtype, device=device)
    teacher.requires_grad_(False)
    cfg = dict(teacher.config)
    layers = parse_layers(opts.layers or recipe.default_layers, cfg["num_layers"])
    con.print(f"loaded WanTransformer3DModel: {cfg['num_layers']} layers, {cfg['num_attention_heads']} heads × "
              f"{cfg['attention_head_dim']}, {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M params; "
              f"converting layers {_ranges(layers)}")

    student = M4VWanTransformer3DModel.from_teacher(teacher)
    try:
        student.convert_(layers, recipe.mmdim)
    except ValueError as e:
        raise M4VError(f"checkpoint and recipe {recipe.name!r} disagree: {e}") from None
    student.requires_grad_(False)
    blocks = {i: student.blocks[i].attn1.mmdim for i in layers}
    for blk in blocks.values():
        blk.requires_grad_(True)

    # calibration data
    c = recipe.calib
    spec = CalibSpec(in_channels=cfg["in_channels"], text_dim=cfg["text_dim"], latent_frames=c["latent_frames"],
                     latent_height=c["latent_height"], latent_width=c["latent_width"], text_len=c["text_len"],
                     flow_shift=float(c.get("flow_shift", 1.0)))
    if opts.calib is not None:
        samples = folder_samples(opts.calib, spec)
        calib_source = f"folder:{opts.calib}"
    else:
        samples = synthetic_samples(spec, int(c.get("num_samples", 16)), seed=opts.seed)
        calib_source = "synthetic"
        con.print("[yellow]calibration: SYNTHETIC batches (random latents and text embeddings); pass --calib DIR "
                  "with real latents for a useful conversion[/]")
    bs = int(c.get("batch_size", 1))
    n_eval = int(c.get("eval_batches", 1))
    if len(samples) < bs * (n_eval + 1):
        raise M4VError(f"calibration: {len(samples)} samples, need at least {bs * (n_eval + 1)} "
                       f"(batch_size {bs} × ({n_eval} eval + 1 train) batches)")
    gen = torch.Generator().manual_seed(opts.seed)
    eval_batches = [noised_batch(samples[i * bs:(i + 1) * bs], spec, gen, device, dtype) for i in range(n_eval)]
    train_pool = samples[n_eval * bs:]

    def train_batch(step: int) -> dict:
        idx = torch.randint(len(train_pool), (bs,), generator=gen).tolist()
        return noised_batch([train_pool[i] for i in idx], spec, gen, device, dtype)

    s1 = recipe.stage1()
    settings = Stage1Settings(steps=opts.distill_steps if opts.distill_steps is not None else int(s1.get("steps", 100)),
                              lr=float(s1.get("lr", 1e-3)), weight_decay=float(s1.get("weight_decay", 0.0)),
                              grad_clip=float(s1.get("grad_clip", 1.0)))
    result = _run_stage1_with_progress(con, blocks, lambda b: record_teacher_layers(teacher, b, layers),
                                       train_batch, eval_batches, settings)
    _print_errors(con, result)

    # report + save
    from m4v_convert.flops.report import build_wan_flops_report, write_flops_report

    height, width = opts.report_size
    flops = build_wan_flops_report(cfg, opts.report_frames, height, width,
                                   text_len=int(recipe.video.get("text_len", 512)), converted_layers=layers,
                                   mmdim_config=recipe.mmdim, name=f"{recipe.name} ({Path(opts.checkpoint).name})")
    meta = {
        "toolkit": "m4v-convert", "version": m4v_convert.__version__, "source": str(Path(opts.checkpoint).resolve()),
        "recipe": recipe.name, "layers": layers, "calibration": calib_source,
        "distill": {"stage1_steps": settings.steps, "lr": settings.lr},
    }
    # config["m4v"]["layers"] holds the per-layer MMDiMConfig dicts; the plain list goes under its own key
    record = {k: v for k, v in meta.items() if k != "layers"}
    student.register_to_config(m4v={**student.config["m4v"], **record, "converted_layers": layers})
    summary = {
        **meta,
        "error_before": {str(k): v for k, v in result.error_before.items()},
        "error_after": {str(k): v for k, v in result.error_after.items()},
        "original_total_flops": flops["original_total_flops"],
        "converted_total_flops": flops["converted_total_flops"],
        "seconds": None,
    }
    with atomic_output_dir(opts.out, opts.overwrite) as tmp:
        save_converted(student, tmp, metadata={
            "m4v_version": m4v_convert.__version__, "source": meta["source"], "recipe": recipe.name,
            "layers": ",".join(map(str, layers)), "calibration": calib_source,
        })
        write_flops_report(flops, tmp)
        summary["seconds"] = round(time.time() - t_start, 1)
        (tmp / "conversion.json").write_text(json.dumps(summary, indent=2))
        (tmp / "README.md").write_text(_model_card(summary, flops, recipe, cfg))
    con.print(f"[green]wrote[/] {Path(opts.out).resolve()}  ({summary['seconds']} s)")
    con.print(f"FLOPs at {opts.report_frames}×{height}×{width}: original {flops['original_total_flops'] / 1e12:.3f} "
              f"TFLOPs → converted {flops['converted_total_flops'] / 1e12:.3f} TFLOPs")
    return summary


def _run_stage1_with_progress(con, blocks, record, train_batch, eval_batches, settings):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from m4v_convert.distill.stage1 import run_stage1

    with Progress(TextColumn("stage 1 (attention transfer)"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
                  console=con, transient=False) as progress:
        task = progress.add_task("stage1", total=settings.steps, losses="")

        def on_step(step, losses):
            shown = " ".join(f"L{i}:{v:.3f}" for i, v in list(losses.items())[:6])
            more = f" (+{len(losses) - 6})" if len(losses) > 6 else ""
            progress.update(task, advance=1, losses=f"loss {shown}{more}")

        return run_stage1(blocks, record, train_batch, eval_batches, settings, progress=on_step)


def _print_errors(con, result) -> None:
    from rich.table import Table

    table = Table(title="per-layer relative error ‖student − teacher‖ / ‖teacher‖ (held-out batch)")
    table.add_column("layer", justify="right")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for i in result.error_before:
        table.add_row(str(i), f"{result.error_before[i]:.4f}", f"{result.error_after[i]:.4f}")
    con.print(table)


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(layers):
        if start is None:
            start = v
        if i + 1 == len(layers) or layers[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


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
- distillation: stage 1 (teacher-forced attention transfer), {summary['distill']['stage1_steps']} steps, lr {summary['distill']['lr']}
- calibration data: **{summary['calibration']}**{' — random latents and text embeddings, not real videos: this model is NOT ready for generation quality, distill it on real latents (`--calib`)' if synthetic else ''}

Load it with `m4v_convert.load_converted(path)`; it takes exactly the inputs of the original
`WanTransformer3DModel` and drops into `diffusers.WanPipeline(transformer=...)`.

## Per-layer relative error (held-out calibration batch)

| layer | before distillation | after |
|---:|---:|---:|
{rows}

## FLOPs

See `flops.md` / `flops.json` / `flops.png`: original {flops['original_total_flops'] / 1e12:.3f} TFLOPs,
converted {flops['converted_total_flops'] / 1e12:.3f} TFLOPs per forward at the report size.
"""
