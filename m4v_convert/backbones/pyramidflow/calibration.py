"""Pyramid-shaped calibration batches for distilling a converted PyramidFlow model.

One batch is one model call holding all pyramid stages (levels 0 … S−1, low → high), as the
release's training packs them, so every stage's register is exercised. Per sample and stage:

* the history frames (all but the last latent frame) laid out by the release's inference rule
  (:func:`.layout.history_clips`: the newest at the stage's level, older ones a level lower
  each, the oldest together at level 0), each at its level's resolution (bilinear downsampling
  of the top-level latents, as ``get_pyramid_latent`` does);
* the noisy clip: the last frame at the stage's resolution, noised by rectified flow
  ``x_t = (1 − σ)·x_0 + σ·ε`` at a random σ (shifted by ``flow_shift``), ``timestep_ratio = 1000·σ``.

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
        shapes.add(tuple(lat.shape[1:]))
    if len(shapes) > 1:
        raise M4VError(f"{flag} {folder}: latents of different shapes {sorted(shapes)[:4]}; every sample of a run "
                       "must have one (C, F, H, W) shape (they are batched together)")
    if len({s.text.shape[0] for s in out}) > 1:
        raise M4VError(f"{flag} {folder}: text_embeds of different lengths; pad every sample to one Lz")
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
