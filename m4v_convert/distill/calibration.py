"""Calibration batches for distillation: noised latents at random flow-matching timesteps + text.

Sources:

* **synthetic** (no ``--calib``): clean latents ~ N(0, 1) and random text embeddings with a random
  number of valid tokens (the rest zero padding, as diffusers pipelines pad). They carry no
  video content; a conversion distilled on them is labelled ``calibration: synthetic``.
* **folder** (``--calib DIR``): every ``*.safetensors`` file in DIR holds one or more samples:

  - ``latents``: (C, F, H, W) or (n, C, F, H, W) clean VAE latents (float);
  - ``text_embeds``: (Lz, text_dim) or (n, Lz, text_dim) text-encoder outputs, padding rows zero;
  - optional ``text_mask``: (Lz,) or (n, Lz) bool/int, 1 = valid (padding rows are zeroed).

* **teacher** (``--teacher-calib`` / ``--calib-cache DIR``): clean latents sampled by the teacher
  itself from noise (see ``teacher_samples.py``), cached in the folder format above.

The fine-tune data of stage 3 (``--data DIR``) uses the same folder format.

Noising follows rectified flow: ``x_t = (1 − σ)·x_0 + σ·ε`` with ``timestep = 1000·σ``; σ is drawn
uniformly and then shifted (``σ' = s·σ / (1 + (s − 1)·σ)``) as the backbone's scheduler does
(diffusers ``FlowMatchEulerDiscreteScheduler`` with ``shift``: the same σ grid, the same x_t).
The velocity that moves x_t along σ is ``dx_t/dσ = ε − x_0``; Wan predicts it (its scheduler
steps ``x ← x + (σ_next − σ)·v``), so the flow-matching target is ``noise − x0`` (as in
diffusers' flow-matching training scripts: ``target = noise - model_input``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from m4v_convert.errors import M4VError


@dataclass
class CalibSpec:
    in_channels: int
    text_dim: int
    latent_frames: int
    latent_height: int
    latent_width: int
    text_len: int
    flow_shift: float = 1.0


@dataclass
class CleanSample:
    latents: torch.Tensor  # (C, F, H, W)
    text: torch.Tensor  # (Lz, text_dim), padding rows zero


def synthetic_samples(spec: CalibSpec, n: int, seed: int) -> list[CleanSample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lat = torch.randn(spec.in_channels, spec.latent_frames, spec.latent_height, spec.latent_width, generator=g)
        text = torch.randn(spec.text_len, spec.text_dim, generator=g)
        valid = int(torch.randint(1, spec.text_len + 1, (1,), generator=g))
        text[valid:] = 0
        out.append(CleanSample(lat, text))
    return out


FLOAT_TENSORS = ("latents", "text_embeds", "pooled")  # text_mask may be integer


def read_tensor_files(folder: Path, required: tuple[str, ...], flag: str = "--calib"):
    """(file, tensors) for every ``*.safetensors`` file in ``folder``, each holding ``required``;
    one clear error for a missing folder, no files, an unreadable file or a missing tensor."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise M4VError(f"{flag} {folder}: not a folder")
    files = sorted(folder.glob("*.safetensors"))
    names = ", ".join(repr(k) for k in required)
    if not files:
        raise M4VError(f"{flag} {folder}: no *.safetensors files (expected {names} tensors)")
    for f in files:
        try:
            t = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise M4VError(f"{flag} {f}: cannot read safetensors ({e})") from None
        missing = [k for k in required if k not in t]
        if missing:
            raise M4VError(f"{flag} {f}: missing tensor {missing[0]!r} (has {sorted(t)}; needs {names})")
        integer = [k for k in required if k in FLOAT_TENSORS and not t[k].is_floating_point()]
        if integer:  # they would be cast to float without a word (a mis-saved VAE output, token ids)
            raise M4VError(f"{flag} {f}: {integer[0]!r} holds {t[integer[0]].dtype} values; latents and text "
                           "embeddings are floating point")
        yield f, t


def folder_samples(folder: Path, spec: CalibSpec, flag: str = "--calib") -> list[CleanSample]:
    """Every sample of every ``*.safetensors`` file in ``folder`` (format in the module docstring);
    ``flag`` names the option in error messages."""
    out = []
    for f, t in read_tensor_files(folder, ("latents", "text_embeds"), flag):
        lat, txt = t["latents"].float(), t["text_embeds"].float()
        if lat.dim() == 4:
            lat = lat.unsqueeze(0)
        if txt.dim() == 2:
            txt = txt.unsqueeze(0)
        mask = t.get("text_mask")
        if mask is not None and mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if lat.dim() != 5 or lat.shape[1] != spec.in_channels:
            raise M4VError(f"{flag} {f}: latents must be (C={spec.in_channels}, F, H, W) or (n, C, F, H, W), "
                           f"got {tuple(t['latents'].shape)}")
        if txt.dim() != 3 or txt.shape[-1] != spec.text_dim or txt.shape[0] != lat.shape[0]:
            raise M4VError(f"{flag} {f}: text_embeds must be (Lz, {spec.text_dim}) or (n={lat.shape[0]}, Lz, "
                           f"{spec.text_dim}), got {tuple(t['text_embeds'].shape)}")
        if mask is not None:
            if tuple(mask.shape) != tuple(txt.shape[:2]):
                raise M4VError(f"{flag} {f}: text_mask must have shape {tuple(txt.shape[:2])}, got {tuple(mask.shape)}")
            txt = txt * mask.bool().unsqueeze(-1)
        out.extend(CleanSample(lat[i], txt[i]) for i in range(lat.shape[0]))
    return out


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def check_uniform(samples: list[CleanSample], flag: str, patch_size=(1, 1, 1)) -> tuple[int, ...]:
    """All latents one shape (they are batched together), divisible by the patch size."""
    shapes = sorted({tuple(s.latents.shape) for s in samples})
    if len(shapes) > 1:
        raise M4VError(f"{flag}: latents of different shapes {shapes[:4]}; every sample of a run must have one "
                       "(C, F, H, W) shape")
    shape = shapes[0]
    for name, size, p in zip("FHW", shape[1:], patch_size):
        if size % p:
            raise M4VError(f"{flag}: latent {name} = {size} is not a multiple of the model's patch size {p} "
                           f"(latents {shape})")
    for i, s in enumerate(samples):
        if not (torch.isfinite(s.latents).all() and torch.isfinite(s.text).all()):
            raise M4VError(f"{flag}: sample {i} has NaN or inf values")
    return shape


def noised_batch(samples: list[CleanSample], spec: CalibSpec, generator: torch.Generator,
                 device="cpu", dtype=torch.float32, with_target: bool = False):
    """Stack ``samples`` into a forward batch for a video DiT (diffusers argument names).

    with_target: also return the flow-matching velocity target ``noise − x0`` (b, C, F, H, W), float32.
    """
    lat = torch.stack([s.latents for s in samples])
    lz = max(s.text.shape[0] for s in samples)
    text = torch.zeros(len(samples), lz, samples[0].text.shape[-1])
    for i, s in enumerate(samples):
        text[i, : s.text.shape[0]] = s.text
    sigma = shift_sigma(torch.rand(len(samples), generator=generator), spec.flow_shift)
    noise = torch.randn(lat.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * lat + s * noise
    batch = {
        "hidden_states": x_t.to(device=device, dtype=dtype),
        "timestep": (sigma * 1000).to(device=device, dtype=dtype),
        "encoder_hidden_states": text.to(device=device, dtype=dtype),
    }
    if with_target:
        return batch, (noise - lat).to(device=device)
    return batch
