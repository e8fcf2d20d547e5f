"""Pyramid-shaped calibration batches for distilling a converted PyramidFlow model.

One batch is one model call holding all pyramid stages (levels 0 … S−1, low → high), as the
release's training packs them, so every stage's register is exercised. Per sample and stage:

* the history frames (all but the last latent frame) laid out by the release's inference rule
  (:func:`.layout.history_clips`: the newest at the stage's level, older ones a level lower
  each, the oldest together at level 0), each at its level's resolution (successive bilinear
  halvings of the top-level latents, as ``get_pyramid_latent`` does), corrupted with a little
  noise as the release's training does;
* the noisy clip: the last frame at the stage's resolution on the stage's piece of the pyramidal
  flow (:class:`PyramidSchedule`: from the upsampled previous level, renoised, towards this
  level), with the stage's timestep — the inputs the released model was trained on, and, for
  stage 3, the flow target it was trained to predict.

Sources:

* **synthetic** (no ``--calib``): latents ~ N(0, 1), T5-like text embeddings ~ N(0, 1) with a
  random number of valid tokens (left-aligned, mask 1) and the padded rows holding other random
  vectors (T5 pad outputs are not zero, so the mask matters), random pooled CLIP projections. They
  carry no video content; a conversion distilled on them is labelled ``calibration: synthetic``.
* **folder** (``--calib DIR``): every ``*.safetensors`` file in DIR holds one or more samples of
  real (VAE-encoded) videos at the top pyramid level:

  - ``latents``: (C, F, H, W) or (n, C, F, H, W), F latent frames (the last one is the noisy
    frame, the others its history); H and W multiples of ``2 · 2**(stages − 1)``;
  - ``text_embeds``: (Lz, text_dim) or (n, Lz, text_dim) T5 outputs, pad rows as the encoder gave them;
  - ``text_mask``: (Lz,) or (n, Lz), 1 = valid token (the release's T5 mask; required, since pad
    rows are not zero);
  - ``pooled``: (pooled_dim,) or (n, pooled_dim) pooled CLIP text projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from m4v_convert.distill.calibration import read_tensor_files
from m4v_convert.errors import M4VError

from .layout import LATENT_PATCH, history_clips

NUM_STAGES = 3  # the released models' pyramid (stages [1, 2, 3])


@dataclass
class PyramidCalibSpec:
    latent_channels: int
    text_dim: int  # joint_attention_dim (T5 width)
    pooled_dim: int  # pooled_projection_dim (CLIP width)
    latent_frames: int  # history frames + the noisy frame
    latent_height: int  # of the top pyramid level
    latent_width: int
    text_len: int
    flow_shift: float = 1.0  # the release's scheduler shift (timestep_shift: 1.0)
    num_stages: int = NUM_STAGES
    gamma: float = 1 / 3  # the release's scheduler_gamma (renoising between stages)
    corrupt_ratio: float = 1 / 3  # the release's history corruption: σ_c ~ U(0, corrupt_ratio)
    max_token_grid: int | None = None  # largest token-grid side the model takes (SD3: pos_embed_max_size)

    def validate(self, where: str = "recipe calib") -> None:
        step = LATENT_PATCH * 2 ** (self.num_stages - 1)
        if self.latent_height % step or self.latent_width % step or min(self.latent_height, self.latent_width) < step:
            raise M4VError(f"{where}: latent_height/latent_width ({self.latent_height}×{self.latent_width}) "
                           f"must be positive multiples of {step} (2×2 patches at {self.num_stages} pyramid levels)")
        if self.latent_frames < 1 or self.text_len < 1:
            raise M4VError(f"{where}: latent_frames and text_len must be >= 1")
        self.check_grid(self.latent_height, self.latent_width, where)

    def check_grid(self, height: int, width: int, where: str) -> None:
        """Refuse top-level latents whose token grid the model cannot position (SD3's pos_embed table)."""
        side = max(height, width) // LATENT_PATCH
        if self.max_token_grid is not None and side > self.max_token_grid:
            raise M4VError(f"{where}: latents of {height}×{width} make a {height // LATENT_PATCH}×"
                           f"{width // LATENT_PATCH} token grid, larger than this model's pos_embed_max_size "
                           f"{self.max_token_grid}; use smaller latents")


@dataclass
class PyramidSample:
    latents: torch.Tensor  # (C, F, H, W) at the top level
    text: torch.Tensor  # (Lz, text_dim)
    text_mask: torch.Tensor  # (Lz,) long, 1 = valid (left-aligned)
    pooled: torch.Tensor  # (pooled_dim,)


def synthetic_pyramid_samples(spec: PyramidCalibSpec, n: int, seed: int) -> list[PyramidSample]:
    spec.validate()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lat = torch.randn(spec.latent_channels, spec.latent_frames, spec.latent_height, spec.latent_width, generator=g)
        text = torch.randn(spec.text_len, spec.text_dim, generator=g)
        valid = int(torch.randint(1, spec.text_len + 1, (1,), generator=g))
        mask = torch.zeros(spec.text_len, dtype=torch.long)
        mask[:valid] = 1
        out.append(PyramidSample(lat, text, mask, torch.randn(spec.pooled_dim, generator=g)))
    return out


def folder_pyramid_samples(folder: Path, spec: PyramidCalibSpec, flag: str = "--calib") -> list[PyramidSample]:
    """Every sample of every ``*.safetensors`` file in ``folder`` (format in the module docstring),
    checked against the model (channels, text and pooled widths) and the pyramid (H, W)."""
    step = LATENT_PATCH * 2 ** (spec.num_stages - 1)
    out, shapes = [], set()
    for f, t in read_tensor_files(folder, ("latents", "text_embeds", "text_mask", "pooled"), flag):
        lat, txt, mask, pooled = (t[k] for k in ("latents", "text_embeds", "text_mask", "pooled"))
        single = lat.dim() == 4
        if single:
            lat, txt, mask, pooled = lat[None], txt[None], mask[None], pooled[None]
        n = lat.shape[0]
        c = spec.latent_channels
        if lat.dim() != 5 or lat.shape[1] != c or lat.shape[3] % step or lat.shape[4] % step or min(lat.shape[3:]) < step:
            raise M4VError(f"{flag} {f}: latents must be (C={c}, F, H, W) or (n, C, F, H, W) with H and W positive "
                           f"multiples of {step} (2x2 patches at {spec.num_stages} pyramid levels), got "
                           f"{tuple(t['latents'].shape)}")
        if txt.dim() != 3 or txt.shape[0] != n or txt.shape[2] != spec.text_dim:
            raise M4VError(f"{flag} {f}: text_embeds must be (Lz, {spec.text_dim}) or (n={n}, Lz, {spec.text_dim}), "
                           f"got {tuple(t['text_embeds'].shape)}")
        if tuple(mask.shape) != tuple(txt.shape[:2]):
            raise M4VError(f"{flag} {f}: text_mask must have shape {tuple(txt.shape[1 if single else 0:2])}, got "
                           f"{tuple(t['text_mask'].shape)}")
        if tuple(pooled.shape) != (n, spec.pooled_dim):
            raise M4VError(f"{flag} {f}: pooled must be ({spec.pooled_dim},) or (n={n}, {spec.pooled_dim}), got "
                           f"{tuple(t['pooled'].shape)}")
        for i in range(n):
            if not all(torch.isfinite(x[i].float()).all() for x in (lat, txt, pooled)):
                raise M4VError(f"{flag} {f}: sample {i} has NaN or inf values")
            if not mask[i].bool().any():
                raise M4VError(f"{flag} {f}: sample {i} has no valid text token (text_mask all 0)")
            out.append(PyramidSample(lat[i].float(), txt[i].float(), mask[i].long(), pooled[i].float()))
        spec.check_grid(lat.shape[3], lat.shape[4], f"{flag} {f}")
        shapes.add(tuple(lat.shape[1:]))
    if len(shapes) > 1:
        raise M4VError(f"{flag} {folder}: latents of different shapes {sorted(shapes)[:4]}; every sample of a run "
                       "must have one (C, F, H, W) shape (they are batched together)")
    if len({s.text.shape[0] for s in out}) > 1:
        raise M4VError(f"{flag} {folder}: text_embeds of different lengths; pad every sample to one Lz")
    return out


def _resize_frames(latents: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    """(B, C, F, H, W) → (B, C, F, h, w), every frame resized alone."""
    b, c, f = latents.shape[:3]
    x = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, *latents.shape[3:])
    x = F.interpolate(x, size=(h, w), mode=mode)
    return x.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def _halve(latents: torch.Tensor) -> torch.Tensor:
    """Bilinear half size in H and W (one pyramid level, as ``get_pyramid_latent``)."""
    return _resize_frames(latents, latents.shape[3] // 2, latents.shape[4] // 2, "bilinear")


def _double_nearest(latents: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour double size (the release's upsampling of a stage's start)."""
    return _resize_frames(latents, 2 * latents.shape[3], 2 * latents.shape[4], "nearest")


def pyramid_levels(latents: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
    """Top-level latents → one tensor per pyramid level, low → high (successive bilinear halvings)."""
    levels = [latents]
    for _ in range(num_stages - 1):
        levels.append(_halve(levels[-1]))
    return levels[::-1]


@dataclass(frozen=True)
class PyramidSchedule:
    """The release's per-stage flow (``PyramidFlowMatchEulerDiscreteScheduler`` with its training
    defaults: 1000 steps, ``stage_range`` thirds, ``gamma`` 1/3, ``shift`` 1).

    Stage ``s`` runs from ``start_s = start_sigma·ε + (1 − start_sigma)·up(x_{s−1})`` (pure noise
    at stage 0; ``up`` = nearest ×2 of the previous level's clean latents) to ``end_s =
    end_sigma·ε + (1 − end_sigma)·x_s`` (clean at the last stage); inside the stage ``x = r·start +
    (1 − r)·end`` with ``r`` from 1 to 0, the model's timestep runs linearly over the stage's
    share of ``[1000, 1]`` and the flow target is ``start − end``. ``gamma`` renoises the jump
    between stages (the start sigma is corrected so the upsampled latent keeps unit variance).
    """

    start_sigmas: tuple[float, ...]
    end_sigmas: tuple[float, ...]
    timestep_ranges: tuple[tuple[float, float], ...]  # (t at r = 1, t at r → 0) per stage

    @classmethod
    def release(cls, num_stages: int = NUM_STAGES, shift: float = 1.0, gamma: float = 1 / 3,
                train_steps: int = 1000) -> "PyramidSchedule":
        n = train_steps
        sig = [(n - i) / n for i in range(n)]  # linspace(1, n, n)[::-1] / n
        sig = [shift * s / (1 + (shift - 1) * s) for s in sig]
        timesteps = [s * n for s in sig]
        bounds = [i / num_stages for i in range(num_stages + 1)]
        starts, ends = [], []
        for i in range(num_stages):
            start = sig[max(int(bounds[i] * n), 0)]
            end_idx = min(int(bounds[i + 1] * n), n)
            end = sig[end_idx] if end_idx < n else 0.0
            if i:
                ori = 1 - start
                start = 1 - ori / (math.sqrt(1 + 1 / gamma) * (1 - ori) + ori)
            starts.append(start)
            ends.append(end)
        dist = [a - b for a, b in zip(starts, ends)]
        total = sum(dist)
        ranges = []
        for i in range(num_stages):
            r0 = sum(dist[:i]) / total
            r1 = 1.0 if i == num_stages - 1 else sum(dist[:i + 1]) / total
            ranges.append((timesteps[int(r0 * n)], timesteps[min(int(r1 * n), n - 1)]))
        return cls(tuple(starts), tuple(ends), tuple(ranges))

    def timestep(self, stage: int, ratio: torch.Tensor) -> torch.Tensor:
        """The model's timestep at interpolation ratio ``ratio`` (1 → 0) inside ``stage``."""
        t_max, t_min = self.timestep_ranges[stage]
        return t_min + (t_max - t_min) * ratio


def pyramid_batch(samples: list[PyramidSample], spec: PyramidCalibSpec, generator: torch.Generator,
                  device="cpu", dtype=torch.float32, with_target: bool = False):
    """Stack ``samples`` into keyword arguments of one PyramidFlow model call (all stages), noised
    the way the release trains (``add_pyramid_noise_with_temporal_pyramid``; :class:`PyramidSchedule`).

    Per sample and stage: the noisy clip is the last latent frame at the stage's resolution at a
    uniform interpolation ratio of the stage's flow; the history frames (laid out by
    :func:`.layout.history_clips`) are corrupted by ``σ_c·ε' + (1 − σ_c)·x`` with ``σ_c ~
    U(0, corrupt_ratio)`` per sample and stage, as in the release. ``with_target``: also return
    the flow target ``start − end`` of every stage's noisy clip, flattened and concatenated over
    stages, ``(B, ·)`` (the layout of :class:`.converted.FlatPrediction`).
    """
    s_n = spec.num_stages
    sched = PyramidSchedule.release(s_n, shift=spec.flow_shift, gamma=spec.gamma)
    lat = torch.stack([s.latents for s in samples]).float()  # (B, C, F, H, W)
    b, n_hist = lat.shape[0], lat.shape[2] - 1
    levels = pyramid_levels(lat, s_n)
    noise = [torch.randn(lat[:, :, n_hist:].shape, generator=generator)]  # top level, the noisy frame only
    for _ in range(s_n - 1):
        noise.append(_halve(noise[-1]) * 2)  # keeps unit variance, as the release does
    noise = noise[::-1]
    ratio = 1 - torch.randint(0, 1000, (b, s_n), generator=generator).float() / 1000  # linspace(1, 0, 1001)[idx]
    corrupt = torch.rand(b, s_n, generator=generator) * spec.corrupt_ratio
    timesteps = torch.stack([sched.timestep(s, ratio[:, s]) for s in range(s_n)], dim=1)  # (B, S)
    sample, targets = [], []
    for stage in range(s_n):
        x0, eps = levels[stage][:, :, n_hist:], noise[stage]
        if stage == 0:
            start = eps
        else:
            up = _double_nearest(levels[stage - 1][:, :, n_hist:])
            start = sched.start_sigmas[stage] * eps + (1 - sched.start_sigmas[stage]) * up
        end = x0 if stage == s_n - 1 else sched.end_sigmas[stage] * eps + (1 - sched.end_sigmas[stage]) * x0
        r = ratio[:, stage].view(-1, 1, 1, 1, 1)
        c = corrupt[:, stage].view(-1, 1, 1, 1, 1)
        clips, t0 = [], 0
        for frames, level in history_clips(stage, n_hist):
            hist = levels[level][:, :, t0:t0 + frames]
            clips.append(c * torch.randn(hist.shape, generator=generator) + (1 - c) * hist)
            t0 += frames
        clips.append(r * start + (1 - r) * end)
        sample.append([x.to(device=device, dtype=dtype) for x in clips])
        targets.append((start - end).flatten(1))

    def rows(t: torch.Tensor) -> torch.Tensor:  # (B, ...) → (B·S, ...), stage index fastest
        return t.repeat_interleave(s_n, dim=0)

    kwargs = {
        "sample": sample,
        "encoder_hidden_states": rows(torch.stack([s.text for s in samples])).to(device=device, dtype=dtype),
        "encoder_attention_mask": rows(torch.stack([s.text_mask for s in samples])).to(device),
        "pooled_projections": rows(torch.stack([s.pooled for s in samples])).to(device=device, dtype=dtype),
        "timestep_ratio": timesteps.reshape(-1).to(device=device, dtype=dtype),
    }
    return (kwargs, torch.cat(targets, dim=1).to(device)) if with_target else kwargs


def shard_pyramid_batch(batch, rows: slice, num_stages: int, device, dtype, with_target: bool = False):
    """Samples ``rows`` of a :func:`pyramid_batch` output (one process's share), moved to ``device``."""
    kwargs, target = batch if with_target else (batch, None)
    text_rows = slice(rows.start * num_stages, rows.stop * num_stages)
    out = {"sample": [[c[rows].to(device=device, dtype=dtype) for c in clips] for clips in kwargs["sample"]],
           "encoder_attention_mask": kwargs["encoder_attention_mask"][text_rows].to(device)}
    for k in ("encoder_hidden_states", "pooled_projections", "timestep_ratio"):
        out[k] = kwargs[k][text_rows].to(device=device, dtype=dtype)
    return (out, target[rows].to(device)) if with_target else out
