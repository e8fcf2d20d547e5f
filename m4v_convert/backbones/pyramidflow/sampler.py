"""The release's text-to-video sampler: autoregressive over latent frames, pyramidal within each.

``generate`` in the release (``pyramid_dit_for_video_gen_pipeline.py``), latents out, no VAE:

* the initial noise is drawn at the top level for every latent frame and brought down to the
  lowest level by bilinear halvings (×2, so it keeps unit variance);
* each latent frame (one per autoregressive unit) runs the pyramid stages low → high. A stage
  takes ``steps`` Euler steps of the stage's flow (interpolation ratio ``linspace(1, 0.001, n)``
  then 0, timesteps over the stage's range, :class:`.calibration.PyramidSchedule`); between stages
  the latent is upsampled (nearest ×2) and renoised, ``α·up(x) + β·ε_block``, with the release's
  coefficients and its *block noise* (each 2×2 block correlated, covariance ``(1+γ)I − γ·11ᵀ``),
  which keeps the jump on the next stage's flow without block artifacts;
* the history a frame's stage sees is the frames generated so far, at the pyramid levels of
  :func:`.layout.history_clips` (successive bilinear halvings of the clean top-level frames).

Classifier-free guidance is not applied (it needs negative-prompt embeddings, which a calibration
folder does not hold): each call is the conditional prediction, as for Wan's teacher-generated
calibration. Calls hold one stage, so the model sees the single-stage inputs inference gives it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch

from m4v_convert.errors import M4VError

from .calibration import PyramidSchedule, _double_nearest, _halve, pyramid_levels
from .layout import history_clips


def block_noise(shape: Sequence[int], gamma: float, generator: torch.Generator) -> torch.Tensor:
    """``(B, C, T, H, W)`` noise, unit variance per element, each 2×2 spatial block correlated with
    covariance ``(1 + γ)·I − γ·11ᵀ`` (the release's ``sample_block_noise``; γ ≤ 1/3, where the
    covariance is positive semi-definite: at 1/3 every block sums to zero)."""
    b, c, t, h, w = shape
    if h % 2 or w % 2:
        raise ValueError(f"block noise needs even H and W, got {h}×{w}")
    if not 0 <= gamma <= 1 / 3 + 1e-9:
        raise M4VError(f"pyramid sampler: gamma must be in [0, 1/3] (block covariance (1+γ)I − γ·11ᵀ), got {gamma}")
    # x = sqrt(1+γ)·(z − k·Σz) has covariance (1+γ)(I + (4k² − 2k)·11ᵀ); 4k² − 2k = −γ/(1+γ) gives k below
    k = (1 - math.sqrt(max(0.0, 1 - 4 * gamma / (1 + gamma)))) / 4
    z = torch.randn(b, c, t, h // 2, w // 2, 4, generator=generator)
    x = math.sqrt(1 + gamma) * (z - k * z.sum(-1, keepdim=True))
    return x.view(b, c, t, h // 2, w // 2, 2, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(b, c, t, h, w)


def renoise_coefficients(schedule: PyramidSchedule, stage: int, gamma: float) -> tuple[float, float]:
    """(α, β) of the jump into ``stage`` (> 0): ``x ← α·up(x) + β·ε_block``. The signal coefficient
    of the previous stage's end (``1 − σ_end``) becomes the corrected start of this one."""
    signal = 1 - schedule.end_sigmas[stage - 1]  # the release's 1 − ori_start_sigmas[stage]
    alpha = 1 / (math.sqrt(1 + 1 / gamma) * (1 - signal) + signal)
    return alpha, alpha * (1 - signal) / math.sqrt(gamma)


def stage_ratios(steps: int) -> torch.Tensor:
    """Interpolation ratios of one stage's Euler steps, ``steps + 1`` values from 1 to 0 (the release's
    ``linspace(1, 0.001, steps)`` then 0)."""
    return torch.cat([torch.linspace(1.0, 1 / 1000, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def sample_pyramid_video(
    model: torch.nn.Module,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    pooled: torch.Tensor,
    *,
    channels: int,
    frames: int,
    height: int,
    width: int,
    steps: int | Sequence[int],
    generator: torch.Generator,
    num_stages: int = 3,
    shift: float = 1.0,
    gamma: float = 1 / 3,
    device="cpu",
    dtype=torch.float32,
    on_unit: Callable[[int, int], None] | None = None,
    first_frame_steps: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Clean top-level latents ``(B, channels, frames, height, width)`` sampled by ``model``.

    text ``(B, Lz, text_dim)``, text_mask ``(B, Lz)``, pooled ``(B, pooled_dim)``; ``steps``: Euler
    steps per stage (one number for all, or one per stage), ``first_frame_steps`` those of the first
    latent frame (default: ``steps``; the release generates with 20 for the first frame and 10 for the
    others, :data:`m4v_convert.backbones.pyramidflow.flops.SCHEDULE`); ``on_unit(done, total)`` after each
    latent frame. Randomness comes from ``generator`` only (CPU), so a seed gives the same video.
    """
    def per_stage(value, name):
        out = [int(value)] * num_stages if isinstance(value, int) else [int(v) for v in value]
        if len(out) != num_stages or min(out) < 1:
            raise M4VError(f"pyramid sampler: {name} must be >= 1 for each of the {num_stages} stages, got {value}")
        return out

    step_list = per_stage(steps, "steps")
    first_list = step_list if first_frame_steps is None else per_stage(first_frame_steps, "first_frame_steps")
    scale = 2 ** (num_stages - 1)
    if height % (2 * scale) or width % (2 * scale):
        raise M4VError(f"pyramid sampler: latent {height}×{width} must be multiples of {2 * scale} (2×2 patches at "
                       f"{num_stages} pyramid levels)")
    b = text.shape[0]
    schedule = PyramidSchedule.release(num_stages, shift=shift, gamma=gamma)
    noise = torch.randn(b, channels, frames, height, width, generator=generator)
    for _ in range(num_stages - 1):
        noise = _halve(noise) * 2
    cond = {"encoder_hidden_states": text.to(device=device, dtype=dtype),
            "encoder_attention_mask": text_mask.to(device),
            "pooled_projections": pooled.to(device=device, dtype=dtype)}
    generated: list[torch.Tensor] = []
    # a converted model names each frame's pyramid level (its register) from the top-level token grid
    top_grid = getattr(model, "pyramid_top_grid", None)
    with top_grid((height // 2, width // 2)) if top_grid is not None else contextlib.nullcontext():
        for unit in range(frames):
            generated.append(_sample_frame(model, noise[:, :, unit:unit + 1], generated, cond, schedule,
                                           first_list if unit == 0 else step_list, num_stages, gamma, generator, b,
                                           device, dtype))
            if on_unit is not None:
                on_unit(unit + 1, frames)
    return torch.cat(generated, dim=2)


def _sample_frame(model, x, generated, cond, schedule, step_list, num_stages, gamma, generator, b, device, dtype):
    """One latent frame through every pyramid stage, its history the frames ``generated`` so far."""
    unit = len(generated)
    levels = pyramid_levels(torch.cat(generated, dim=2), num_stages) if generated else None
    for stage in range(num_stages):
        if stage:
            alpha, beta = renoise_coefficients(schedule, stage, gamma)
            x = _double_nearest(x)
            x = alpha * x + beta * block_noise(x.shape, gamma, generator)
        history, t0 = [], 0
        for n, level in history_clips(stage, unit):
            history.append(levels[level][:, :, t0:t0 + n].to(device=device, dtype=dtype))
            t0 += n
        ratios = stage_ratios(step_list[stage])
        for i in range(step_list[stage]):
            t = schedule.timestep(stage, ratios[i]).float()
            v = model(sample=[[*history, x.to(device=device, dtype=dtype)]],
                      timestep_ratio=t.expand(b).to(device=device, dtype=dtype), **cond)[0]
            x = x + float(ratios[i + 1] - ratios[i]) * v.float().cpu()
    if not torch.isfinite(x).all():
        raise M4VError(f"pyramid sampler: the model produced NaN/inf latents at frame {unit}; check the "
                       "checkpoint and --dtype")
    return x


def stack_conditions(samples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text, text_mask, pooled) of ``PyramidSample``s, batched: the sampler's conditioning arguments."""
    return (torch.stack([s.text for s in samples]), torch.stack([s.text_mask for s in samples]),
            torch.stack([s.pooled for s in samples]))


def teacher_calibration_samples(teacher: torch.nn.Module, texts: list, spec, steps: int, seed: int, batch_size: int = 1,
                                device="cpu", dtype=torch.float32,
                                progress: Callable[[int, int], None] | None = None,
                                first_frame_steps: int | None = None) -> list:
    """One clean top-level video per text condition of ``texts`` (``PyramidSample``s; their latents are
    not used), sampled by ``teacher`` at the calibration sizes of ``spec`` (``PyramidCalibSpec``) with
    ``steps`` Euler steps per stage (``first_frame_steps`` for the first latent frame; default ``steps``)."""
    from .calibration import PyramidSample

    gen = torch.Generator().manual_seed(seed)
    out: list[PyramidSample] = []
    for start in range(0, len(texts), max(1, batch_size)):
        chunk = texts[start:start + max(1, batch_size)]
        latents = sample_pyramid_video(
            teacher, *stack_conditions(chunk), channels=spec.latent_channels, frames=spec.latent_frames,
            height=spec.latent_height, width=spec.latent_width, steps=steps, generator=gen,
            first_frame_steps=first_frame_steps, num_stages=spec.num_stages, shift=spec.flow_shift, gamma=spec.gamma, device=device, dtype=dtype)
        out.extend(PyramidSample(latents[i].clone(), c.text, c.text_mask, c.pooled) for i, c in enumerate(chunk))
        if progress is not None:
            progress(len(out), len(texts))
    return out


def pyramid_sample_tensors(samples: list) -> dict[str, torch.Tensor]:
    """``PyramidSample`` list → the ``--calib`` folder's tensors (read back by ``folder_pyramid_samples``)."""
    return {"latents": torch.stack([s.latents for s in samples]), "text_embeds": torch.stack([s.text for s in samples]),
            "text_mask": torch.stack([s.text_mask for s in samples]), "pooled": torch.stack([s.pooled for s in samples])}


def conditions_digest(samples: list) -> str:
    """Hash of every sample's text condition (embeddings, mask, pooled)."""
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        for t in (s.text.float(), s.text_mask.long(), s.pooled.float()):
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
