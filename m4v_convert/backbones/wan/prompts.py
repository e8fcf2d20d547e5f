"""Calibration from real prompts (``--prompts FILE`` with a Wan2.1 pipeline folder as ``--checkpoint``).

Each prompt is encoded by the pipeline's own tokenizer and UMT5 text encoder (``WanPipeline.encode_prompt``:
its max length, zero rows past the mask) and sampled by the teacher through the pipeline itself
(``WanPipeline(..., output_type="latent")``: its scheduler, classifier-free guidance with the negative
prompt), so the calibration latents are the teacher's own videos of real prompts (the practice of
TurboDiffusion / FastVideo: teacher-generated data distils better than real video).

Samples are cached one file per sample as they finish, in the ``--calib`` format under a manifest of
everything they depend on (:mod:`m4v_convert.distill.sample_cache`): a killed run keeps its samples and
the next run makes only the missing ones; a cache made with other settings is refused.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
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
    check_pipeline_source(flags, pipeline, "--prompts", ("text_encoder", "tokenizer"))
    if flags.guidance_scale is not None and not flags.guidance_scale >= 0:
        raise M4VError(f"--guidance-scale {flags.guidance_scale}: expected a number >= 0")
    return read_prompts(flags.prompts)


def check_pipeline_source(flags, pipeline: Path | None, flag: str, needs: tuple[str, ...]) -> None:
    """What calibration made through the input pipeline (``--prompts``, ``--videos``) needs: no other
    calibration source, one process, a pipeline folder with the components ``needs``, a video shape
    the VAE takes."""
    from m4v_convert.io.pipeline import check_video_shape, read_model_index

    other = [f for f, given in (("--calib", flags.calib is not None), ("--teacher-calib", flags.teacher_calib),
                                ("--prompts", flags.prompts is not None and flag != "--prompts")) if given]
    if other:
        raise M4VError(f"{flag}: the calibration comes from {flag}; drop {' / '.join(other)}")
    if flags.num_processes > 1:  # every process would make the same samples into the same cache
        raise M4VError(f"{flag} with --num-processes: not offered yet (every process would make the same samples); "
                       "convert with one process, or make the cache first and pass it as --calib")
    if pipeline is None:
        raise M4VError(f"{flag} needs a diffusers pipeline folder as --checkpoint (model_index.json, "
                       f"{', '.join(c + '/' for c in needs)}); {flags.checkpoint} is a transformer alone")
    index = read_model_index(pipeline)
    missing = [c for c in needs if not (isinstance(index.get(c), list) and index[c][0])]
    if missing:
        raise M4VError(f"{flag}: {pipeline} has no {' / '.join(missing)} (needed to encode the "
                       f"{'videos and their captions' if flag == '--videos' else 'prompts'})")
    check_video_shape(flags.calib_frames, flags.calib_size, "--calib-frames", "--calib-size")


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
    from m4v_convert.distill.sample_cache import SampleCache, sample_progress
    from m4v_convert.distill.teacher_samples import teacher_fingerprint

    key = {"prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), "size": list(size),
           "frames": frames, "steps": steps, "guidance_scale": guidance, "seed": seed,
           "max_sequence_length": MAX_SEQUENCE_LENGTH, "default_negative": DEFAULT_NEGATIVE,
           "teacher": teacher_fingerprint(teacher, str(Path(pipeline).resolve())), "dtype": str(dtype)}
    cache = SampleCache(cache, key, len(prompts), "prompt samples")
    todo = cache.missing()
    if todo:
        pipe = open_pipeline(pipeline, "--prompts", device, dtype, transformer=teacher, vae=None)  # latents out
        con.print(f"calibration: sampling {len(todo)} of {len(prompts)} prompts with the teacher ({steps} steps, "
                  f"guidance {guidance}, {frames} frames at {size[0]}x{size[1]}; cached in {cache.folder})")
        with sample_progress(con, "teacher samples", len(todo)) as advance:
            for i in todo:
                prompt, negative = prompts[i]
                embeds, negative_embeds = pipe.encode_prompt(
                    prompt, negative if negative is not None else DEFAULT_NEGATIVE,
                    do_classifier_free_guidance=guidance > 1.0, max_sequence_length=MAX_SEQUENCE_LENGTH,
                    device=device)
                latents = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, height=size[0],
                               width=size[1], num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                               generator=torch.Generator().manual_seed(seed + i), output_type="latent").frames
                cache.save(i, latents[0], embeds[0])
                advance()
        del pipe  # the text encoder is not needed for distillation
        gc.collect()
    else:
        con.print(f"calibration: {len(prompts)} prompt samples reused from {cache.folder}")
    return cache.load()


def open_pipeline(root: Path, flag: str, device, dtype, **components):
    """The input pipeline (``components`` replace or drop its own, e.g. ``vae=None``) on ``device``: the
    text encoder in the run's ``dtype`` (UMT5-XXL is 23 GB in float32, 11 GB in bfloat16), the VAE in
    float32 as diffusers' Wan examples keep it."""
    from diffusers import WanPipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        pipe = WanPipeline.from_pretrained(root, local_files_only=True, **components,
                                           dtype={"text_encoder": dtype, "default": torch.float32})
    except (OSError, ValueError, TypeError) as e:
        raise M4VError(f"{flag}: cannot load the components of {root} ({e})") from None
    pipe.set_progress_bar_config(disable=True)  # one progress bar over the samples instead
    return pipe.to(device)  # a passed teacher stays as loaded; the pipeline casts the embeddings to its dtype
