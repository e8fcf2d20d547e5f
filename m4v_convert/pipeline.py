"""The conversion job, one way through: load → select → swap → distill → save → report.

The CLI only parses flags into :class:`ConvertOptions` and calls :func:`convert`.
"""

from __future__ import annotations

import json
import os
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
    # distillation schedule and training (m4v_convert.distill.job); None = the recipe's value
    stages: str | None = None
    stage2_steps: int | None = None
    stage3_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    feature_weight: float | None = None
    checkpoint_every: int | None = None
    train: str | None = None
    data: Path | None = None
    teacher_calib: bool = False
    calib_cache: Path | None = None
    run_dir: Path | None = None
    resume: Path | None = None
    num_processes: int = 1
    grad_checkpointing: bool = False
    mixed_precision: str = "auto"
    deterministic: bool = False


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
    """Run the whole conversion; returns the summary written to ``conversion.json``.

    With ``num_processes > 1`` (outside a launched process group) it re-launches itself through
    accelerate's launcher; inside one (``accelerate launch`` / ``torchrun``) every process trains
    its share of each batch and rank 0 writes the output.
    """
    from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
    from m4v_convert.backbones.wan.distill import WanDistillAdapter
    from m4v_convert.backbones.wan.load import load_wan_transformer
    from m4v_convert.convert import parse_layers
    from m4v_convert.distill.calibration import CalibSpec
    from m4v_convert.distill.distributed import in_distributed_env
    from m4v_convert.distill.job import make_plan, plot_losses, run_distillation
    from m4v_convert.io.converted import save_converted
    from m4v_convert.io.output import atomic_output_dir, check_output_dir
    from m4v_convert.recipes import load_recipe

    con = _console(console)
    t_start = time.time()
    recipe = load_recipe(opts.recipe)  # validated before any weight is read
    if recipe.backbone != "wan":
        raise M4VError(f"recipe {recipe.name!r} is for backbone {recipe.backbone!r}; this command converts Wan2.1")
    if opts.num_processes < 1:
        raise M4VError(f"--num-processes: expected >= 1, got {opts.num_processes}")
    if opts.num_processes > 1 and not in_distributed_env():
        return launch_processes(opts, recipe, con)
    device, dtype = resolve_device(opts.device), resolve_dtype(opts.dtype)
    dist, device, con = join_process_group(device, con)
    check_output_dir(opts.out, opts.overwrite)
    if opts.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    plan = make_plan(recipe, opts, device)  # flags, schedule, run folder, --resume checkpoint

    con.print(f"[bold]m4v-convert[/] {m4v_convert.__version__}  recipe [cyan]{recipe.name}[/]  "
              f"checkpoint {opts.checkpoint}" + (f"  ({dist.world} processes)" if dist.enabled else ""))
    teacher = load_wan_transformer(opts.checkpoint, dtype=dtype, device=device)
    teacher.requires_grad_(False)
    cfg = dict(teacher.config)
    layers = parse_layers(opts.layers or recipe.default_layers, cfg["num_layers"])
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
    report = run_distillation(teacher, student, adapter, recipe, opts, plan, dist, con, device, dtype)
    result = report.stage1
    print_distill_report(con, report)

    # report + save
    from m4v_convert.backbones.wan.flops import build_wan_flops_report
    from m4v_convert.flops.report import write_flops_report

    height, width = opts.report_size
    flops = build_wan_flops_report(cfg, opts.report_frames, height, width,
                                   text_len=int(recipe.video.get("text_len", 512)), converted_layers=layers,
                                   mmdim_config=recipe.mmdim, name=f"{recipe.name} ({Path(opts.checkpoint).name})")
    s1 = plan.schedules[1]
    meta = {
        "toolkit": "m4v-convert", "version": m4v_convert.__version__, "source": str(Path(opts.checkpoint).resolve()),
        "recipe": recipe.name, "layers": layers, "calibration": report.calibration,
        "distill": {"stage1_steps": s1.steps if 1 in plan.stages else 0, "lr": s1.lr, "stages": plan.stages,
                    "train": plan.train, "processes": dist.world,
                    "schedules": {f"stage{k}": plan.schedules[k].to_dict() for k in plan.stages},
                    "feature_weight": plan.feature_weight},
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
        con.print(f"FLOPs at {opts.report_frames}×{height}×{width}: original {flops['original_total_flops'] / 1e12:.3f} "
                  f"TFLOPs → converted {flops['converted_total_flops'] / 1e12:.3f} TFLOPs")
    dist.barrier()
    return summary


def join_process_group(device: torch.device, con):
    """(dist context, this process's device, its console) inside a launched run (no-op outside one):
    each process takes its local GPU, and only rank 0 prints."""
    from m4v_convert.distill.distributed import init_distributed

    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_main:
        from rich.console import Console

        con = Console(stderr=True, quiet=True)
    return dist, device, con


def launch_processes(opts, recipe, con) -> dict:
    """``--num-processes N``: check what can be checked here, then run N processes of the recipe's
    backbone job (its registry entry, see ``distill/worker.py``) via accelerate."""
    import dataclasses

    from m4v_convert.distill.distributed import launch
    from m4v_convert.distill.job import make_plan
    from m4v_convert.io.output import check_output_dir

    n = opts.num_processes
    device = resolve_device(opts.device)
    if opts.dtype != "auto":
        resolve_dtype(opts.dtype)
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise M4VError(f"--num-processes {n}: only {torch.cuda.device_count()} CUDA devices on this machine")
    check_output_dir(opts.out, opts.overwrite)
    make_plan(recipe, opts, device)
    c = recipe.calib
    if opts.calib is None:
        train = int(c.get("num_samples", 16)) - int(c.get("batch_size", 1)) * int(c.get("eval_batches", 1))
        if n > train:
            raise M4VError(f"--num-processes {n}: the recipe's synthetic calibration has only {train} training "
                           "samples; every process needs at least one of its own: use fewer processes or more "
                           "samples (calib.num_samples)")
    con.print(f"launching {n} processes through accelerate ({device.type})")
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()}
    rc = launch(options, n, job=recipe.backbone)
    if rc != 0:
        raise M4VError(f"--num-processes {n}: the processes failed (exit status {rc}; their first error is printed "
                       "above); nothing was written to --out")
    return json.loads((Path(opts.out) / "conversion.json").read_text())


def print_distill_report(con, report, scope: str = "") -> None:
    """The held-out errors of a finished distillation: per layer (stage 1), end to end (stages 2/3)."""
    if report.stage1.error_before:
        _print_errors(con, report.stage1)
    if report.end_to_end_before is not None:
        con.print(f"end-to-end relative error ‖v_student − v_teacher‖ / ‖v_teacher‖ (held-out batch{scope}): "
                  f"{report.end_to_end_before:.4f} before stage 2/3 → {report.end_to_end_after:.4f} after")


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
