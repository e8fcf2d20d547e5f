"""Fidelity of a converted model against its teacher: ``m4v-convert eval`` and ``m4v-convert ablate``.

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

``ablate`` converts the teacher once per MM-DiM variant (each with one component switched off) at
the same distillation budget (same layers, steps, calibration data, seed) through
the conversion job (:func:`m4v_convert.jobs.convert.run_conversion`) with a temporary recipe, and
tabulates these metrics per variant.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m4v_convert.errors import CheckpointError, M4VError
from m4v_convert.metrics import (bootstrap_ci95, metrics_json, pair_scores, paired_psnr_delta, psnr_of_mse,
                                 psnr_without, relative_error)
from m4v_convert.synthetic import Labels, ShapesTask, TaskConfig, euler_sample, heldout_labels, read_prompts

#: config entries that must agree between teacher and student (the base WanTransformer3DModel's)
ARCH_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
             "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "image_dim", "added_kv_proj_dim")
DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)
SAMPLE_NOISE_BASE = 3_000_000  # sample i's initial noise uses seed SAMPLE_NOISE_BASE + i
TIMESTEP_NOISE_SEED = 4_000_000

#: ablation variants: name → (MMDiMConfig overrides, row label as in the paper's component ablation)
VARIANTS: dict[str, tuple[dict, str]] = {
    "full": ({}, "MM-DiM (all components)"),
    "no-text-sandwich": ({"text_sandwich": False}, "w/o text sandwich"),
    "no-registers": ({"registers": False}, "w/o per-frame registers"),
    "raster": ({"zigzag": False}, "raster scan instead of zigzag"),
    "no-temporal": ({"temporal": False}, "w/o temporal branch"),
    "forward-only": ({"bidirectional": False}, "forward scan only (no reversed scan)"),
}


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


# ---------------------------------------------------------------------------------------- pictures


def _tiles(task: ShapesTask, xs: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, C, F, H, W) → (B, F, H·scale, W·scale, 3) uint8."""
    rgb = task.to_rgb(xs)  # (B, F, H, W, 3)
    rgb = rgb.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    return (rgb * 255).round().to(torch.uint8)


def write_gif(task: ShapesTask, teacher_xs, student_xs, labels: list[str], path: Path, rows: int = 8,
              scale: int = 6, ms: int = 300) -> None:
    """Animated GIF: one row per sample, ``teacher | student`` side by side, one GIF frame per latent frame."""
    from PIL import Image, ImageDraw

    n = min(rows, teacher_xs.shape[0])
    ta, st = _tiles(task, teacher_xs[:n], scale), _tiles(task, student_xs[:n], scale)
    _, f, th, tw, _ = ta.shape
    gap, label_w, header = 4, 150, 16
    width = label_w + 2 * tw + 3 * gap
    height = header + n * (th + gap) + gap
    frames = []
    for fi in range(f):
        im = Image.new("RGB", (width, height), (255, 255, 255))
        d = ImageDraw.Draw(im)
        d.text((label_w + gap, 2), "teacher", fill=(0, 0, 0))
        d.text((label_w + 2 * gap + tw, 2), "student", fill=(0, 0, 0))
        d.text((width - 52, 2), f"frame {fi}", fill=(90, 90, 90))
        for r in range(n):
            y = header + r * (th + gap)
            d.text((4, y + th // 2 - 6), labels[r], fill=(0, 0, 0))
            im.paste(Image.fromarray(ta[r, fi].numpy()), (label_w + gap, y))
            im.paste(Image.fromarray(st[r, fi].numpy()), (label_w + 2 * gap + tw, y))
        frames.append(im.convert("P", palette=Image.ADAPTIVE, colors=64))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms, loop=0, optimize=True)


def write_frame_grid(task: ShapesTask, teacher_xs, student_xs, labels: list[str], path: Path, rows: int = 4) -> None:
    """PNG: for each of ``rows`` samples, a teacher row and a student row, one column per latent frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(rows, teacher_xs.shape[0])
    ta, st = task.to_rgb(teacher_xs[:n]), task.to_rgb(student_xs[:n])
    f = ta.shape[1]
    fig, axes = plt.subplots(2 * n, f, figsize=(1.3 * f + 1.2, 1.35 * 2 * n), squeeze=False)
    for r in range(n):
        for which, src in ((0, ta), (1, st)):
            for fi in range(f):
                ax = axes[2 * r + which, fi]
                ax.imshow(src[r, fi].numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if fi == 0:
                    ax.set_ylabel(("teacher\n" if which == 0 else "student\n") + labels[r].replace("a ", "", 1)
                                  .replace(" moving", "\n"), fontsize=6)
                if r == 0 and which == 0:
                    ax.set_title(f"frame {fi}", fontsize=8)
    fig.suptitle("latents → RGB (fixed projection: each colour vector → its named colour)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- commands


@dataclass
class EvalOptions:
    teacher: Path
    student: Path
    out: Path
    prompts: Path | None = None
    seeds: int = 4
    steps: int = 20
    shift: float = 3.0
    task: Path | None = None
    device: str = "auto"
    overwrite: bool = False


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
    check_output_dir(opts.out, opts.overwrite)
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


@dataclass
class AblateOptions:
    teacher: Path
    out: Path
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    layers: str | None = None
    distill_steps: int | None = None
    stage2_steps: int | None = None
    recipe: str = "wan2.1"
    calib: Path | None = None
    prompts: Path | None = None
    seeds: int = 4
    steps: int = 20
    shift: float = 3.0
    task: Path | None = None
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False
    distill_seeds: list[int] | None = None  # every variant distilled once per seed (default: [seed])

    @property
    def seed_list(self) -> list[int]:
        return list(self.distill_seeds) if self.distill_seeds else [self.seed]


def write_task_calib(task: ShapesTask, folder: Path, n: int = 32, seed: int = 0) -> Path:
    """Clean latents + text of ``n`` training-prompt samples in the ``--calib`` format."""
    from safetensors.torch import save_file

    from m4v_convert.synthetic import train_labels

    labels = train_labels()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(labels), (n,), generator=gen).tolist()
    lat, txt = task.batch([labels[i] for i in idx], gen)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"latents": lat.contiguous(), "text_embeds": txt.contiguous()}, str(folder / "task-calib.safetensors"))
    return folder


def variant_recipe(recipe: str, overrides: dict, name: str, folder: Path) -> Path:
    """Write the recipe with ``mmdim`` ``overrides`` applied as a YAML file under ``folder``."""
    import yaml

    from m4v_convert.recipes import load_recipe

    rec = load_recipe(recipe)
    data = yaml.safe_load(rec.path.read_text())
    data["published"] = {k: str(v) for k, v in rec.published.items()}  # absolute: the file moves
    data["mmdim"] = {**(data.get("mmdim") or {}), **overrides}
    data["description"] = f"{data['description']} [ablation: {name}]"
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ablate_work_dir(out: Path) -> Path:
    """Where ``ablate`` keeps finished variants until the whole run succeeds (a sibling of ``out``)."""
    out = Path(out)
    return out.parent / f"{out.name}.work"


def _write_json_atomic(path: Path, obj) -> None:
    from m4v_convert.distill.state import atomic_write_text

    atomic_write_text(path, metrics_json(obj) + "\n")


def _ablate_settings(opts: AblateOptions, rec, settings: EvalSettings, calib_label: str, task_source: str,
                     device) -> dict:
    """Everything a finished variant's numbers depend on; a resumed run must match it exactly."""
    import hashlib

    teacher = Path(opts.teacher).resolve()
    files = [teacher] if teacher.is_file() else sorted(f for f in teacher.rglob("*") if f.is_file()
                                                        and f.suffix in (".json", ".safetensors"))
    return {
        "teacher": str(teacher), "teacher_files": {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files},
        "task": task_source, "recipe": str(rec.path.resolve()),
        "recipe_sha256": hashlib.sha256(rec.path.read_bytes()).hexdigest(), "layers": opts.layers,
        "distill_steps": opts.distill_steps, "stage2_steps": opts.stage2_steps, "calibration": calib_label,
        "seed": opts.seed, **({"distill_seeds": opts.seed_list} if opts.distill_seeds else {}), "device": str(device),
        "eval": {"prompts": [lab.prompt for lab in settings.labels], "seeds_per_prompt": settings.seeds,
                 "sampler_steps": settings.steps, "shift": settings.shift},
    }


def _open_ablate_work(work: Path, wanted: dict, overwrite: bool, con) -> list[str]:
    """Create ``work`` or reuse it when it holds a run with the same settings; names of its finished variants."""
    import shutil

    path = work / "settings.json"
    if work.exists():
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            found = None
        if found != wanted:
            differ = sorted(k for k in wanted if found is None or found.get(k) != wanted[k])
            if not overwrite:
                raise M4VError(f"{work} holds an unfinished ablation with other settings "
                               f"({', '.join(differ) or 'unreadable'}); remove it, or pass --overwrite to discard it")
            con.print(f"discarding {work} (an unfinished ablation with other settings: {', '.join(differ)})")
            shutil.rmtree(work)
    (work / "variants").mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _write_json_atomic(path, wanted)
    return sorted(d.name for d in (work / "variants").iterdir() if (d / "metrics.json").exists())


def unit_name(variant: str, seed: int, seeds: list[int]) -> str:
    """Folder name of one (variant, distillation seed): the variant alone when there is one seed."""
    return variant if len(seeds) == 1 else f"{variant}-seed{seed}"


def across_seeds(results: dict, variants: list[str], seeds: list[int]) -> dict:
    """Per variant, its numbers at every distillation seed and their mean / range; ``vs_full`` is each
    seed's paired PSNR difference against the full conversion of the same seed."""
    out = {}
    for name in variants:
        ms = [results[unit_name(name, s, seeds)] for s in seeds]
        row = {"seeds": seeds, "psnr_db": [m["psnr_db"] for m in ms],
               "pred_rel_error_mean": [m["pred_rel_error_mean"] for m in ms],
               "adherence_delta_points": [m["adherence_delta_points"] for m in ms]}
        for k in ("psnr_db", "pred_rel_error_mean", "adherence_delta_points"):
            row[f"{k}_mean"] = sum(row[k]) / len(row[k])
        if all("vs_full" in m for m in ms):
            deltas = [m["vs_full"]["psnr_delta_db"] for m in ms]
            cis = [m["vs_full"]["psnr_delta_db_ci95"] for m in ms]
            row.update(vs_full_psnr_delta_db=deltas, vs_full_psnr_delta_db_ci95=cis,
                       vs_full_psnr_delta_db_mean=sum(deltas) / len(deltas),
                       # every seed's paired interval on the same side of zero: an effect the seed does not flip
                       vs_full_consistent=all(hi < 0 for _, hi in cis) or all(lo > 0 for lo, _ in cis))
        out[name] = row
    return out


def across_seeds_markdown(summary: dict, labels: dict[str, str]) -> str:
    lines = ["| variant | sample PSNR dB, mean [range] | PSNR vs all components, paired, per seed | "
             "same sign at every seed | pred. rel. error, mean [range] | Δ adherence, mean [range] |",
             "|---|---:|---|:---:|---:|---:|"]

    def rng(values, fmt):
        return f"{fmt.format(sum(values) / len(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"

    for name, row in summary.items():
        per_seed = ", ".join(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" for d, (lo, hi)
                             in zip(row.get("vs_full_psnr_delta_db", []), row.get("vs_full_psnr_delta_db_ci95", [])))
        same = "" if "vs_full_consistent" not in row else ("yes" if row["vs_full_consistent"] else "no")
        lines.append(f"| {labels[name]} | {rng(row['psnr_db'], '{:.2f}')} | {per_seed} | {same} | "
                     f"{rng(row['pred_rel_error_mean'], '{:.3f}')} | {rng(row['adherence_delta_points'], '{:+.1f}')} |")
    return "\n".join(lines)


def run_ablate(opts: AblateOptions, console=None) -> dict:
    """Convert and evaluate the teacher once per variant. Each finished variant (converted model and
    its metrics) and the teacher's samples are kept in :func:`ablate_work_dir` as they finish, so a
    crashed or interrupted run continues where it stopped when run again with the same settings;
    the folder is removed once ``out`` is written."""
    import shutil

    from safetensors.torch import load_file, save_file

    from m4v_convert.backbones import registry
    from m4v_convert.io.converted import load_converted
    from m4v_convert.io.output import atomic_output_dir, check_output_dir
    from m4v_convert.jobs.convert import run_conversion
    from m4v_convert.jobs.plan import ConvertFlags, console_or_default as _console, resolve_device
    from m4v_convert.recipes import load_recipe

    con = _console(console)
    unknown = [v for v in opts.variants if v not in VARIANTS]
    if unknown or not opts.variants:
        raise M4VError(f"--variants: unknown {unknown[0]!r}" if unknown else "--variants: none given"
                       + f" (choose from {', '.join(VARIANTS)})")
    seeds = opts.seed_list
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise M4VError(f"--distill-seeds: expected distinct seeds >= 0, got {','.join(map(str, seeds))}")
    settings = _settings(opts.prompts, opts.seeds, opts.steps, opts.shift)
    rec = load_recipe(opts.recipe)
    entry = registry.for_recipe(rec)
    if entry.evaluate is None or registry.resolve(entry.evaluate) is not run_eval:
        raise M4VError(f"--recipe {rec.name}: ablate measures on the synthetic task, which the {entry.name} "
                       "backbone's eval does not use")
    check_output_dir(opts.out, opts.overwrite)
    device = resolve_device(opts.device)
    teacher = entry.load_teacher(opts.teacher, device=device).requires_grad_(False)
    task, task_source = load_task(opts.teacher, dict(teacher.config), opts.task)
    calib = opts.calib
    if calib is None and (Path(opts.teacher) / "calib").is_dir():
        calib = Path(opts.teacher) / "calib"
    calib_label = "task (generated)" if calib is None else str(Path(calib).resolve())
    work_dir = ablate_work_dir(opts.out)
    wanted = _ablate_settings(opts, rec, settings, calib_label, task_source, device)
    finished = _open_ablate_work(work_dir, wanted, opts.overwrite, con)
    units = [(name, seed, unit_name(name, seed, seeds)) for seed in seeds for name in opts.variants]
    resumed = [u for _, _, u in units if u in finished]
    t0 = time.time()
    try:
        with atomic_output_dir(opts.out, opts.overwrite) as tmp, tempfile.TemporaryDirectory() as work:
            work = Path(work)
            if calib is None:  # regenerated bit for bit by a resumed run (seeded)
                calib = write_task_calib(task, work / "calib", seed=opts.seed)
            con.print(f"ablate: {len(opts.variants)} variants × {len(seeds)} distillation seed(s) "
                      f"({', '.join(map(str, seeds))}), equal budget: layers {opts.layers or 'recipe default'}, "
                      f"stage-1 steps {opts.distill_steps if opts.distill_steps is not None else 'recipe default'}, "
                      f"stage-2 steps {opts.stage2_steps if opts.stage2_steps is not None else 'recipe default'}, "
                      f"calibration {calib_label}; finished variants are kept in {work_dir} "
                      "until the end" + (f" (continuing: {', '.join(resumed)} done)" if resumed else ""))
            cached = work_dir / "teacher_samples.safetensors"
            xs_t = adh_t = None
            if cached.exists() and (work_dir / "teacher_adherence.json").exists():
                xs_t = load_file(str(cached))["samples"].to(device)
                adh_t = json.loads((work_dir / "teacher_adherence.json").read_text())
            rows, results = [], {}
            for name, seed, unit in units:
                overrides, label = VARIANTS[name]
                if len(seeds) > 1:
                    label = f"{label}, seed {seed}"
                con.rule(f"{unit}: {label}")
                vdir = work_dir / "variants" / unit
                if unit in finished:
                    con.print(f"finished in an earlier run: {vdir}")
                    metrics = json.loads((vdir / "metrics.json").read_text())
                else:
                    if not (vdir / "conversion.json").exists():  # convert writes the folder atomically
                        run_conversion(ConvertFlags.from_flags(
                            recipe=str(variant_recipe(opts.recipe, overrides, name, work)),
                            checkpoint=Path(opts.teacher), out=vdir, layers=opts.layers,
                            distill_steps=opts.distill_steps, stage2_steps=opts.stage2_steps, calib=calib,
                            device=opts.device, seed=seed, overwrite=True,
                            report_size=(8 * task.config.height, 8 * task.config.width),
                            report_frames=4 * (task.config.frames - 1) + 1), console=con)
                    summary = json.loads((vdir / "conversion.json").read_text())
                    student = load_converted(vdir, device=device).requires_grad_(False)
                    with eval_progress(con, settings, teacher_sampled=xs_t is not None) as progress:
                        metrics, xs_t_new, _ = evaluate(teacher, student, task, settings, progress=progress,
                                                        teacher_samples=None if xs_t is None else (xs_t, adh_t))
                    if xs_t is None:
                        xs_t, adh_t = xs_t_new, {**metrics["adherence_teacher"], "read": metrics["read_teacher"]}
                        save_file({"samples": xs_t.detach().cpu().contiguous()}, str(cached))
                        _write_json_atomic(work_dir / "teacher_adherence.json", adh_t)
                    metrics.update(variant=name, distill_seed=seed, label=label, mmdim_overrides=overrides,
                                   convert_seconds=summary["seconds"], distill=summary["distill"],
                                   converted_flops=summary["converted_total_flops"])
                    _write_json_atomic(vdir / "metrics.json", metrics)  # this variant is finished
                results[unit] = metrics
                rows.append((label, metrics))
            for name, seed, unit in units:
                metrics = results[unit]
                shutil.copytree(work_dir / "variants" / unit, tmp / "variants" / unit)
                full = unit_name("full", seed, seeds)
                if full in results and name != "full":  # against all components of the same seed, same samples
                    metrics["vs_full"] = paired_psnr_delta(results[full], metrics)
                (tmp / "variants" / unit / "metrics.json").write_text(metrics_json(metrics) + "\n")
            summary = across_seeds(results, opts.variants, seeds) if len(seeds) > 1 else None
            report = {
                "teacher": str(Path(opts.teacher).resolve()), "task": task_source, "recipe": opts.recipe,
                "layers": opts.layers, "distill_steps": opts.distill_steps, "stage2_steps": opts.stage2_steps,
                "calibration": calib_label, "seed": opts.seed, "distill_seeds": seeds, "eval": wanted["eval"],
                "variants": results, "resumed_variants": resumed, "seconds": round(time.time() - t0, 1),
            }
            if summary is not None:
                report["across_seeds"] = summary
            (tmp / "ablation.json").write_text(metrics_json(report) + "\n")
            (tmp / "ablation.md").write_text(
                f"# MM-DiM component ablation\n\nteacher `{opts.teacher}`, equal distillation budget per variant "
                f"(layers {opts.layers or 'recipe default'}, stage-1 steps "
                f"{opts.distill_steps if opts.distill_steps is not None else 'recipe default'}, stage-2 steps "
                f"{opts.stage2_steps if opts.stage2_steps is not None else 'recipe default'}, calibration "
                f"{calib_label}, distillation seed(s) {', '.join(map(str, seeds))}); eval on {len(settings.labels)} "
                f"prompts × {settings.seeds} seeds, {settings.steps} Euler steps.\n\n{markdown_table(rows)}\n\n"
                + "".join(f"- {name}: {interval_text(m)}{vs_full_text(m)}\n" for name, m in rows)
                + ("" if summary is None else "\n## Across distillation seeds\n\n" + across_seeds_markdown(
                    summary, {n: VARIANTS[n][1] for n in opts.variants}) + "\n"))
    except BaseException:
        kept = sorted(d.name for d in (work_dir / "variants").iterdir())  # converted (folders appear whole)
        if not kept:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            con.print(f"ablate stopped; converted variants ({', '.join(kept)}) are kept in {work_dir}: "
                      "the same command continues from them")
        raise
    shutil.rmtree(work_dir, ignore_errors=True)
    con.print(metrics_table(rows, title="MM-DiM component ablation (equal distillation budget)"),
              width=max(con.width, 120))  # a log file (80 columns by default) keeps the whole table
    for name, m in rows:
        con.print(f"{name}: {interval_text(m)}{vs_full_text(m)}")
    if summary is not None:
        for name, row in summary.items():
            line = f"{VARIANTS[name][1]}: PSNR over seeds {', '.join(f'{v:.2f}' for v in row['psnr_db'])} dB"
            if "vs_full_psnr_delta_db" in row:
                line += (f"; vs all components {', '.join(f'{d:+.2f}' for d in row['vs_full_psnr_delta_db'])} dB "
                         f"({'the same sign at every seed' if row['vs_full_consistent'] else 'the seed flips it'})")
            con.print(line)
    con.print(f"[green]wrote[/] {Path(opts.out).resolve()} (ablation.json, ablation.md, variants/*)")
    return report
