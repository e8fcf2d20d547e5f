"""Calibration from real videos (``--videos DIR`` with a Wan2.1 pipeline folder as ``--checkpoint``).

``DIR`` holds video files, each with a same-named ``.txt`` caption (``clip.mp4`` + ``clip.txt``).
Each clip is read with imageio (its ffmpeg plugin; GIFs through Pillow), resampled to Wan's 16 fps
(every k-th frame of a faster video), its first ``--calib-frames`` frames resized and centre-cropped to
``--calib-size`` by the pipeline's own ``VideoProcessor`` (``resize_mode="crop"``), encoded by the
pipeline's ``AutoencoderKLWan`` (the latent distribution's mode, as ``WanVideoToVideoPipeline`` does)
and normalised with the VAE's ``latents_mean`` / ``latents_std``; the caption is encoded like a prompt
(``WanPipeline.encode_prompt``). The samples are cached one file per clip in the ``--calib`` format
(:mod:`m4v_convert.distill.sample_cache`), so a killed run continues and the folder can later be passed
as ``--calib`` or ``--data``.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

import torch

from m4v_convert.errors import M4VError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
WAN_FPS = 16  # the frame rate Wan2.1 was trained on and its pipeline's videos are written at


def read_video_folder(folder: Path) -> list[tuple[Path, str]]:
    """(video, caption) of every video file in ``folder``, sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise M4VError(f"--videos {folder}: not a folder")
    videos = sorted(f for f in folder.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES and f.is_file())
    if not videos:
        raise M4VError(f"--videos {folder}: no video files ({', '.join(VIDEO_SUFFIXES)}), each with a same-named "
                       ".txt caption")
    out = []
    for video in videos:
        caption = video.with_suffix(".txt")
        if not caption.is_file():
            raise M4VError(f"--videos {video}: no caption (expected {caption.name} beside it)")
        try:
            text = " ".join(caption.read_text(encoding="utf-8").split())
        except (OSError, UnicodeDecodeError) as e:
            raise M4VError(f"--videos {caption}: cannot read it as UTF-8 text ({e})") from None
        if not text:
            raise M4VError(f"--videos {caption}: the caption is empty")
        out.append((video, text))
    return out


def check_video_flags(flags, pipeline: Path | None) -> list[tuple[Path, str]]:
    """The ``--videos`` options checked before any weight is read; returns (video, caption) pairs."""
    from m4v_convert.backbones.wan.prompts import WAN_PIPELINE
    from m4v_convert.distill.pipeline_samples import check_pipeline_source

    check_pipeline_source(flags, pipeline, "--videos", ("vae", "text_encoder", "tokenizer"), WAN_PIPELINE)
    if flags.guidance_scale is not None or flags.teacher_steps is not None:
        raise M4VError("--guidance-scale / --teacher-steps: they set the teacher's sampling of --prompts; "
                       "--videos encodes real videos and samples nothing")
    pairs = read_video_folder(flags.videos)
    for video, _ in pairs:  # without --calib-frames (the recipe's) the length is checked as the clips are read
        probe_video(video, flags.calib_frames or 1)
    return pairs


def _open(path: Path):
    import imageio.v2 as imageio

    try:
        return imageio.get_reader(str(path))
    except Exception as e:  # imageio raises many kinds (no backend, bad header, ffmpeg failures)
        raise M4VError(f"--videos {path}: cannot read it as a video ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    """One line of an imageio / ffmpeg error (ffmpeg's ends with its whole stderr; its last line says why)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else 'no reason given'}"


def probe_video(path: Path, frames: int) -> None:
    """Open ``path`` and read its header (not its frames): an unreadable file, or one whose duration is
    clearly too short for ``frames`` frames at 16 fps, is refused before any weight is read."""
    reader = _open(path)
    try:
        meta = reader.get_meta_data()
    except Exception as e:
        raise M4VError(f"--videos {path}: cannot read it as a video ({_reason(e)})") from None
    finally:
        reader.close()
    fps, duration = meta.get("fps"), meta.get("duration")
    if fps and duration and path.suffix.lower() != ".gif":  # a GIF's "duration" is per frame
        estimate = duration * min(fps, WAN_FPS)
        if estimate + 1 < frames:
            raise M4VError(f"--videos {path}: too short ({duration:.2f} s at {fps:g} fps, about {estimate:.0f} "
                           f"frames at {WAN_FPS} fps; --calib-frames needs {frames})")


def read_clip(path: Path, frames: int) -> list:
    """The first ``frames`` frames of the video at ``path`` at 16 fps (PIL images); one clear error
    naming the file when it cannot be read or is too short."""
    import PIL.Image

    reader = _open(path)
    clip = []
    try:
        fps = reader.get_meta_data().get("fps")
        if not fps and path.suffix.lower() == ".gif":
            duration = reader.get_meta_data().get("duration")  # ms per frame
            fps = 1000 / duration if duration else None
        stride = fps / WAN_FPS if fps and fps > WAN_FPS else 1.0  # slower videos: every frame
        wanted = [round(k * stride) for k in range(frames)]
        for n, frame in enumerate(reader):
            if n == wanted[len(clip)]:
                clip.append(PIL.Image.fromarray(frame).convert("RGB"))
                if len(clip) == frames:
                    break
    except Exception as e:
        raise M4VError(f"--videos {path}: cannot read it as a video ({_reason(e)})") from None
    finally:
        reader.close()
    if len(clip) < frames:
        rate = f"{fps:g} fps, " if fps else ""
        raise M4VError(f"--videos {path}: too short ({rate}{len(clip)} frames at {WAN_FPS} fps; --calib-frames "
                       f"needs {frames})")
    return clip


def files_digest(pairs: list[tuple[Path, str]]) -> str:
    """Identifies the videos and captions cheaply: names, sizes, modification times, captions."""
    h = hashlib.sha256()
    for video, caption in pairs:
        st = video.stat()
        h.update(json.dumps([str(video.resolve()), st.st_size, st.st_mtime_ns, caption]).encode())
    return h.hexdigest()


def components_fingerprint(pipeline: Path) -> dict:
    """The VAE, text encoder and tokenizer files of ``pipeline`` (names, sizes, modification times)."""
    out = {}
    for part in ("vae", "text_encoder", "tokenizer"):
        folder = Path(pipeline) / part
        out[part] = sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in folder.rglob("*") if f.is_file())
    return {"source": str(Path(pipeline).resolve()), "files": hashlib.sha256(json.dumps(out).encode()).hexdigest()}


def cache_key(pipeline: Path, pairs: list[tuple[Path, str]], size: tuple[int, int], frames: int, dtype) -> dict:
    """What a cache of video clips must have been made with to be reused (needs no weights: it is
    checked before the teacher is loaded)."""
    from m4v_convert.backbones.wan.prompts import MAX_SEQUENCE_LENGTH

    return {"videos_sha256": files_digest(pairs), "size": list(size), "frames": frames, "fps": WAN_FPS,
            "max_sequence_length": MAX_SEQUENCE_LENGTH, "components": components_fingerprint(pipeline),
            "dtype": str(dtype)}


@torch.no_grad()
def encode_clip(pipe, clip: list, size: tuple[int, int], device) -> torch.Tensor:
    """(C, F', H/8, W/8) normalised latents of one clip, as ``WanVideoToVideoPipeline`` encodes its input."""
    vae = pipe.vae
    pixels = pipe.video_processor.preprocess_video(clip, height=size[0], width=size[1], resize_mode="crop")
    latents = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist.mode()
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
    return ((latents - mean) / std)[0]


def video_samples(pipeline: Path, pairs: list[tuple[Path, str]], *, size: tuple[int, int], frames: int,
                  cache: Path, con, device, dtype) -> list:
    """The calibration samples of the videos (``CleanSample``: the clip's latents, its caption's
    embeddings), cached per clip in ``cache`` (see the module docstring)."""
    from m4v_convert.backbones.wan.prompts import MAX_SEQUENCE_LENGTH
    from m4v_convert.distill.pipeline_samples import open_pipeline
    from m4v_convert.distill.sample_cache import SampleCache, sample_progress

    cache = SampleCache(cache, cache_key(pipeline, pairs, size, frames, dtype), len(pairs), "video clips")
    todo = cache.missing()
    if todo:
        pipe = open_pipeline("WanPipeline", pipeline, "--videos", device, dtype, transformer=None)
        con.print(f"calibration: encoding {len(todo)} of {len(pairs)} videos with the pipeline's VAE and text "
                  f"encoder ({frames} frames at {WAN_FPS} fps, {size[0]}x{size[1]}; cached in {cache.folder})")
        with sample_progress(con, "video clips", len(todo)) as advance:
            for i in todo:
                video, caption = pairs[i]
                latents = encode_clip(pipe, read_clip(video, frames), size, device)
                embeds, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False,
                                               max_sequence_length=MAX_SEQUENCE_LENGTH, device=device)
                cache.save(i, latents, embeds[0])
                advance()
        del pipe  # neither the VAE nor the text encoder is needed for distillation
        gc.collect()
    else:
        con.print(f"calibration: {len(pairs)} video clips reused from {cache.folder}")
    return cache.load()
