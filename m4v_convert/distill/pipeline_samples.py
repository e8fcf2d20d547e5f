"""Calibration from real prompts through the input's own diffusers pipeline (``--prompts FILE``).

Each prompt is encoded by the pipeline's own tokenizer and text encoder (its ``encode_prompt``: max
length, padding as the pipeline does) and sampled by the teacher through the pipeline itself
(``Pipeline(..., output_type="latent")``: its scheduler, classifier-free guidance with the negative
prompt), so the calibration latents are the teacher's own videos of real prompts (the practice of
TurboDiffusion / FastVideo: teacher-generated data distils better than real video).

What differs between backbones is one :class:`PromptPipeline`: Wan's in ``backbones/wan/prompts.py``,
a generic recipe's from its ``pipeline:`` section. Samples are cached one file per sample as they
finish, in the ``--calib`` format under a manifest of everything they depend on
(:mod:`m4v_convert.distill.sample_cache`): a killed run keeps its samples and the next run makes only
the missing ones; a cache made with other settings is refused.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from m4v_convert.errors import M4VError

# what "encodes a prompt the way WanPipeline does" means, checked on the pipeline class
ENCODE_ARGS = ("prompt", "negative_prompt", "do_classifier_free_guidance", "max_sequence_length", "device")
CALL_ARGS = ("prompt_embeds", "negative_prompt_embeds", "height", "width", "num_frames", "num_inference_steps",
             "guidance_scale", "generator", "output_type")


@dataclass(frozen=True)
class PromptPipeline:
    """How a diffusers pipeline encodes a prompt and samples its transformer."""

    class_name: str  # e.g. WanPipeline; the --checkpoint folder's model_index.json must name it
    max_sequence_length: int  # encode_prompt's (the text length of every sample)
    guidance_scale: float  # --guidance-scale's default
    negative_prompt: str  # for prompts that bring none
    latent_layout: str = "BCFHW"  # the pipeline's latents out: BCFHW (Wan) or BFCHW (CogVideoX)
    temporal_compression: int = 4  # the VAE's: frames = 4k + 1
    spatial_compression: int = 8  # the VAE's
    side_multiple: int = 16  # height and width: the VAE's spatial compression x the transformer's patch


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


def check_prompt_flags(flags, pipeline: Path | None, spec: PromptPipeline) -> list[tuple[str, str | None]]:
    """The ``--prompts`` options checked before any weight is read; returns the prompts."""
    check_pipeline_source(flags, pipeline, "--prompts", ("text_encoder", "tokenizer"), spec)
    check_pipeline_class(pipeline, spec)
    if flags.guidance_scale is not None and not flags.guidance_scale >= 0:
        raise M4VError(f"--guidance-scale {flags.guidance_scale}: expected a number >= 0")
    return read_prompts(flags.prompts)


def check_pipeline_source(flags, pipeline: Path | None, flag: str, needs: tuple[str, ...],
                          spec: PromptPipeline) -> None:
    """What calibration made through the input pipeline (``--prompts``, ``--videos``) needs: no other
    calibration source, one process, a pipeline folder with the components ``needs``, a video shape
    its VAE and transformer take."""
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
    check_video_shape(flags.calib_frames, flags.calib_size, "--calib-frames", "--calib-size",
                      temporal=spec.temporal_compression, side=spec.side_multiple)
    if flags.calib_cache is not None:  # the samples are written there: never into an input
        from m4v_convert.io.output import check_apart

        check_apart(flags.calib_cache, "--calib-cache", {"--checkpoint": flags.checkpoint, "--prompts": flags.prompts,
                                                         "--videos": getattr(flags, "videos", None)},
                    "writing samples there would change that input: choose a cache folder apart from every input")


def check_sample_count(n: int, recipe, what: str, unit: str) -> None:
    """Enough samples for the calibration's held-out batches and one training batch."""
    c = recipe.calib
    need = int(c.get("batch_size", 1)) * (int(c.get("eval_batches", 1)) + 1)
    if n < need:
        raise M4VError(f"{what}: {n} {unit}, the calibration needs at least {need} (batch_size "
                       f"{c.get('batch_size', 1)} x ({c.get('eval_batches', 1)} held-out + 1 training) batches)")


def default_sample_shape(flags, recipe) -> tuple[tuple[int, int], int]:
    """((height, width), frames) of the --prompts / --videos samples: the flags, else the recipe's
    calibration latents in pixels (its video section's compression; Wan: 8x, 4x)."""
    c, v = recipe.calib, recipe.video or {}
    spatial, temporal = int(v.get("spatial_compression", 8)), int(v.get("temporal_compression", 4))
    size = flags.calib_size or (int(c["latent_height"]) * spatial, int(c["latent_width"]) * spatial)
    return size, flags.calib_frames or (int(c["latent_frames"]) - 1) * temporal + 1


def check_pipeline_class(pipeline: Path, spec: PromptPipeline) -> None:
    """The folder's pipeline is ``spec.class_name``, whose ``encode_prompt`` and ``__call__`` take what
    :func:`prompt_samples` passes them (checked on the class: nothing is loaded)."""
    import diffusers

    from m4v_convert.io.pipeline import read_model_index

    named = read_model_index(pipeline).get("_class_name")
    if named != spec.class_name:
        raise M4VError(f"--prompts: {pipeline} is a {named} folder; these prompts are sampled with "
                       f"{spec.class_name} (text-to-video), which it is not")
    cls = getattr(diffusers, spec.class_name, None)
    if not isinstance(cls, type) or not hasattr(cls, "encode_prompt"):
        raise M4VError(f"--prompts: diffusers {diffusers.__version__} has no pipeline {spec.class_name} with "
                       "an encode_prompt")
    for method, names in (("encode_prompt", ENCODE_ARGS), ("__call__", CALL_ARGS)):
        missing = [n for n in names if n not in inspect.signature(getattr(cls, method)).parameters]
        if missing:
            raise M4VError(f"--prompts: {spec.class_name}.{method} does not take {', '.join(missing)}; prompts are "
                           "encoded and sampled the way WanPipeline does it")


def stand_in_samples(count: int, in_channels: int, text_dim: int, spec: PromptPipeline, *, size: tuple[int, int],
                     frames: int) -> list:
    """Zero samples of the shapes :func:`prompt_samples` makes (the memory plan's teacher is on the
    meta device and samples nothing)."""
    from m4v_convert.distill.calibration import CleanSample

    sc = spec.spatial_compression
    latents = torch.zeros(in_channels, (frames - 1) // spec.temporal_compression + 1, size[0] // sc, size[1] // sc)
    return [CleanSample(latents, torch.zeros(spec.max_sequence_length, text_dim)) for _ in range(count)]


def prompt_samples(spec: PromptPipeline, pipeline: Path, teacher, prompts: list[tuple[str, str | None]], *,
                   size: tuple[int, int], frames: int, steps: int, guidance: float, seed: int, cache: Path, con,
                   device, dtype) -> list:
    """The calibration samples of ``prompts`` (``CleanSample``: the teacher's latents as (C, F, H, W), the
    prompt's embeddings), made by the pipeline and cached per sample in ``cache`` (module docstring)."""
    from m4v_convert.distill.sample_cache import SampleCache, sample_progress
    from m4v_convert.distill.teacher_samples import teacher_fingerprint

    key = {"prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), "size": list(size),
           "frames": frames, "steps": steps, "guidance_scale": guidance, "seed": seed,
           "max_sequence_length": spec.max_sequence_length, "default_negative": spec.negative_prompt,
           "pipeline": spec.class_name,
           "teacher": teacher_fingerprint(teacher, str(Path(pipeline).resolve())), "dtype": str(dtype)}
    cache = SampleCache(cache, key, len(prompts), "prompt samples")
    todo = cache.missing()
    if todo:
        # with its VAE: the pipeline reads its latent size off the VAE's config (without one, WanPipeline
        # assumes 8x, and Wan2.2's VAE compresses 16x)
        pipe = open_pipeline(spec.class_name, pipeline, "--prompts", device, dtype, transformer=teacher)
        con.print(f"calibration: sampling {len(todo)} of {len(prompts)} prompts with the teacher ({steps} steps, "
                  f"guidance {guidance}, {frames} frames at {size[0]}x{size[1]}; cached in {cache.folder})")
        with sample_progress(con, "teacher samples", len(todo)) as advance:
            for i in todo:
                prompt, negative = prompts[i]
                encoded = pipe.encode_prompt(prompt, negative if negative is not None else spec.negative_prompt,
                                             do_classifier_free_guidance=guidance > 1.0, device=device,
                                             max_sequence_length=spec.max_sequence_length)
                if not (isinstance(encoded, tuple) and len(encoded) == 2):
                    raise M4VError(f"--prompts: {spec.class_name}.encode_prompt returned {len(encoded)} values; "
                                   "prompts are encoded the way WanPipeline does it (embeddings, negative embeddings)")
                embeds, negative_embeds = encoded
                latents = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, height=size[0],
                               width=size[1], num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                               generator=torch.Generator().manual_seed(seed + i), output_type="latent").frames[0]
                latents = latents.transpose(0, 1) if spec.latent_layout == "BFCHW" else latents  # (C, F, H, W)
                want = (size[0] // spec.spatial_compression, size[1] // spec.spatial_compression)
                if tuple(latents.shape[-2:]) != want:
                    raise M4VError(f"--prompts: {spec.class_name} made latents of {tuple(latents.shape[-2:])} for "
                                   f"{size[0]}x{size[1]}, not {want}: its VAE does not compress "
                                   f"{spec.spatial_compression}x as the recipe's video section says")
                cache.save(i, latents, embeds[0])
                advance()
        del pipe  # the text encoder is not needed for distillation
        gc.collect()
    else:
        con.print(f"calibration: {len(prompts)} prompt samples reused from {cache.folder}")
    return cache.load()


def open_pipeline(class_name: str, root: Path, flag: str, device, dtype, **components):
    """The input pipeline (``components`` replace or drop its own, e.g. ``vae=None``) on ``device``: the
    text encoder in the run's ``dtype`` (Wan's UMT5-XXL is 23 GB in float32, 11 GB in bfloat16), the
    VAE in float32 as diffusers' examples keep it."""
    import diffusers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(
            root, local_files_only=True, dtype={"text_encoder": dtype, "default": torch.float32}, **components)
    except (OSError, ValueError, TypeError) as e:
        raise M4VError(f"{flag}: cannot load the components of {root} ({e})") from None
    pipe.set_progress_bar_config(disable=True)  # one progress bar over the samples instead
    return pipe.to(device)  # a passed teacher stays as loaded; the pipeline casts the embeddings to its dtype



def calibration_from_prompts(spec: PromptPipeline, pipeline: Path, prompts: list, teacher, opts, plan, *,
                             size: tuple[int, int], frames: int, in_channels: int, text_dim: int, con, device,
                             dtype) -> tuple[list, str]:
    """(samples, calibration label) of ``--prompts`` for a distillation adapter; zero stand-ins of the
    same shapes when the teacher is on the meta device (the memory plan)."""
    from m4v_convert.distill.job import teacher_calib_cache

    if next(teacher.parameters()).is_meta:
        return stand_in_samples(len(prompts), in_channels, text_dim, spec, size=size, frames=frames), "prompts"
    guidance = spec.guidance_scale if opts.guidance_scale is None else opts.guidance_scale
    samples = prompt_samples(spec, pipeline, teacher, prompts, size=size, frames=frames, steps=plan.teacher_steps,
                             guidance=guidance, seed=opts.seed, cache=teacher_calib_cache(opts, plan), con=con,
                             device=device, dtype=dtype)
    return samples, f"prompts:{Path(opts.prompts).resolve()}"
