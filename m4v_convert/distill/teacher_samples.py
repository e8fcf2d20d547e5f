"""Teacher-generated calibration: clean latents sampled by the teacher itself, cached on disk.

Without real latents, the teacher's own samples are the next best calibration data: they lie on
the distribution the student must reproduce. Each sample starts from Gaussian noise and takes a
few Euler steps of diffusers' ``FlowMatchEulerDiscreteScheduler`` (shift = the recipe's
``calib.flow_shift``) conditioned on a text embedding, without classifier-free guidance.

The result is written in the calibration folder format (``calibration.py``: ``latents`` +
``text_embeds`` safetensors) plus ``manifest.json`` recording what made it (teacher fingerprint,
steps, seed, sizes, text source). A later run with the same settings reuses it; one with other
settings refuses the folder instead of silently mixing samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from m4v_convert.distill.calibration import CalibSpec, CleanSample, folder_samples
from m4v_convert.errors import M4VError

MANIFEST = "manifest.json"
SAMPLES_FILE = "teacher_samples.safetensors"


def teacher_fingerprint(teacher: torch.nn.Module, source: str) -> dict:
    """Identifies the teacher cheaply: its config, where it came from, and a hash of a few tensors."""
    h = hashlib.sha256()
    params = list(teacher.state_dict().items())
    for name, t in params[:2] + params[-2:]:
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    config = {k: v for k, v in dict(getattr(teacher, "config", {})).items() if not k.startswith("_")}
    return {"source": source, "config": json.loads(json.dumps(config, default=str)), "weights_sha256": h.hexdigest()}


def texts_digest(texts: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.float().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def sample_with_teacher(teacher: torch.nn.Module, texts: list[torch.Tensor], spec: CalibSpec, steps: int, seed: int,
                        batch_size: int = 1, device="cpu", dtype=torch.float32,
                        progress: Callable[[int, int], None] | None = None) -> list[CleanSample]:
    """One clean latent per text embedding: noise → ``steps`` Euler flow-matching steps of ``teacher``.

    texts: (Lz, text_dim) each, zero rows = padding. The teacher is called with diffusers'
    argument names (``hidden_states``, ``timestep`` = 1000·σ, ``encoder_hidden_states``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps < 1:
        raise M4VError(f"teacher-generated calibration: calib.teacher_steps must be >= 1, got {steps}")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.flow_shift)
    gen = torch.Generator().manual_seed(seed)
    out: list[CleanSample] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start: start + batch_size]
        lz = max(t.shape[0] for t in chunk)
        text = torch.zeros(len(chunk), lz, chunk[0].shape[-1])
        for i, t in enumerate(chunk):
            text[i, : t.shape[0]] = t
        latents = torch.randn(len(chunk), spec.in_channels, spec.latent_frames, spec.latent_height,
                              spec.latent_width, generator=gen)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            v = teacher(hidden_states=latents.to(device=device, dtype=dtype),
                        timestep=t.expand(len(chunk)).to(device=device, dtype=dtype),
                        encoder_hidden_states=text.to(device=device, dtype=dtype), return_dict=False)[0]
            latents = scheduler.step(v.float().cpu(), t, latents).prev_sample
        if not torch.isfinite(latents).all():
            raise M4VError("teacher-generated calibration: the teacher produced NaN/inf latents; check the "
                           "checkpoint and --dtype")
        out.extend(CleanSample(latents[i].clone(), chunk[i].clone()) for i in range(len(chunk)))
        if progress is not None:
            progress(len(out), len(texts))
    return out


def clean_sample_tensors(samples: list[CleanSample]) -> dict[str, torch.Tensor]:
    """``CleanSample`` list → the calibration folder's tensors (text rows zero-padded to one length)."""
    lz = max(s.text.shape[0] for s in samples)
    text = torch.zeros(len(samples), lz, samples[0].text.shape[-1])
    for i, s in enumerate(samples):
        text[i, : s.text.shape[0]] = s.text
    return {"latents": torch.stack([s.latents for s in samples]), "text_embeds": text}


def cached_teacher_samples(cache: Path, key: dict, spec, make: Callable[[], list], dist=None,
                           flag: str = "--calib-cache", to_tensors: Callable[[list], dict] | None = None,
                           load: Callable[[Path], list] | None = None) -> tuple[list, bool]:
    """Samples from ``cache`` if it was made with ``key``; else ``make()`` them (rank 0), write them
    atomically to ``cache`` and return them. Returns (samples, reused).

    ``to_tensors`` (samples → tensors of the calibration format) and ``load`` (folder → samples)
    default to Wan's ``CleanSample`` format; a backbone with another format passes its own."""
    to_tensors = to_tensors or clean_sample_tensors
    load = load or (lambda folder: folder_samples(folder, spec, flag=flag))
    cache = Path(cache).expanduser().resolve()
    manifest = cache / MANIFEST
    is_main = dist is None or dist.is_main
    exists = manifest.is_file()
    if dist is not None:
        dist.barrier()  # every process has looked before rank 0 may write
    if exists:
        try:
            saved = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            raise M4VError(f"{flag} {cache}: {MANIFEST} is not valid JSON; delete the folder to regenerate") from None
        if saved.get("key") != key:
            diff = sorted(k for k in set(key) | set(saved.get("key", {})) if saved.get("key", {}).get(k) != key.get(k))
            raise M4VError(f"{flag} {cache}: holds teacher samples made with other settings (differs in: "
                           f"{', '.join(diff)}); pass another folder or delete this one to regenerate")
        return load(cache), True
    if cache.exists() and any(cache.iterdir()):
        raise M4VError(f"{flag} {cache}: folder exists and is not a teacher-sample cache (no {MANIFEST}); "
                       "refusing to write into it")
    if is_main:
        samples = make()
        from safetensors.torch import save_file

        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
        try:
            save_file({k: v.contiguous() for k, v in to_tensors(samples).items()}, str(tmp / SAMPLES_FILE),
                      metadata={"format": "pt"})
            (tmp / MANIFEST).write_text(json.dumps({"key": key, "num_samples": len(samples),
                                                    "spec": dataclasses.asdict(spec)}, indent=2))
            if cache.exists():
                cache.rmdir()  # empty (checked above)
            os.replace(tmp, cache)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if dist is not None:
        dist.barrier()
    return load(cache), False
