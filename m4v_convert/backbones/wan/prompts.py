"""Calibration from real prompts (``--prompts FILE`` with a Wan2.1 pipeline folder as ``--checkpoint``).

Each prompt is encoded by the pipeline's own tokenizer and UMT5 text encoder (``WanPipeline.encode_prompt``:
its max length, zero rows past the mask) and sampled by the teacher through the pipeline itself
(``WanPipeline(..., output_type="latent")``: its scheduler, classifier-free guidance with the negative
prompt), so the calibration latents are the teacher's own videos of real prompts (the practice of
TurboDiffusion / FastVideo: teacher-generated data distils better than real video).

Samples are cached one file per sample as they finish (``sample-00000.safetensors``, the
``--calib`` format) under a manifest of everything they depend on; a killed run keeps its samples
and the next run makes only the missing ones; a cache made with other settings is refused.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from m4v_convert.errors import M4VError

#: the negative prompt of diffusers' WanPipeline example, used when a prompt brings none
DEFAULT_NEGATIVE = ("Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
                    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
                    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
                    "fused fingers, still picture, messy background, three legs, many people in the background, "
                    "walking backwards")
MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s
MANIFEST = "manifest.json"


def read_prompts(path: Path) -> list[tuple[str, str | None]]:
    """(prompt, negative prompt or None) of a ``.txt`` file (one prompt per line) or a ``.jsonl`` file
    (``{"prompt": ..., "negative_prompt": ...}`` per line); blank lines are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise M4VError(f"--prompts {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise M4VError(f"--prompts {path}: cannot read it as UTF-8 text ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise M4VError(f"--prompts {path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise M4VError(f"--prompts {path}:{n}: expected {{\"prompt\": TEXT, \"negative_prompt\": TEXT}}")
            neg = row.get("negative_prompt")
            if neg is not None and not isinstance(neg, str):
                raise M4VError(f"--prompts {path}:{n}: negative_prompt must be text")
            out.append((row["prompt"], neg))
        else:
            out.append((line.strip(), None))
    if not out:
        raise M4VError(f"--prompts {path}: no prompts in it")
    return out


def check_prompt_flags(flags, pipeline: Path | None) -> list[tuple[str, str | None]]:
    """The ``--prompts`` options checked before any weight is read; returns the prompts."""
    from m4v_convert.io.pipeline import check_video_shape, read_model_index

    if flags.calib is not None or flags.teacher_calib:
        raise M4VError("--prompts: the calibration comes from the prompts; drop --calib / --teacher-calib")
    if flags.num_processes > 1:  # every process would sample the same prompts
        raise M4VError("--prompts with --num-processes: not offered yet (every process would sample the same "
                       "prompts); convert with one process")
    if pipeline is None:
        raise M4VError(f"--prompts needs a diffusers pipeline folder as --checkpoint (model_index.json, text_encoder/, "
                       f"tokenizer/); {flags.checkpoint} is a transformer alone")
    index = read_model_index(pipeline)
    missing = [c for c in ("text_encoder", "tokenizer") if not (isinstance(index.get(c), list) and index[c][0])]
    if missing:
        raise M4VError(f"--prompts: {pipeline} has no {' / '.join(missing)} to encode the prompts with")
    check_video_shape(flags.calib_frames, flags.calib_size, "--calib-frames", "--calib-size")
    if flags.guidance_scale is not None and not flags.guidance_scale >= 0:
        raise M4VError(f"--guidance-scale {flags.guidance_scale}: expected a number >= 0")
    return read_prompts(flags.prompts)


def stand_in_samples(teacher, prompts: list, *, size: tuple[int, int], frames: int) -> list:
    """Zero samples of the shapes :func:`prompt_samples` makes (the memory plan's teacher is on the
    meta device and samples nothing)."""
    from m4v_convert.distill.calibration import CleanSample

    cfg = teacher.config
    latents = torch.zeros(cfg["in_channels"], (frames - 1) // 4 + 1, size[0] // 8, size[1] // 8)
    return [CleanSample(latents, torch.zeros(MAX_SEQUENCE_LENGTH, cfg["text_dim"])) for _ in prompts]


def prompt_samples(pipeline: Path, teacher, prompts: list[tuple[str, str | None]], *, size: tuple[int, int],
                   frames: int, steps: int, guidance: float, seed: int, cache: Path, con, device, dtype) -> list:
    """The calibration samples of ``prompts`` (``CleanSample``: the teacher's latents, the prompt's
    embeddings), made by the pipeline and cached per sample in ``cache`` (see the module docstring)."""
    from safetensors.torch import load_file, save_file

    from m4v_convert.distill.calibration import CleanSample
    from m4v_convert.distill.teacher_samples import teacher_fingerprint

    key = {"prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), "size": list(size),
           "frames": frames, "steps": steps, "guidance_scale": guidance, "seed": seed,
           "max_sequence_length": MAX_SEQUENCE_LENGTH, "default_negative": DEFAULT_NEGATIVE,
           "teacher": teacher_fingerprint(teacher, str(Path(pipeline).resolve())), "dtype": str(dtype)}
    cache = Path(cache).expanduser().resolve()
    manifest = cache / MANIFEST
    if manifest.is_file():
        try:
            saved = json.loads(manifest.read_text()).get("key")
        except json.JSONDecodeError:
            raise M4VError(f"--calib-cache {cache}: {MANIFEST} is not valid JSON; delete the folder to regenerate") from None
        if saved != key:
            diff = sorted(k for k in set(key) | set(saved or {}) if (saved or {}).get(k) != key.get(k))
            raise M4VError(f"--calib-cache {cache}: holds prompt samples made with other settings (differs in: "
                           f"{', '.join(diff)}); pass another folder or delete this one")
    elif cache.exists() and any(cache.iterdir()):
        raise M4VError(f"--calib-cache {cache}: folder exists and is not a prompt-sample cache (no {MANIFEST}); "
                       "refusing to write into it")
    else:
        cache.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"key": key, "num_samples": len(prompts)}, indent=2))

    files = [cache / f"sample-{i:05d}.safetensors" for i in range(len(prompts))]
    todo = [i for i, f in enumerate(files) if not f.is_file()]
    if todo:
        pipe = _pipeline(pipeline, teacher, device, dtype)
        con.print(f"calibration: sampling {len(todo)} of {len(prompts)} prompts with the teacher ({steps} steps, "
                  f"guidance {guidance}, {frames} frames at {size[0]}x{size[1]}; cached in {cache})")
        started = time.time()
        for done, i in enumerate(todo, 1):
            prompt, negative = prompts[i]
            embeds, negative_embeds = pipe.encode_prompt(
                prompt, negative if negative is not None else DEFAULT_NEGATIVE,
                do_classifier_free_guidance=guidance > 1.0, max_sequence_length=MAX_SEQUENCE_LENGTH, device=device)
            latents = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, height=size[0],
                           width=size[1], num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                           generator=torch.Generator().manual_seed(seed + i), output_type="latent").frames
            _save_atomic(save_file, {"latents": latents[0].float().cpu().contiguous(),
                                     "text_embeds": embeds[0].float().cpu().contiguous()}, files[i])
            left = (time.time() - started) / done * (len(todo) - done)
            con.print(f"  teacher sample {i + 1}/{len(prompts)} ({done}/{len(todo)} this run, ETA {left:.0f} s)",
                      highlight=False)
        del pipe  # the text encoder is not needed for distillation
        gc.collect()
    else:
        con.print(f"calibration: {len(prompts)} prompt samples reused from {cache}")
    samples = []
    for f in files:
        t = load_file(str(f))
        samples.append(CleanSample(t["latents"], t["text_embeds"]))
    return samples


def _pipeline(root: Path, teacher, device, dtype):
    """The input pipeline with the loaded teacher as its transformer and no VAE (latents out)."""
    from diffusers import WanPipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        pipe = WanPipeline.from_pretrained(root, transformer=teacher, vae=None, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise M4VError(f"--prompts: cannot load the text encoder and tokenizer of {root} ({e})") from None
    pipe.set_progress_bar_config(disable=True)  # one line per sample instead
    return pipe.to(device)  # the teacher stays as loaded; the pipeline casts the embeddings to its dtype


def _save_atomic(save_file, tensors: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
