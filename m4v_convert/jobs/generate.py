"""``m4v-convert generate``: a video from a converted pipeline folder, with diffusers.

The converted pipeline (``convert`` with a pipeline folder as ``--checkpoint``) is loaded with
``load_pipeline`` (each component with its diffusers/transformers class, the converted transformer
with ``load_converted``: no remote code runs), sampled with the pipeline's own scheduler, and written
with diffusers' ``export_to_video`` (imageio + ffmpeg), atomically. Each denoising step is timed
(a step callback). ``--compare TEACHER`` runs the original pipeline with the same seed and settings
and writes the two side by side, with the measured speed ratio.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from m4v_convert.errors import M4VError

VIDEO_SUFFIXES = (".mp4", ".gif")


@dataclass
class GenerateOptions:
    model: Path
    prompt: str
    output: Path
    negative_prompt: str | None = None
    size: tuple[int, int] | None = None  # (height, width); None: the pipeline's default
    frames: int | None = None
    steps: int = 50
    guidance_scale: float = 5.0
    seed: int = 0
    fps: int = 16
    compare: Path | None = None
    overwrite: bool = False
    device: str = "auto"


def check_options(o: GenerateOptions) -> None:
    """Everything that can be refused before a weight is read."""
    from m4v_convert.io.pipeline import MODEL_INDEX, check_video_shape, read_model_index

    for flag, folder in (("MODEL", o.model), ("--compare", o.compare)):
        if folder is None:
            continue
        if not (Path(folder) / MODEL_INDEX).is_file():
            raise M4VError(f"{flag} {folder}: not a diffusers pipeline folder (no {MODEL_INDEX}); convert a pipeline "
                           "folder (m4v-convert convert ... --checkpoint PIPELINE) to get one")
    entry = read_model_index(o.model).get("transformer")
    if not (isinstance(entry, list) and entry[0] == "m4v_transformer"):
        raise M4VError(f"MODEL {o.model}: its transformer is not a converted one (model_index.json names {entry}); "
                       "pass the original with --compare")
    if not o.prompt.strip():
        raise M4VError("--prompt: empty")
    if o.steps < 1:
        raise M4VError(f"--steps {o.steps}: must be at least 1")
    check_video_shape(o.frames, o.size, "--frames", "--size")
    out = Path(o.output)
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise M4VError(f"--output {out}: write a {' or '.join(VIDEO_SUFFIXES)} file")
    if not out.resolve().parent.is_dir():
        raise M4VError(f"--output {out}: folder {out.resolve().parent} does not exist")
    for folder in (o.model, o.compare):
        if folder is not None and out.resolve().is_relative_to(Path(folder).resolve()):
            raise M4VError(f"--output {out}: inside the input {folder}; write it elsewhere")
    targets = [out] + ([compare_path(out)] if o.compare is not None else [])
    existing = [str(t) for t in targets if t.exists()]
    if existing and not o.overwrite:
        raise M4VError(f"--output: {', '.join(existing)} exists; pass --overwrite to replace it")


def compare_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}-compare{out.suffix}")


def run_generate(o: GenerateOptions, console) -> dict:
    """Generate (and compare); returns seconds per step and the file(s) written."""
    from m4v_convert.io.pipeline import load_pipeline
    from m4v_convert.jobs.plan import resolve_device

    check_options(o)
    from diffusers import DiffusionPipeline

    device = resolve_device(o.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(o.model).to(device)
    converted, per_step = _sample(pipe, o, console, "converted")
    result = {"output": str(o.output), "seconds_per_step": per_step}
    _write(converted, Path(o.output), o.fps)
    console.print(f"wrote {o.output}  ({len(converted)} frames, {per_step:.3f} s per denoising step)")
    if o.compare is not None:
        del pipe
        teacher_pipe = DiffusionPipeline.from_pretrained(o.compare, local_files_only=True).to(device)
        original, teacher_step = _sample(teacher_pipe, o, console, "original")
        side = [torch.cat([a, b], dim=-1) for a, b in zip(original, converted)]  # original | converted
        _write(side, compare_path(Path(o.output)), o.fps)
        ratio = teacher_step / per_step
        console.print(f"wrote {compare_path(Path(o.output))}  (left: original, right: converted); original "
                      f"{teacher_step:.3f} s per step, converted {per_step:.3f} s: {ratio:.2f}x")
        result.update(compare=str(compare_path(Path(o.output))), original_seconds_per_step=teacher_step,
                      speedup=ratio)
    return result


def _sample(pipe, o: GenerateOptions, console, label: str) -> tuple[list[torch.Tensor], float]:
    """Frames (each (3, H, W) in [0, 1]) and the mean seconds per denoising step (after the first)."""
    stamps: list[float] = []

    def on_step(pipeline, step, timestep, kwargs):
        stamps.append(time.perf_counter())
        console.print(f"  {label}: step {step + 1}/{o.steps}", highlight=False)
        return kwargs

    kwargs = {} if o.size is None else {"height": o.size[0], "width": o.size[1]}
    if o.frames is not None:
        kwargs["num_frames"] = o.frames
    start = time.perf_counter()
    out = pipe(prompt=o.prompt, negative_prompt=o.negative_prompt, num_inference_steps=o.steps,
               guidance_scale=o.guidance_scale, generator=torch.Generator().manual_seed(o.seed), output_type="pt",
               callback_on_step_end=on_step, **kwargs)
    times = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    per_step = sum(times[1:]) / len(times[1:]) if len(times) > 1 else times[0]  # the first step warms up
    frames = out.frames[0]  # (F, 3, H, W) in [0, 1]
    if not torch.isfinite(frames).all():
        raise M4VError(f"{label} pipeline: the frames hold NaN or inf; nothing was written")
    return list(frames.float().cpu()), per_step


def _write(frames: list[torch.Tensor], path: Path, fps: int) -> None:
    """``export_to_video`` into a temporary sibling, then renamed over ``path``."""
    from diffusers.utils import export_to_video

    arrays = [f.permute(1, 2, 0).clamp(0, 1).numpy() for f in frames]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.resolve().parent)
    os.close(fd)
    try:
        if path.suffix.lower() == ".gif":
            from PIL import Image

            images = [Image.fromarray((a * 255).round().astype("uint8")) for a in arrays]
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        else:
            export_to_video(arrays, tmp, fps=fps, macro_block_size=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
