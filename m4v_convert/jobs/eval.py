"""Fidelity of a converted model against its teacher on the synthetic task: ``m4v-convert eval``.

Metrics (all on held-out prompts and seeds of the synthetic shapes task, :mod:`m4v_convert.synthetic`):

* **prediction error per timestep**: both models get the same noised inputs
  ``x_t = (1 − σ)·x_0 + σ·ε`` (held-out clean latents, seeded noise) at ``timestep = 1000·σ``;
  ``‖v_student − v_teacher‖ / ‖v_teacher‖`` over the whole batch, per timestep and averaged.
* **sample PSNR / SSIM**: both models sample from the same seeded noise with the flow-match Euler
  sampler (``synthetic.euler_sample``: N steps, shift s, no guidance). Each pair of latent videos is
  normalized with the *teacher's* sample range, ``x̂ = (x − min_T)/(max_T − min_T)`` (the same map for
  both, so the data range is 1); PSNR = ``10·log10(1 / MSE)`` with the MSE pooled over all samples
  (``Infinity`` when the samples are identical); SSIM is the usual Wang et al. index (C1 = 0.01²,
  C2 = 0.03², 7×7 Gaussian window σ = 1.5, valid positions only) on every (sample, channel, frame)
  H×W slice of the normalized latents, averaged.
  ``sample_rel_error`` = ``‖x_S − x_T‖ / ‖x_T‖`` over all sample latents is reported next to them
  as a scale-free check (range normalization makes PSNR generous when a few pixels span a wide range).
  For a task with frame/position codes (fixed fields every video carries) ``psnr_db_without_codes``
  takes both samples minus those fields, normalized with the range that is left: the same error
  over the content's range only, the figure comparable with a teacher trained without codes.
* **prompt adherence** of each model's samples: colour accuracy, direction accuracy and their mean
  (``ShapesTask.adherence``), plus the student − teacher difference in points, and the agreement
  (fraction of samples where both read back the same colour and direction).
* **95% intervals** (``psnr_db_ci95``, ``adherence_delta_ci95``): percentile bootstrap over the
  samples (:func:`m4v_convert.metrics.bootstrap_ci95`, paired: a resample keeps each sample's teacher and student
  together; seeded). They measure how much the numbers would move with other noise seeds, which
  matters at a few seeds per prompt: one sample's direction reading is worth 50/N points of
  adherence.

``ablate`` (:mod:`m4v_convert.jobs.ablate`) tabulates these metrics per MM-DiM variant.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m4v_convert.errors import CheckpointError, M4VError
from m4v_convert.io.pictures import write_frame_grid, write_gif
from m4v_convert.metrics import (bootstrap_ci95, metrics_json, pair_scores, psnr_of_mse, psnr_without,
                                 relative_error)
from m4v_convert.synthetic import Labels, ShapesTask, TaskConfig, euler_sample, heldout_labels, read_prompts

#: config entries that must agree between teacher and student (the base WanTransformer3DModel's)
ARCH_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
             "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "image_dim", "added_kv_proj_dim")
DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)
SAMPLE_NOISE_BASE = 3_000_000  # sample i's initial noise uses seed SAMPLE_NOISE_BASE + i
TIMESTEP_NOISE_SEED = 4_000_000



# ---------------------------------------------------------------------------------------- evaluation


@dataclass
class EvalSettings:
    labels: list[Labels] = field(default_factory=heldout_labels)
    seeds: int = 4  # noise/layout seeds per prompt
    steps: int = 20  # Euler sampling steps
    shift: float = 3.0  # sampler shift
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    batch_size: int = 16


def _forward(model, x, t, text):
    dtype = next(model.parameters()).dtype
    return model(hidden_states=x.to(dtype), timestep=t.to(dtype), encoder_hidden_states=text.to(dtype),
                 return_dict=False)[0].float()


@torch.no_grad()
def sample(model, task: ShapesTask, settings: EvalSettings, on_batch=None) -> tuple[torch.Tensor, list[Labels]]:
    """Samples of ``model`` for every (prompt, seed) of ``settings``: (B, C, F, H, W) latents.

    ``on_batch(n)``: called after every sampled batch of ``n`` (progress display)."""
    labels = [lab for lab in settings.labels for _ in range(settings.seeds)]
    c = task.config
    noise = torch.stack([torch.randn(c.channels, c.frames, c.height, c.width,
                                     generator=torch.Generator().manual_seed(SAMPLE_NOISE_BASE + i))
                         for i in range(len(labels))])
    text = task.encode(labels)
    out = euler_sample(model, noise, text, steps=settings.steps, shift=settings.shift, batch_size=settings.batch_size,
                       on_batch=on_batch)
    return out, labels


@torch.no_grad()
def prediction_errors(teacher, student, task: ShapesTask, settings: EvalSettings,
                      on_timestep=None) -> dict[str, float]:
    """Per-timestep ``‖v_S − v_T‖ / ‖v_T‖`` on the same noised held-out inputs."""
    labels = [lab for lab in settings.labels for _ in range(settings.seeds)]
    x0, text = task.eval_batch(labels, [i for _ in settings.labels for i in range(settings.seeds)])
    gen = torch.Generator().manual_seed(TIMESTEP_NOISE_SEED)
    noise = torch.randn(x0.shape, generator=gen)
    out = {}
    for t in settings.timesteps:
        sigma = t / 1000.0
        x_t = (1 - sigma) * x0 + sigma * noise
        ts = torch.full((x0.shape[0],), float(t))
        v_t, v_s = [], []
        for s in range(0, x0.shape[0], settings.batch_size):
            sl = slice(s, s + settings.batch_size)
            v_t.append(_forward(teacher, x_t[sl], ts[sl], text[sl]))
            v_s.append(_forward(student, x_t[sl], ts[sl], text[sl]))
        out[str(t)] = relative_error(torch.cat(v_s), torch.cat(v_t))
        if on_timestep is not None:
            on_timestep()
    return out


def eval_work(settings: EvalSettings, teacher_sampled: bool = False) -> dict[str, int]:
    """Totals of the ``progress`` phases of :func:`evaluate`."""
    n = len(settings.labels) * settings.seeds
    work = {"prediction error": len(settings.timesteps)}
    if not teacher_sampled:
        work["teacher samples"] = n
    work["student samples"] = n
    return work


@contextlib.contextmanager
def eval_progress(console, settings: EvalSettings, teacher_sampled: bool = False):
    """A rich progress display for :func:`evaluate`; yields its ``progress`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        ids = {phase: bar.add_task(phase, total=total) for phase, total in eval_work(settings, teacher_sampled).items()}
        yield lambda phase, n: bar.advance(ids[phase], n)


def evaluate(teacher, student, task: ShapesTask, settings: EvalSettings | None = None,
             teacher_samples: tuple[torch.Tensor, dict] | None = None,
             progress=None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """All metrics of ``student`` against ``teacher``; returns (metrics, teacher samples, student samples).

    ``teacher_samples``: (samples, adherence) from an earlier call with the same settings, reused
    (``ablate`` samples the teacher once). ``progress(phase, n)``: called as work is done, ``phase``
    "prediction error" (``n`` timesteps) or "teacher samples" / "student samples" (``n`` samples);
    :func:`eval_work` gives the totals.
    """
    settings = settings or EvalSettings()
    t0 = time.time()
    tick = progress or (lambda phase, n: None)
    errors = prediction_errors(teacher, student, task, settings, on_timestep=lambda: tick("prediction error", 1))
    if teacher_samples is None:
        xs_t, labels = sample(teacher, task, settings, on_batch=lambda n: tick("teacher samples", n))
        adh_t = task.adherence(xs_t, labels)
    else:
        xs_t, adh_t = teacher_samples
        labels = [lab for lab in settings.labels for _ in range(settings.seeds)]
    xs_s, _ = sample(student, task, settings, on_batch=lambda n: tick("student samples", n))
    for who, xs in (("teacher", xs_t), ("student", xs_s)):
        bad = int((~torch.isfinite(xs)).sum())
        if bad:  # its adherence and PSNR would be numbers about nothing ("nan dB")
            raise M4VError(f"the {who}'s samples hold NaN or inf ({bad} of {xs.numel()} values): its weights or "
                           "inputs are broken; nothing was measured")
    adh_s = task.adherence(xs_s, labels)
    mses, ssims = pair_scores(xs_t, xs_s)
    mse = sum(mses) / len(mses)
    agree = sum(r_t == r_s for r_t, r_s in zip(adh_t["read"], adh_s["read"])) / len(labels)
    metrics = {
        "prompts": [lab.prompt for lab in settings.labels], "seeds_per_prompt": settings.seeds,
        "samples": len(labels), "sampler": {"name": "flow-match Euler", "steps": settings.steps,
                                            "shift": settings.shift, "guidance": 1.0},
        "pred_rel_error": errors, "pred_rel_error_mean": sum(errors.values()) / len(errors),
        "psnr_db": psnr_of_mse(mse),
        "psnr_db_per_sample": [psnr_of_mse(m) for m in mses],
        "ssim": sum(ssims) / len(ssims),
        "sample_rel_error": relative_error(xs_s, xs_t),
        "adherence_teacher": {k: v for k, v in adh_t.items() if k != "read"},
        "adherence_student": {k: v for k, v in adh_s.items() if k != "read"},
        "adherence_delta_points": adh_s["score"] - adh_t["score"],
        "agreement": 100.0 * agree,
        "read_teacher": adh_t["read"], "read_student": adh_s["read"],
    }
    metrics.update(bootstrap_ci95(mses, sample_scores(adh_t["read"], labels), sample_scores(adh_s["read"], labels)))
    if task.has_codes:
        metrics["psnr_db_without_codes"], metrics["psnr_db_without_codes_ci95"] = psnr_without(
            xs_t, xs_s, task.code_field())
    metrics["seconds"] = round(time.time() - t0, 1)
    return metrics, xs_t, xs_s


def sample_scores(read: list, labels: list[Labels]) -> list[float]:
    """Per-sample adherence score (50 points for the right colour, 50 for the right direction);
    their mean is ``ShapesTask.adherence``'s ``score``."""
    return [50.0 * (r[0] == lab.colour) + 50.0 * (r[1] == lab.direction) for r, lab in zip(read, labels)]


# ---------------------------------------------------------------------------------------- loading


def check_same_architecture(teacher_cfg, student_cfg, teacher_path, student_path) -> None:
    diffs = []
    for k in ARCH_KEYS:
        a, b = teacher_cfg.get(k), student_cfg.get(k)
        a = list(a) if isinstance(a, (tuple, list)) else a
        b = list(b) if isinstance(b, (tuple, list)) else b
        if a != b:
            diffs.append(f"{k} {a} vs {b}")
    if diffs:
        raise M4VError(f"teacher {teacher_path} and student {student_path} have different architectures "
                       f"({'; '.join(diffs[:4])}): evaluate a student against the model it was converted from")


def load_pair(teacher_path: Path, student_path: Path, device="cpu"):
    from m4v_convert.backbones import registry
    from m4v_convert.io.converted import load_converted, read_converted_config

    student_path = Path(student_path).expanduser()
    if not student_path.exists():
        raise CheckpointError(f"student {student_path} does not exist")
    entry, _ = registry.find_converted(read_converted_config(student_path))  # clear message before loading anything
    teacher = entry.load_teacher(teacher_path, device=device)
    student = load_converted(student_path, device=device)
    check_same_architecture(dict(teacher.config), dict(student.config), teacher_path, student_path)
    return teacher.requires_grad_(False), student.requires_grad_(False)


def load_task(teacher_path: Path, teacher_cfg, task_path: Path | None = None) -> tuple[ShapesTask, str]:
    """The teacher's synthetic task: ``--task FILE``, else ``TEACHER/task.json``, else a default one
    sized to the teacher (then adherence is meaningless unless it was trained on it)."""
    if task_path is not None:
        if not Path(task_path).is_file():
            raise M4VError(f"--task {task_path}: no such file")
        cfg, source = TaskConfig.load(task_path), str(task_path)
    elif (Path(teacher_path) / "task.json").is_file():
        cfg, source = TaskConfig.load(Path(teacher_path) / "task.json"), str(Path(teacher_path) / "task.json")
    else:
        cfg, source = TaskConfig(channels=teacher_cfg["in_channels"], text_dim=teacher_cfg["text_dim"]), "default"
    if cfg.channels != teacher_cfg["in_channels"] or cfg.text_dim != teacher_cfg["text_dim"]:
        raise M4VError(f"task ({source}) has {cfg.channels} channels / text_dim {cfg.text_dim}, the teacher "
                       f"{teacher_cfg['in_channels']} / {teacher_cfg['text_dim']}")
    return ShapesTask(cfg), source


def shared_weights_equal(teacher, student) -> bool:
    """Whether every weight the conversion does not replace is equal in teacher and student."""
    s = student.state_dict()
    conv = {f"blocks.{i}.attn1." for i in getattr(student, "converted_layers", [])}
    for k, v in teacher.state_dict().items():
        if any(k.startswith(p) for p in conv):
            continue
        if k not in s or s[k].shape != v.shape or not torch.equal(s[k].float(), v.float()):
            return False
    return True


# ---------------------------------------------------------------------------------------- commands


@dataclass(kw_only=True)
class SamplingOptions:
    """How the synthetic task's samples are drawn and where (shared by ``eval`` and ``ablate``)."""

    prompts: Path | None = None  # one prompt per line (default: the held-out prompts)
    seeds: int = 4  # noise seeds per prompt
    steps: int = 20  # Euler sampling steps
    shift: float = 3.0  # sampler timestep shift
    task: Path | None = None  # the task JSON (default: TEACHER/task.json)
    device: str = "auto"
    overwrite: bool = False


@dataclass(kw_only=True)
class EvalOptions(SamplingOptions):
    teacher: Path
    student: Path
    out: Path


def _settings(prompts: Path | None, seeds: int, steps: int, shift: float) -> EvalSettings:
    if seeds < 1:
        raise M4VError(f"--seeds: expected >= 1, got {seeds}")
    if steps < 1:
        raise M4VError(f"--steps: expected >= 1, got {steps}")
    if shift <= 0:
        raise M4VError(f"--shift: expected > 0, got {shift}")
    labels = read_prompts(prompts) if prompts is not None else heldout_labels()
    return EvalSettings(labels=labels, seeds=seeds, steps=steps, shift=shift)


def write_eval_outputs(folder: Path, metrics: dict, task: ShapesTask, xs_t, xs_s) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(metrics_json(metrics) + "\n")
    seeds = metrics["seeds_per_prompt"]
    # one row per prompt (its first seed) in the pictures
    idx = list(range(0, xs_t.shape[0], seeds))
    labels = [metrics["prompts"][i // seeds] for i in idx]
    write_gif(task, xs_t[idx], xs_s[idx], labels, folder / "samples.gif")
    write_frame_grid(task, xs_t[idx], xs_s[idx], labels, folder / "frames.png")


def run_eval(opts: EvalOptions, console=None) -> dict:
    from m4v_convert.io.output import atomic_output_dir, check_output_dir
    from m4v_convert.jobs.plan import console_or_default as _console, resolve_device

    con = _console(console)
    settings = _settings(opts.prompts, opts.seeds, opts.steps, opts.shift)
    check_output_dir(opts.out, opts.overwrite, {"teacher": opts.teacher, "student": opts.student,
                                                "--prompts": opts.prompts, "--task": opts.task})
    device = resolve_device(opts.device)
    teacher, student = load_pair(opts.teacher, opts.student, device=device)
    task, task_source = load_task(opts.teacher, dict(teacher.config), opts.task)
    same = shared_weights_equal(teacher, student)
    if not same:
        con.print("[yellow]note: the student's unconverted weights differ from the teacher's (expected when its "
                  "distillation trained them, --train all/lora; otherwise it was converted from another checkpoint)[/]")
    con.print(f"eval: {len(settings.labels)} prompts × {settings.seeds} seeds, {settings.steps} Euler steps "
              f"(task: {task_source})")
    with eval_progress(con, settings) as progress:
        metrics, xs_t, xs_s = evaluate(teacher, student, task, settings, progress=progress)
    metrics.update(teacher=str(Path(opts.teacher).resolve()), student=str(Path(opts.student).resolve()),
                   task=task_source, shared_weights_equal=same,
                   converted_layers=list(getattr(student, "converted_layers", [])))
    with atomic_output_dir(opts.out, opts.overwrite) as tmp:
        write_eval_outputs(tmp, metrics, task, xs_t, xs_s)
    con.print(metrics_table([("student", metrics)], title=f"eval: {Path(opts.student).name} vs "
                                                          f"{Path(opts.teacher).name}", teacher_row=True),
              width=max(con.width, 100))
    con.print(interval_text(metrics))
    con.print(f"[green]wrote[/] {Path(opts.out).resolve()} (metrics.json, samples.gif, frames.png)")
    return metrics


COLUMNS = ("pred err↓", "PSNR dB↑", "SSIM↑", "colour%↑", "dir.%↑", "adher.↑", "Δadh")


def _row(m: dict) -> list[str]:
    a = m["adherence_student"]
    return [f"{m['pred_rel_error_mean']:.4f}", "inf" if math.isinf(m["psnr_db"]) else f"{m['psnr_db']:.2f}",
            f"{m['ssim']:.4f}", f"{a['colour_acc']:.1f}", f"{a['direction_acc']:.1f}", f"{a['score']:.1f}",
            f"{m['adherence_delta_points']:+.1f}"]


def _teacher_row(m: dict) -> list[str]:
    a = m["adherence_teacher"]
    return ["0", "inf", "1", f"{a['colour_acc']:.1f}", f"{a['direction_acc']:.1f}", f"{a['score']:.1f}", ""]


def metrics_table(rows: list[tuple[str, dict]], title: str, teacher_row: bool = True):
    from rich.table import Table

    table = Table(title=title, caption="pred err: mean ‖v_S − v_T‖/‖v_T‖ over timesteps; PSNR/SSIM: student vs "
                  "teacher same-seed samples; colour/dir./adher.: prompt adherence of each model's samples; Δadh: "
                  "student − teacher, points")
    table.add_column("variant", no_wrap=True)
    for c in COLUMNS:
        table.add_column(c, justify="right")
    if teacher_row and rows:
        table.add_row("teacher", *_teacher_row(rows[0][1]))
    for name, m in rows:
        table.add_row(name, *_row(m))
    return table


def interval_text(m: dict) -> str:
    """The bootstrap intervals of one eval, in words."""
    lo, hi = m["psnr_db_ci95"]
    dlo, dhi = m["adherence_delta_ci95"]
    text = (f"95% intervals over {m['samples']} samples (bootstrap): PSNR {_db_interval(lo, hi)}, "
            f"Δ adherence [{dlo:+.1f}, {dhi:+.1f}] points")
    if "psnr_db_without_codes" in m:
        p, (lo, hi) = m["psnr_db_without_codes"], m["psnr_db_without_codes_ci95"]
        text += f"; PSNR without the task's frame/position codes {p:.2f} dB {_db_interval(lo, hi)}"
    return text


def _db_interval(lo: float, hi: float) -> str:
    return "inf" if math.isinf(lo) else f"[{lo:.2f}, {hi:.2f}] dB" if math.isfinite(hi) else f"[{lo:.2f}, inf] dB"


def vs_full_text(m: dict) -> str:
    if "vs_full" not in m:
        return ""
    v = m["vs_full"]
    lo, hi = v["psnr_delta_db_ci95"]
    return f"; PSNR vs all components {v['psnr_delta_db']:+.2f} dB [{lo:+.2f}, {hi:+.2f}] (paired)"


MD_COLUMNS = ("pred. rel. error ↓", "sample PSNR dB ↑", "sample SSIM ↑", "colour acc. % ↑", "direction acc. % ↑",
              "adherence ↑", "Δ adherence (points)")


def markdown_table(rows: list[tuple[str, dict]], teacher_row: bool = True) -> str:
    lines = ["| variant | " + " | ".join(MD_COLUMNS) + " |", "|---|" + "---:|" * len(MD_COLUMNS)]
    if teacher_row and rows:
        lines.append("| teacher (attention) | " + " | ".join(_teacher_row(rows[0][1])) + " |")
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(_row(m)) + " |")
    return "\n".join(lines)
