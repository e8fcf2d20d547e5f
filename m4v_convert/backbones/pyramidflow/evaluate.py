"""``m4v-convert eval`` for PyramidFlow: a converted model against the release model it came from.

There is no trained PyramidFlow teacher or synthetic task here (nothing to read prompt adherence
from), so this eval measures how closely the student reproduces the teacher:

* **prediction error per pyramid stage**: ``‖v_S − v_T‖ / ‖v_T‖`` on pyramid batches (every stage of
  a call at a random point of its flow, history frames lightly corrupted, as the release trains:
  :func:`.calibration.pyramid_batch`) built from the ``--calib`` folder's latents, else from the
  teacher's own samples;
* **same-seed samples**: both models run the release's sampler (:mod:`.sampler`, no guidance) from
  the same noise, each sample from its own seed; every latent video pair is mapped with the
  teacher's min/max to [0, 1]; PSNR over all samples, SSIM per channel × frame, the percentile
  bootstrap 95% interval of the PSNR, and ``‖x_S − x_T‖/‖x_T‖``.

Text conditions (T5 embeddings, mask, pooled CLIP) come from ``--calib`` (the PyramidFlow
calibration format), else synthetic ones (labelled so: they carry no prompt). Writes
``metrics.json`` and ``frames.png`` (teacher | student rows, latent channels through a fixed
projection to RGB).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from m4v_convert.errors import M4VError

from .calibration import (NUM_STAGES, PyramidCalibSpec, PyramidSample, folder_pyramid_samples, pyramid_batch,
                          synthetic_pyramid_samples)
from .layout import LATENT_PATCH
from .sampler import sample_pyramid_video, stack_conditions

SAMPLE_NOISE_BASE = 5_000_000  # sample i's noise: seed SAMPLE_NOISE_BASE + i (the same for teacher and student)
BATCH_NOISE_SEED = 6_000_000
CONDITION_SEED = 7_000_000
ARCH_EXCLUDE = ("m4v", "use_gradient_checkpointing", "use_flash_attn", "gradient_checkpointing_ratio")


@dataclass
class PyramidEvalOptions:
    teacher: Path
    student: Path
    out: Path
    calib: Path | None = None  # text conditions (and latents for the prediction error)
    conditions: int = 4  # synthetic conditions when there is no --calib
    seeds: int = 2  # samples per condition
    steps: int = 10  # Euler steps per pyramid stage
    frames: int | None = None  # latent frames per sample (default: the --calib latents', else the recipe's)
    device: str = "auto"
    overwrite: bool = False


def _sizes(opts: PyramidEvalOptions, m4v: dict, folder_samples: list | None) -> tuple[int, int, int]:
    """(latent frames, height, width) of the sampled videos."""
    if folder_samples:
        _, f, h, w = folder_samples[0].latents.shape
    else:
        from m4v_convert.recipes import load_recipe

        try:
            c = load_recipe(m4v.get("recipe", "")).calib
        except M4VError:
            raise M4VError(f"student {opts.student}: its recipe {m4v.get('recipe')!r} is not a shipped one, so the "
                           "video size is unknown; pass --calib DIR (its latents give the size)") from None
        f, h, w = int(c["latent_frames"]), int(c["latent_height"]), int(c["latent_width"])
    return (opts.frames or f), h, w


def load_pyramid_pair(teacher_path: Path, student_path: Path, device):
    from m4v_convert.io.converted import load_converted, read_converted_config

    from .loader import _resolve_folder, load_pyramidflow

    cfg = read_converted_config(student_path)
    m4v = cfg["m4v"]
    variant, resolution = m4v.get("variant"), m4v.get("resolution")
    teacher = load_pyramidflow(_resolve_folder(Path(teacher_path).expanduser(), resolution), variant=variant,
                               resolution=resolution, dtype=torch.float32, device=device)
    student = load_converted(student_path, dtype=torch.float32, device=device)
    t_cfg = {k: v for k, v in dict(teacher.config).items() if not k.startswith("_") and k not in ARCH_EXCLUDE}
    s_cfg = {k: v for k, v in dict(student.config).items() if not k.startswith("_") and k not in ARCH_EXCLUDE}
    diffs = [f"{k} {t_cfg.get(k)} vs {s_cfg.get(k)}" for k in sorted(set(t_cfg) | set(s_cfg))
             if json.dumps(t_cfg.get(k)) != json.dumps(s_cfg.get(k))]
    if diffs:
        raise M4VError(f"teacher {teacher_path} and student {student_path} have different architectures "
                       f"({'; '.join(diffs[:4])}): evaluate a student against the model it was converted from")
    return teacher.requires_grad_(False), student.requires_grad_(False), m4v


@torch.no_grad()
def prediction_errors(teacher, student, clean: list[PyramidSample], spec: PyramidCalibSpec, device,
                      batch_size: int = 2) -> dict[str, float]:
    """Relative error of the student's prediction per pyramid stage, pooled over ``clean``."""
    g = torch.Generator().manual_seed(BATCH_NOISE_SEED)
    diff = [0.0] * spec.num_stages
    norm = [0.0] * spec.num_stages
    for start in range(0, len(clean), batch_size):
        kw = pyramid_batch(clean[start:start + batch_size], spec, g, device=device)
        for s, (vt, vs) in enumerate(zip(teacher(**kw), student(**kw))):
            diff[s] += float((vs.double() - vt.double()).pow(2).sum())
            norm[s] += float(vt.double().pow(2).sum())
    return {f"stage{s}": math.sqrt(diff[s] / max(norm[s], 1e-30)) for s in range(spec.num_stages)}


def evaluate_pyramid(teacher, student, conditions: list[PyramidSample], spec: PyramidCalibSpec, seeds: int,
                     steps: int, device, real_latents: bool, progress=None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """All metrics; returns (metrics, teacher samples, student samples), samples (N, C, F, H, W)."""
    from m4v_convert.metrics import pair_scores, psnr_ci95, psnr_of_mse, relative_error, resampled_means

    t0 = time.time()
    xs = {"teacher": [], "student": []}
    n = len(conditions) * seeds
    for i in range(n):
        cond = conditions[i // seeds]
        text, mask, pooled = stack_conditions([cond])
        for name, model in (("teacher", teacher), ("student", student)):
            xs[name].append(sample_pyramid_video(
                model, text, mask, pooled, channels=spec.latent_channels, frames=spec.latent_frames,
                height=spec.latent_height, width=spec.latent_width, steps=steps,
                generator=torch.Generator().manual_seed(SAMPLE_NOISE_BASE + i), num_stages=spec.num_stages,
                shift=spec.flow_shift, gamma=spec.gamma, device=device)[0])
        if progress is not None:
            progress(i + 1, n)
    xs_t, xs_s = torch.stack(xs["teacher"]), torch.stack(xs["student"])
    clean = conditions if real_latents else [PyramidSample(x, c.text, c.text_mask, c.pooled)
                                             for x, c in zip(xs_t, [conditions[i // seeds] for i in range(n)])]
    errors = prediction_errors(teacher, student, clean, spec, device)
    mses, ssims = pair_scores(xs_t, xs_s)
    mse = sum(mses) / len(mses)
    (boot,) = resampled_means([mses])
    ci = psnr_ci95(boot)
    metrics = {
        "backbone": "pyramidflow", "samples": n, "conditions": len(conditions), "seeds_per_condition": seeds,
        "size": {"latent_frames": spec.latent_frames, "latent_height": spec.latent_height,
                 "latent_width": spec.latent_width},
        "sampler": {"name": "PyramidFlow pyramid sampler (release generate, no guidance)", "steps_per_stage": steps,
                    "stages": spec.num_stages},
        "pred_rel_error": errors, "pred_rel_error_mean": sum(errors.values()) / len(errors),
        "pred_rel_error_on": "calibration latents" if real_latents else "teacher samples",
        "psnr_db": psnr_of_mse(mse), "psnr_db_ci95": ci,
        "psnr_db_per_sample": [psnr_of_mse(m) for m in mses],
        "ssim": sum(ssims) / len(ssims), "sample_rel_error": relative_error(xs_s, xs_t),
        "seconds": round(time.time() - t0, 1),
    }
    return metrics, xs_t, xs_s


def write_frames_png(xs_t: torch.Tensor, xs_s: torch.Tensor, path: Path, rows: int = 4, scale: int = 8) -> None:
    """Teacher and student samples as RGB frame strips (a fixed orthonormal projection of the latent
    channels, both mapped with the teacher's range), one teacher row then one student row per sample."""
    from PIL import Image

    c = xs_t.shape[1]
    proj, _ = torch.linalg.qr(torch.randn(c, 3, generator=torch.Generator().manual_seed(0)))
    pick = slice(0, min(rows, xs_t.shape[0]))

    def rgb(x):  # (N, C, F, H, W) → (N, F, H, W, 3)
        return torch.einsum("ncfhw,ck->nfhwk", x.float(), proj[:, : min(3, c)])

    t, s = rgb(xs_t[pick]), rgb(xs_s[pick])
    lo, hi = t.amin(dim=(1, 2, 3), keepdim=True), t.amax(dim=(1, 2, 3), keepdim=True)
    t, s = [((v - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1) for v in (t, s)]
    gap = 1.0  # white lines between frames and between samples
    strips = []
    for a, b in zip(t, s):
        for video in (a, b):
            frames = [torch.nn.functional.pad(f.permute(2, 0, 1), (0, 1), value=gap).permute(1, 2, 0) for f in video]
            strips.append(torch.cat(frames, dim=1))  # frames side by side: (H, F·(W + 1), 3)
        strips.append(torch.full((1, strips[-1].shape[1], 3), gap))
    img = (torch.cat(strips, dim=0) * 255).round().to(torch.uint8)
    img = img.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    Image.fromarray(img.numpy()).save(path)


def run_pyramid_eval(opts: PyramidEvalOptions, console=None) -> dict:
    from m4v_convert.metrics import metrics_json
    from m4v_convert.io.output import atomic_output_dir, check_output_dir
    from m4v_convert.jobs.plan import console_or_default as _console, resolve_device

    con = _console(console)
    for name, value in (("--seeds", opts.seeds), ("--steps", opts.steps), ("--conditions", opts.conditions)):
        if value < 1:
            raise M4VError(f"{name}: expected >= 1, got {value}")
    if opts.frames is not None and opts.frames < 1:
        raise M4VError(f"--frames: expected >= 1 latent frames, got {opts.frames}")
    if opts.calib is not None and not Path(opts.calib).expanduser().is_dir():
        raise M4VError(f"--calib {opts.calib}: not a folder")
    check_output_dir(opts.out, opts.overwrite, {"teacher": opts.teacher, "student": opts.student,
                                                "--calib": opts.calib})
    device = resolve_device(opts.device)
    teacher, student, m4v = load_pyramid_pair(opts.teacher, opts.student, device)
    cfg = dict(teacher.config)
    channels = cfg["in_channels"] if m4v.get("variant") == "sd3" else cfg["in_channels"] // (LATENT_PATCH ** 2)
    max_grid = cfg.get("pos_embed_max_size") if m4v.get("variant") == "sd3" else None
    probe = PyramidCalibSpec(latent_channels=channels, text_dim=cfg["joint_attention_dim"],
                             pooled_dim=cfg["pooled_projection_dim"], latent_frames=1, latent_height=8,
                             latent_width=8, text_len=1, max_token_grid=max_grid)
    folder = folder_pyramid_samples(Path(opts.calib).expanduser(), probe) if opts.calib is not None else None
    frames, height, width = _sizes(opts, m4v, folder)
    text_len = folder[0].text.shape[0] if folder else 32
    spec = PyramidCalibSpec(latent_channels=channels, text_dim=cfg["joint_attention_dim"],
                            pooled_dim=cfg["pooled_projection_dim"], latent_frames=frames, latent_height=height,
                            latent_width=width, text_len=text_len, num_stages=NUM_STAGES, max_token_grid=max_grid)
    spec.validate("eval video size")
    if folder is not None:
        conditions, source = folder, f"folder:{Path(opts.calib).resolve()}"
        if opts.frames is not None and opts.frames != folder[0].latents.shape[1]:
            raise M4VError(f"--frames {opts.frames}: the --calib latents have {folder[0].latents.shape[1]} frames "
                           "(they are also the prediction-error inputs); drop --frames")
    else:
        conditions, source = synthetic_pyramid_samples(spec, opts.conditions, seed=CONDITION_SEED), "synthetic"
        con.print("[yellow]eval: SYNTHETIC text conditions (random T5-like embeddings): the samples show no "
                  "prompt; pass --calib DIR with real text conditions[/]")
    n = len(conditions) * opts.seeds
    con.print(f"eval (PyramidFlow): {len(conditions)} conditions × {opts.seeds} seeds, {frames} latent frames of "
              f"{height}×{width}, {opts.steps} Euler steps per stage ({spec.num_stages} stages)")
    metrics, xs_t, xs_s = evaluate_pyramid(
        teacher, student, conditions, spec, opts.seeds, opts.steps, device, real_latents=folder is not None,
        progress=lambda done, total: con.print(f"  samples {done}/{total} (teacher and student)"))
    metrics.update(teacher=str(Path(opts.teacher).resolve()), student=str(Path(opts.student).resolve()),
                   conditions_source=source, converted_layers=list(student.converted_layers))
    with atomic_output_dir(opts.out, opts.overwrite) as tmp:
        (tmp / "metrics.json").write_text(metrics_json(metrics) + "\n")
        write_frames_png(xs_t, xs_s, tmp / "frames.png")
    lo, hi = metrics["psnr_db_ci95"]
    errs = ", ".join(f"{k} {v:.3f}" for k, v in metrics["pred_rel_error"].items())
    con.print(f"prediction rel. error ({metrics['pred_rel_error_on']}): {errs}; mean "
              f"{metrics['pred_rel_error_mean']:.3f}")
    con.print(f"same-seed samples ({n}): PSNR {metrics['psnr_db']:.2f} dB [{lo:.2f}, {hi:.2f}], SSIM "
              f"{metrics['ssim']:.3f}, sample rel. error {metrics['sample_rel_error']:.3f}")
    con.print(f"[green]wrote[/] {Path(opts.out).resolve()} (metrics.json, frames.png)")
    return metrics
