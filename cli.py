"""m4v-convert command line: parse flags and dispatch; the work lives in ``m4v_convert``."""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert pretrained video diffusion transformers to MM-DiM (Mamba) hybrids.")


def _fail(message: str, code: int = 2):
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn user-input errors into one clear message and a non-zero exit (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from m4v_convert.errors import M4VError

        try:
            return fn(*args, **kwargs)
        except M4VError as e:
            _fail(str(e))
        except KeyboardInterrupt as e:
            what = "terminated (SIGTERM)" if _TERMINATED else "interrupted"
            _fail(f"{what}; {str(e) or '--out was not written'}", 143 if _TERMINATED else 130)

    return wrapper


# options several commands share (one definition, one help text)
_LR = typer.Option(None, "--lr", help="learning rate of every stage (default: recipe, per stage)")
_CHECKPOINT_EVERY = typer.Option(None, "--checkpoint-every", help="steps between resumable checkpoints, every "
                                 "stage (0: none)")
_RUN_DIR = typer.Option(None, "--run-dir", help="training state folder (default: <out>.train when checkpointing)")
_RESUME = typer.Option(None, "--resume", help="continue the run whose state is in this folder")
_MIXED_PRECISION = typer.Option("auto", "--mixed-precision", help="auto (bf16 autocast on GPU) | bf16 | no")
_STAGE3_STEPS = typer.Option(None, "--stage3-steps", help="stage-3 (fine-tune) steps")
_NUM_PROCESSES = typer.Option(1, "--num-processes", help="data-parallel processes (launched via accelerate)")
_FSDP = typer.Option(False, "--fsdp", help="shard teacher and student across the processes with FSDP2 (one block "
                     "per group; each process holds 1/N of the weights and training state) instead of replicating them")
_OUT = typer.Option(..., "--out", help="output folder (written atomically)")
_LAYERS = typer.Option(None, "--layers", help="'all', '0-9', '0,2,4' or mixes (default: recipe); 'auto' with "
                       "--flops-budget: the layers the teacher misses least that fit the budget")
_DISTILL_STEPS = typer.Option(None, "--distill-steps", help="stage-1 steps (default: recipe)")
_STAGES = typer.Option(None, "--stages", help="distillation stages to run, e.g. 1,2,3 (default: recipe; stage 3 "
                       "runs only with --data)")
_CALIB = typer.Option(None, "--calib", help="folder of calibration safetensors (latents + text_embeds); default: "
                      "synthetic")
_DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda")
_DTYPE = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16")
_OVERWRITE = typer.Option(False, "--overwrite", help="replace an existing --out folder")
_SEED = typer.Option(0, "--seed")
_TEACHER_CALIB = typer.Option(False, "--teacher-calib", help="calibrate on latents sampled by the teacher (text "
                              "conditions from --calib, else synthetic)")
_CALIB_CACHE = typer.Option(None, "--calib-cache", help="cache folder of teacher-generated calibration (implies "
                            "--teacher-calib) or of the samples of --prompts / --videos, reused by later runs")
_FEATURE_WEIGHT = typer.Option(None, "--feature-weight", help="stage-2 weight of the per-layer feature loss")
_DATA = typer.Option(None, "--data", help="stage-3 fine-tune data: folder of latents + text_embeds safetensors (the "
                     "--calib format)")
_GRAD_CHECKPOINTING = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing", help="recompute "
                                   "activations in backward: less memory, about a third more compute per step "
                                   "(default: the recipe's distill.grad_checkpointing)")
_DETERMINISTIC = typer.Option(False, "--deterministic", help="deterministic algorithms only")
_THREADS = typer.Option(None, "--threads", min=1, help="CPU intra-op threads (default: torch's choice; 1 is fastest "
                        "for small models, especially on busy cores)")


@app.command("convert")
@user_errors
def convert_cmd(
    recipe: str = typer.Argument(..., help="recipe name or YAML file (any backbone: wan, pyramidflow, generic)"),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="the model to convert: for Wan2.1 a diffusers, "
                                    "pipeline or original-layout folder or a .safetensors file; for PyramidFlow the "
                                    "release folder (holding diffusion_transformer_768p/ or _384p/) or one such "
                                    "folder; for generic recipes a diffusers folder"),
    out: Path = _OUT,
    layers: Optional[str] = _LAYERS,
    flops_budget: Optional[float] = typer.Option(None, "--flops-budget", help="with --layers auto: the converted "
                                                 "model's FLOPs at most this fraction of the original's (e.g. 0.4)"),
    probe_steps: Optional[int] = typer.Option(None, "--probe-steps", help="with --layers auto: stage-1 steps that "
                                              "measure each layer's sensitivity (default 100)"),
    model: Optional[str] = typer.Option(None, "--model", help="published config of the recipe for a single-file "
                                        "--checkpoint (generic recipes)"),
    distill_steps: Optional[int] = _DISTILL_STEPS,
    stage2_steps: Optional[int] = typer.Option(None, "--stage2-steps", help="stage-2 (end-to-end) steps (default: "
                                               "recipe; 0: skip)"),
    stage3_steps: Optional[int] = _STAGE3_STEPS,
    stages: Optional[str] = _STAGES,
    calib: Optional[Path] = _CALIB,
    device: str = _DEVICE,
    dtype: str = typer.Option("auto", "--dtype", help="weights: auto (float32, with bf16 autocast on CUDA) | float32 "
                              "| bfloat16 (less memory; trains in bf16) | float16 (not PyramidFlow)"),
    overwrite: bool = _OVERWRITE,
    seed: int = _SEED,
    size: Optional[str] = typer.Option(None, "--size", help="video size HxW for the FLOPs report (default: Wan "
                                       "480x832, generic recipes: the recipe's; PyramidFlow: its resolution)"),
    frames: Optional[int] = typer.Option(None, "--frames", help="video frames for the FLOPs report (default: Wan 81, "
                                         "generic recipes: the recipe's)"),
    lr: Optional[float] = _LR,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="samples per process and step, every stage"),
    feature_weight: Optional[float] = _FEATURE_WEIGHT,
    train: Optional[str] = typer.Option(None, "--train", help="what stages 2/3 train: mmdim | all | lora (Wan, "
                                        "PyramidFlow)"),
    data: Optional[Path] = _DATA,
    teacher_calib: bool = _TEACHER_CALIB,
    calib_cache: Optional[Path] = _CALIB_CACHE,
    checkpoint_every: Optional[int] = _CHECKPOINT_EVERY,
    run_dir: Optional[Path] = _RUN_DIR,
    resume: Optional[Path] = _RESUME,
    num_processes: int = _NUM_PROCESSES,
    fsdp: bool = _FSDP,
    grad_checkpointing: Optional[bool] = _GRAD_CHECKPOINTING,
    layer_groups: Optional[int] = typer.Option(None, "--layer-groups", help="train the converted layers in K groups "
                                               "one after another, in every stage (gradients and optimizer state "
                                               "of one group at a time; default: the recipe's, else 1)"),
    mixed_precision: str = _MIXED_PRECISION,
    deterministic: bool = _DETERMINISTIC,
    threads: Optional[int] = _THREADS,
    dry_run: bool = typer.Option(False, "--dry-run", help="check everything, print the memory plan (peak per "
                                 "process: weights, training state, activations) and stop before any weight is read"),
    memory_check: bool = typer.Option(True, "--memory-check/--no-memory-check", help="refuse a run whose memory plan "
                                      "exceeds the free memory of its device"),
    copy_components: bool = typer.Option(False, "--copy-components", help="with a pipeline folder as --checkpoint: "
                                         "copy its other components into --out (default: hard links where possible)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="calibrate on the teacher's own videos of these "
                                           "prompts (one per line, or .jsonl with prompt / negative_prompt); needs a "
                                           "pipeline folder as --checkpoint (Wan; generic recipes with a pipeline: "
                                           "section)"),
    videos: Optional[Path] = typer.Option(None, "--videos", help="calibrate on these videos (a folder of video "
                                          "files, each with a same-named .txt caption), encoded by the pipeline's "
                                          "VAE and text encoder; needs a pipeline folder as --checkpoint (Wan)"),
    calib_size: Optional[str] = typer.Option(None, "--calib-size", help="with --prompts / --videos: HxW of the "
                                             "samples (default: the recipe's calibration latents x 8)"),
    calib_frames: Optional[int] = typer.Option(None, "--calib-frames", help="with --prompts / --videos: 4k+1 frames "
                                               "per sample at 16 fps (default: the recipe's calibration latents)"),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="with --prompts: classifier-free "
                                                   "guidance of the teacher's sampling (default: the pipeline's; "
                                                   "Wan 5.0)"),
    teacher_steps: Optional[int] = typer.Option(None, "--teacher-steps", help="denoising steps of each teacher "
                                                "sample (default: the recipe's calib.teacher_steps)"),
):
    """Convert the model a recipe describes (any backbone): load, swap attention for MM-DiM, distill, save,
    report FLOPs."""
    _run_conversion(None, **locals())


def _run_conversion(backbone: Optional[str], *, threads: Optional[int], size: Optional[str], frames: Optional[int],
                    calib_size: Optional[str] = None, **flags) -> None:
    """A conversion command's flags → the conversion job (``backbone``: the one a backbone command converts)."""
    from m4v_convert.jobs.convert import run_conversion
    from m4v_convert.jobs.plan import ConvertFlags

    _set_threads(threads)
    run_conversion(ConvertFlags.from_flags(**flags, report_size=_parse_size(size) if size else None,
                                           report_frames=frames,
                                           calib_size=_parse_size(calib_size, "--calib-size") if calib_size else None),
                   command=backbone)


def _backbone_command(name: str, backbone: str, default_recipe: str, doc: str) -> None:
    """``m4v-convert NAME``: ``convert`` for one backbone, its recipe a ``--recipe`` option (default
    ``default_recipe``) that must be that backbone's; every other flag as ``convert``'s."""
    sig = inspect.signature(convert_cmd, eval_str=True)  # real types: typer reads them off __signature__
    params = [p.replace(default=typer.Option(default_recipe, "--recipe", help="recipe name or YAML file"))
              if p.name == "recipe" else p for p in sig.parameters.values()]

    @user_errors
    def command(**flags):
        _run_conversion(backbone, **flags)

    command.__signature__ = sig.replace(parameters=params)
    command.__doc__ = doc
    app.command(name)(command)


_backbone_command("wan2.1", "wan", "wan2.1", "Convert a Wan2.1 checkpoint: swap self-attention for MM-DiM, distill, "
                  "save, report FLOPs (`convert` for Wan recipes).")
_backbone_command("pyramidflow", "pyramidflow", "pyramidflow-miniflux-768p", "Convert a PyramidFlow checkpoint: "
                  "single-stream (and allowed joint) attention -> MM-DiM, distill, save, report FLOPs (`convert` for "
                  "PyramidFlow recipes).")


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import os

        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)  # processes launched for --num-processes
        torch.set_num_threads(threads)


def _parse_size(size: str, flag: str = "--size") -> tuple[int, int]:
    from m4v_convert.errors import M4VError

    try:
        h, w = (int(v) for v in size.lower().split("x"))
        if h <= 0 or w <= 0:
            raise ValueError
        return h, w
    except ValueError:
        raise M4VError(f"{flag}: expected HEIGHTxWIDTH like 480x832, got {size!r}") from None


@app.command("flops")
@user_errors
def flops(
    recipe: str = typer.Argument(..., help="recipe name or YAML file"),
    model: Optional[str] = typer.Option(None, "--model", help="published config of the recipe, e.g. 1.3b or 14b "
                                        "(needed when the recipe ships several)"),
    size: Optional[str] = typer.Option(None, "--size", help="HEIGHTxWIDTH in pixels (default: 480x832 for Wan, "
                                       "the recipe's resolution for PyramidFlow)"),
    frames: Optional[int] = typer.Option(None, "--frames", help="number of video frames (pixels; default: 81 for "
                                         "Wan, the release maximum for PyramidFlow)"),
    layers: Optional[str] = typer.Option(None, "--layers", help="layers to convert (default: recipe)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON here"),
    crosscheck: bool = typer.Option(True, "--crosscheck/--no-crosscheck",
                                    help="cross-check with FlopCounterMode on the meta device"),
):
    """FLOPs report for a published full-size config (meta device, no weights needed)."""
    from m4v_convert.backbones import registry
    from m4v_convert.errors import M4VError
    from m4v_convert.io.output import check_output_file, write_output_file
    from m4v_convert.recipes import load_recipe

    rec = load_recipe(recipe)
    model, cfg = rec.published_config(model)
    if frames is not None and frames < 1:
        raise M4VError(f"--frames: expected >= 1, got {frames}")
    if json_path is not None:
        check_output_file(json_path, "--json")
    report, markdown = registry.for_recipe(rec).flops_report(rec, cfg, model, _parse_size(size) if size else None,
                                                             frames, layers, crosscheck)
    typer.echo(markdown)
    if json_path is not None:
        write_output_file(json_path, json.dumps(report, indent=2), "--json")


@app.command("recipes")
@user_errors
def recipes(
    check: Optional[str] = typer.Option(None, "--check", help="validate this recipe (name or YAML file) against "
                                        "--checkpoint or a published config, without converting anything"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="with --check: the model folder"),
    model: Optional[str] = typer.Option(None, "--model", help="with --check: a published config of the recipe "
                                        "(built on the meta device)"),
    layers: Optional[str] = typer.Option(None, "--layers", help="with --check: layers to convert (default: recipe)"),
):
    """List the shipped recipes; with --check FILE, show what a recipe would replace in a model."""
    from m4v_convert.recipes import describe_recipes, load_recipe

    if check is None:
        if checkpoint is not None or model is not None or layers is not None:
            from m4v_convert.errors import M4VError

            raise M4VError("--checkpoint / --model / --layers go with --check RECIPE")
        for name, description in describe_recipes():
            typer.echo(f"{name:<28} {description}")
        return
    from m4v_convert.backbones import registry

    rec = load_recipe(check)
    report = registry.for_recipe(rec).check(rec, checkpoint, model, layers)
    for line in report.lines():
        typer.echo(line)
    typer.echo("ok: nothing was converted")


@app.command("eval")
@user_errors
def eval_cmd(
    teacher: Path = typer.Argument(..., help="the original (teacher) checkpoint: Wan2.1, or a PyramidFlow release "
                                   "folder"),
    student: Path = typer.Argument(..., help="a model converted from it by m4v-convert"),
    out: Path = typer.Option(..., "--out", help="output folder: metrics.json, frames.png (+ samples.gif for Wan)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Wan: file with one prompt per line "
                                           "(default: the built-in held-out prompts)"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="noise seeds per prompt / condition (default: 4 "
                                        "Wan, 2 PyramidFlow)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Euler sampling steps (default: Wan 20; PyramidFlow "
                                        "10 per pyramid stage)"),
    shift: Optional[float] = typer.Option(None, "--shift", help="Wan: sampler timestep shift (default 3)"),
    task: Optional[Path] = typer.Option(None, "--task", help="Wan: synthetic task JSON (default: TEACHER/task.json)"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="PyramidFlow: text conditions and latents in the "
                                         "PyramidFlow --calib format (default: synthetic conditions)"),
    conditions: Optional[int] = typer.Option(None, "--conditions", help="PyramidFlow: synthetic text conditions "
                                             "without --calib (default 4)"),
    frames: Optional[int] = typer.Option(None, "--frames", help="PyramidFlow: latent frames per sample (default: "
                                         "the recipe's calibration size)"),
    device: str = _DEVICE,
    overwrite: bool = _OVERWRITE,
    threads: Optional[int] = _THREADS,
):
    """Fidelity of STUDENT against TEACHER: prediction error, same-seed sample PSNR/SSIM, and (Wan, on the
    synthetic task) prompt adherence."""
    from m4v_convert.backbones import registry
    from m4v_convert.io.converted import read_converted_config

    _set_threads(threads)
    student_path = Path(student).expanduser()
    if not student_path.exists():
        _fail(f"student {student_path} does not exist")
    entry, _ = registry.find_converted(read_converted_config(student_path))  # refuses a model not converted
    entry.run_eval(entry.eval_from_flags(
        teacher=teacher, student=student, out=out, prompts=prompts, seeds=seeds, steps=steps, shift=shift, task=task,
        calib=calib, conditions=conditions, frames=frames, device=device, overwrite=overwrite))


@app.command("generate")
@user_errors
def generate_cmd(
    model: Path = typer.Argument(..., help="a converted pipeline folder (convert with a pipeline folder as --checkpoint)"),
    prompt: str = typer.Option(..., "--prompt", help="what the video shows"),
    output: Path = typer.Option(..., "--output", help="the video to write (.mp4 or .gif)"),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="classifier-free guidance's "
                                                  "negative prompt (default: the pipeline's)"),
    size: Optional[str] = typer.Option(None, "--size", help="HxW, multiples of 16 (default: the pipeline's, Wan "
                                       "480x832)"),
    frames: Optional[int] = typer.Option(None, "--frames", help="4k+1 frames (default: the pipeline's, Wan 81)"),
    steps: int = typer.Option(50, "--steps", help="denoising steps"),
    guidance_scale: float = typer.Option(5.0, "--guidance-scale", help="classifier-free guidance scale"),
    seed: int = _SEED,
    fps: int = typer.Option(16, "--fps", help="frames per second of the file (Wan: 16)"),
    compare: Optional[Path] = typer.Option(None, "--compare", help="the original pipeline folder: also run it with "
                                           "the same seed, write both side by side (OUTPUT-compare) and the speed "
                                           "ratio"),
    device: str = _DEVICE,
    overwrite: bool = _OVERWRITE,
    threads: Optional[int] = _THREADS,
):
    """A video from a converted pipeline with diffusers, timed per denoising step (and, with --compare, beside
    the original's)."""
    from m4v_convert.jobs.generate import GenerateOptions, run_generate
    from m4v_convert.jobs.plan import console_or_default

    _set_threads(threads)
    run_generate(GenerateOptions(model=model, prompt=prompt, output=output, negative_prompt=negative_prompt,
                                 size=_parse_size(size) if size else None, frames=frames, steps=steps,
                                 guidance_scale=guidance_scale, seed=seed, fps=fps, compare=compare,
                                 overwrite=overwrite, device=device), console_or_default(None))


@app.command("ablate")
@user_errors
def ablate(
    teacher: Path = typer.Argument(..., help="the Wan2.1 checkpoint to convert"),
    out: Path = typer.Option(..., "--out", help="output folder: ablation.md/json, variants/<name>/"),
    variants: Optional[str] = typer.Option(None, "--variants", help="comma-separated MM-DiM variants: full, "
                                           "no-text-sandwich, no-registers, raster, no-temporal, forward-only, "
                                           "space-scan, time-scan, alternate-scan (default: full and each of the "
                                           "first six the recipe has on)"),
    layers: Optional[str] = typer.Option(None, "--layers", help="layers to convert (default: recipe)"),
    distill_steps: Optional[int] = typer.Option(None, "--distill-steps", help="stage-1 steps per variant "
                                                "(default: recipe)"),
    stage2_steps: Optional[int] = typer.Option(None, "--stage2-steps", help="stage-2 steps per variant "
                                               "(default: recipe)"),
    recipe: str = typer.Option("wan2.1", "--recipe", help="recipe name or YAML file"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="calibration folder (default: TEACHER/calib, "
                                         "else generated from the synthetic task)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="eval prompts file (default: held-out set)"),
    seeds: int = typer.Option(4, "--seeds", help="eval noise seeds per prompt"),
    steps: int = typer.Option(20, "--steps", help="eval sampling steps"),
    device: str = _DEVICE,
    seed: int = _SEED,
    distill_seeds: Optional[str] = typer.Option(None, "--distill-seeds", help="distil every variant once per seed, "
                                                "e.g. 0,1,2, and report each effect per seed (default: --seed)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out folder, and discard "
                                   "an unfinished run's <out>.work folder if its settings differ"),
    threads: Optional[int] = _THREADS,
):
    """Convert TEACHER once per MM-DiM variant (one component off) at an equal budget and tabulate eval metrics.
    Finished variants are kept in <out>.work until the end: the same command continues an interrupted run."""
    from m4v_convert.jobs.ablate import AblateOptions, run_ablate

    _set_threads(threads)
    run_ablate(AblateOptions(teacher=teacher, out=out, variants=None if variants is None else [v.strip() for v in variants.split(",") if v.strip()],
                             layers=layers, distill_steps=distill_steps, stage2_steps=stage2_steps, recipe=recipe,
                             calib=calib, prompts=prompts,
                             seeds=seeds, steps=steps, device=device, seed=seed, overwrite=overwrite,
                             distill_seeds=_int_list(distill_seeds, "--distill-seeds")))


@app.command("ablate-merge")
@user_errors
def ablate_merge(
    parts: list[Path] = typer.Argument(..., help="the --out folders of ablate runs that each did a share of one "
                                       "ablation (other --variants or --distill-seeds)"),
    out: Path = typer.Option(..., "--out", help="output folder: ablation.md/json, variants/<name>/ (model files "
                             "hard-linked from the parts where possible)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out folder"),
):
    """Merge ablate runs into one ablation: each variant paired against the full conversion of its distillation
    seed, whichever run holds it, and the across-seed table, as one ablate run of the whole grid writes them."""
    from m4v_convert.jobs.ablate import merge_ablations

    merge_ablations(parts, out, overwrite=overwrite)


def _int_list(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"{flag}: expected comma-separated integers, got {text!r}")
    if not values:
        _fail(f"{flag}: no seed given")
    return values


_TERMINATED: list[int] = []


def _on_sigterm(signum, frame):
    # SIGTERM (a scheduler's stop, `kill`) takes Ctrl-C's way out: cleanup, one message, exit 143
    _TERMINATED.append(signum)
    raise KeyboardInterrupt


def main():
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    app()


if __name__ == "__main__":
    sys.exit(main())
