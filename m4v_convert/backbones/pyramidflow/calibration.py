"""Pyramid-shaped calibration batches for distilling a converted PyramidFlow model.

One batch is one model call holding all pyramid stages (levels 0 … S−1, low → high), as the
release's training packs them, so every stage's register is exercised. Per sample and stage:

* the history frames (all but the last latent frame) laid out by the release's inference rule
  (:func:`.layout.history_clips`: the newest at the stage's level, older ones a level lower
  each, the oldest together at level 0), each at its level's resolution (bilinear downsampling
  of the top-level latents, as ``get_pyramid_latent`` does);
* the noisy clip: the last frame at the stage's resolution, noised by rectified flow
  ``x_t = (1 − σ)·x_0 + σ·ε`` at a random σ (shifted by ``flow_shift``), ``timestep_ratio = 1000·σ``.

Source: **synthetic** only — latents ~ N(0, 1), T5-like text embeddings ~ N(0, 1) with a random
number of valid tokens (left-aligned, mask 1) and the padded rows holding other random vectors
(T5 pad outputs are not zero, so the mask matters), random pooled CLIP projections. They carry
no video content; a conversion distilled on them is labelled ``calibration: synthetic``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    flow_shift: float = 1.0
    num_stages: int = NUM_STAGES

    def validate(self) -> None:
        step = LATENT_PATCH * 2 ** (self.num_stages - 1)
        if self.latent_height % step or self.latent_width % step or min(self.latent_height, self.latent_width) < step:
            raise M4VError(f"recipe calib: latent_height/latent_width ({self.latent_height}×{self.latent_width}) "
                           f"must be positive multiples of {step} (2×2 patches at {self.num_stages} pyramid levels)")
        if self.latent_frames < 1 or self.text_len < 1:
            raise M4VError("recipe calib: latent_frames and text_len must be >= 1")


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


def _downsample(latents: torch.Tensor, halvings: int) -> torch.Tensor:
    """(B, C, F, H, W) → bilinear ``2**halvings`` times smaller in H and W."""
    if halvings == 0:
        return latents
    b, c, f, h, w = latents.shape
    x = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    x = F.interpolate(x, size=(h >> halvings, w >> halvings), mode="bilinear")
    return x.reshape(b, f, c, h >> halvings, w >> halvings).permute(0, 2, 1, 3, 4)


def _shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def pyramid_batch(samples: list[PyramidSample], spec: PyramidCalibSpec, generator: torch.Generator,
                  device="cpu", dtype=torch.float32) -> dict:
    """Stack ``samples`` into keyword arguments of one PyramidFlow model call (all stages)."""
    s_n = spec.num_stages
    lat = torch.stack([s.latents for s in samples])  # (B, C, F, H, W)
    b, n_hist = lat.shape[0], lat.shape[2] - 1
    levels = [_downsample(lat, s_n - 1 - lv) for lv in range(s_n)]
    sigma = _shift(torch.rand(b, s_n, generator=generator), spec.flow_shift)  # (B, S)
    sample = []
    for stage in range(s_n):
        clips, t0 = [], 0
        for frames, level in history_clips(stage, n_hist):
            clips.append(levels[level][:, :, t0:t0 + frames])
            t0 += frames
        x0 = levels[stage][:, :, n_hist:]
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma[:, stage].view(-1, 1, 1, 1, 1)
        clips.append((1 - s) * x0 + s * noise)
        sample.append([c.to(device=device, dtype=dtype) for c in clips])

    def rows(t: torch.Tensor) -> torch.Tensor:  # (B, ...) → (B·S, ...), stage index fastest
        return t.repeat_interleave(s_n, dim=0)

    return {
        "sample": sample,
        "encoder_hidden_states": rows(torch.stack([s.text for s in samples])).to(device=device, dtype=dtype),
        "encoder_attention_mask": rows(torch.stack([s.text_mask for s in samples])).to(device),
        "pooled_projections": rows(torch.stack([s.pooled for s in samples])).to(device=device, dtype=dtype),
        "timestep_ratio": (sigma.reshape(-1) * 1000).to(device=device, dtype=dtype),
    }
