"""Calibration from real videos (issue 37 part 2): ``--videos DIR`` with a Wan pipeline folder encodes each
captioned clip with the pipeline's own VAE (normalised as the pipeline does) and text encoder, cached one
clip per file in the --calib format, resumable; bad input refused before any weight is read."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from m4v_convert.backbones.wan import videos as V

runner = CliRunner()
CAPTIONS = ["a red ball rolls left", "a blue cube moves right", "a green ball rolls up", "the red cube moves down"]
SAMPLING = ["--calib-size", "32x32", "--calib-frames", "5"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from m4v_convert.backbones.wan.testing import make_tiny_wan_pipeline

    folder = tmp_path_factory.mktemp("videos") / "pipe"
    make_tiny_wan_pipeline(seed=0).save_pretrained(folder)
    return folder


def _frames(n: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    """A moving gradient: smooth enough that mp4 keeps it, different in every frame."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = g.uniform(0, 255, size=3)
    return [np.stack([(base[c] + 4 * (x + y) + 20 * t) % 256 for c in range(3)], -1).astype(np.uint8)
            for t in range(n)]


def _write_video(path, frames, fps=16):
    from diffusers.utils import export_to_video

    export_to_video([f.astype(np.float32) / 255 for f in frames], str(path), fps=fps)


@pytest.fixture
def video_dir(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i, caption in enumerate(CAPTIONS):
        _write_video(folder / f"clip{i}.mp4", _frames(9, 32, 32, seed=i))
        (folder / f"clip{i}.txt").write_text(caption + "\n")
    return folder


def _convert(pipeline, tmp_path, videos, cache, *extra):
    return runner.invoke(app, ["wan2.1", "--checkpoint", str(pipeline), "--out", str(tmp_path / "out"), "--videos",
                               str(videos), *SAMPLING, "--calib-cache", str(cache), "--distill-steps", "1",
                               "--stage2-steps", "0", *extra])


def _decoded(path, n):
    import imageio.v2 as imageio

    with imageio.get_reader(str(path)) as reader:
        return [f for _, f in zip(range(n), reader)]


def test_video_latents_are_the_vaes_own(pipeline, video_dir, tmp_path):
    """Each cached clip equals the VAE's own encode of its decoded frames, normalised with latents_mean / std;
    each caption's embeddings equal WanPipeline.encode_prompt's; the cache is a --calib / --data folder."""
    from diffusers import WanPipeline

    from m4v_convert.backbones.wan.prompts import MAX_SEQUENCE_LENGTH
    from m4v_convert.distill.calibration import CalibSpec, folder_samples

    cache = tmp_path / "cache"
    res = _convert(pipeline, tmp_path, video_dir, cache)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert summary["calibration"] == f"videos:{video_dir.resolve()}"
    assert "real videos" in (tmp_path / "out" / "README.md").read_text()
    pipe = WanPipeline.from_pretrained(pipeline)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    for i, caption in enumerate(CAPTIONS):
        saved = load_file(str(cache / f"sample-{i:05d}.safetensors"))
        frames = np.stack(_decoded(video_dir / f"clip{i}.mp4", 5))  # (F, H, W, 3) uint8, 16 fps: every frame
        pixels = torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] / 127.5 - 1
        with torch.no_grad():
            want = (vae.encode(pixels).latent_dist.mode() - mean) / std
        assert saved["latents"].shape == (16, 2, 4, 4)
        torch.testing.assert_close(saved["latents"], want[0], rtol=1e-4, atol=1e-5)
        embeds, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False,
                                       max_sequence_length=MAX_SEQUENCE_LENGTH)
        assert torch.equal(saved["text_embeds"], embeds[0])
    spec = CalibSpec(in_channels=16, text_dim=32, latent_frames=2, latent_height=4, latent_width=4,
                     text_len=MAX_SEQUENCE_LENGTH)
    again = folder_samples(cache, spec, flag="--data")
    assert len(again) == 4 and torch.equal(again[2].latents, load_file(str(cache / "sample-00002.safetensors"))["latents"])


def test_clips_are_resampled_to_16_fps_and_centre_cropped(pipeline, tmp_path):
    """A 32 fps clip gives every other frame; a 2:1 clip loses its sides (resized to cover, centre-cropped)."""
    from diffusers import WanPipeline

    fast = tmp_path / "fast.mp4"
    _write_video(fast, _frames(12, 32, 32, seed=5), fps=32)
    clip = V.read_clip(fast, 5)
    decoded = _decoded(fast, 12)
    assert [np.asarray(f).tolist() for f in clip] == [decoded[k].tolist() for k in (0, 2, 4, 6, 8)]
    with pytest.raises(Exception, match=r"too short \(32 fps, 6 frames at 16 fps; --calib-frames needs 9\)"):
        V.read_clip(fast, 9)

    wide = np.full((48, 96, 3), 128, np.uint8)
    wide[:, :24] = (255, 0, 0)  # sides that the centre crop must remove
    wide[:, 72:] = (0, 0, 255)
    path = tmp_path / "wide.mp4"
    _write_video(path, [wide] * 5)
    pipe = WanPipeline.from_pretrained(pipeline)
    pixels = pipe.video_processor.preprocess_video(V.read_clip(path, 5), height=32, width=32, resize_mode="crop")
    assert pixels.shape == (1, 3, 5, 32, 32)
    inner = pixels[..., 4:28]  # the crop's own edges are where mp4 blurs red into grey
    assert (inner - 128 / 127.5 + 1).abs().max() < 0.1, "the crop kept the coloured sides"


def test_a_killed_encoding_run_keeps_its_clips_and_continues(pipeline, video_dir, tmp_path, monkeypatch):
    from m4v_convert.distill import sample_cache

    cache = tmp_path / "cache"
    saved = []
    real = sample_cache.save_atomic

    def interrupted(tensors, path):
        if len(saved) == 1:
            raise KeyboardInterrupt  # Ctrl-C while encoding the second clip
        saved.append(path.name)
        real(tensors, path)

    monkeypatch.setattr(sample_cache, "save_atomic", interrupted)
    res = _convert(pipeline, tmp_path, video_dir, cache)
    assert res.exit_code == 130, res.output
    kept = (cache / "sample-00000.safetensors").read_bytes()
    assert sorted(f.name for f in cache.glob("sample-*")) == ["sample-00000.safetensors"]
    monkeypatch.setattr(sample_cache, "save_atomic", lambda t, p: (saved.append(p.name), real(t, p)))
    saved.clear()
    res = _convert(pipeline, tmp_path, video_dir, cache, "--overwrite")
    assert res.exit_code == 0, res.output
    assert saved == [f"sample-{i:05d}.safetensors" for i in (1, 2, 3)]  # only the missing ones
    assert "encoding 3 of 4 videos" in " ".join(res.output.split())
    assert (cache / "sample-00000.safetensors").read_bytes() == kept
    # another clip size is other samples: refused before the teacher is loaded, nothing overwritten
    res = _convert(pipeline, tmp_path, video_dir, cache, "--overwrite", "--calib-size", "16x16")
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "differs in: size" in out and "loaded" not in out, res.output


@pytest.mark.parametrize("case,expect", [
    ("no-caption", "clip1.mp4: no caption (expected clip1.txt beside it)"),
    ("empty-caption", "clip2.txt: the caption is empty"),
    ("unreadable", "clip0.mp4: cannot read it as a video"),
    ("short", "clip3.mp4: too short"),
    ("frames", "--calib-frames 6: the video VAE compresses time 4x"),
    ("transformer", "--videos needs a diffusers pipeline folder as --checkpoint"),
    ("empty-folder", "no video files"),
    ("with-prompts", "--videos: the calibration comes from --videos; drop --prompts"),
    ("guidance", "--videos encodes real videos and samples nothing"),
    ("few", "1 captioned video(s), the calibration needs at least 4"),
    ("cache-in-videos", "--calib-cache"),
    ("cache-in-checkpoint", "lies inside the --checkpoint"),
])
def test_bad_video_input_is_refused_before_loading(pipeline, video_dir, tmp_path, monkeypatch, case, expect):
    from m4v_convert.backbones.wan import load

    monkeypatch.setattr(load, "load_wan_transformer", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    ckpt, args = pipeline, ["--videos", str(video_dir), *SAMPLING]
    if case == "no-caption":
        (video_dir / "clip1.txt").unlink()
    elif case == "empty-caption":
        (video_dir / "clip2.txt").write_text(" \n")
    elif case == "unreadable":
        (video_dir / "clip0.mp4").write_bytes(b"not a video at all" * 10)
    elif case == "short":
        _write_video(video_dir / "clip3.mp4", _frames(2, 32, 32, seed=3))
        args = ["--videos", str(video_dir), "--calib-size", "32x32", "--calib-frames", "9"]
    elif case == "frames":
        args = ["--videos", str(video_dir), "--calib-frames", "6"]
    elif case == "transformer":
        ckpt = pipeline / "transformer"
    elif case == "empty-folder":
        for f in video_dir.iterdir():
            f.unlink()
    elif case == "with-prompts":
        prompts = tmp_path / "p.txt"
        prompts.write_text("\n".join(CAPTIONS))
        args += ["--prompts", str(prompts)]
    elif case == "guidance":
        args += ["--guidance-scale", "3"]
    elif case == "few":
        for i in (1, 2, 3):
            (video_dir / f"clip{i}.mp4").unlink()
    elif case == "cache-in-videos":
        args += ["--calib-cache", str(video_dir / "cache")]
        expect = f"--calib-cache {(video_dir / 'cache').resolve()} lies inside the --videos {video_dir.resolve()}"
    elif case == "cache-in-checkpoint":
        args += ["--calib-cache", str(pipeline / "latents")]
    before = sorted(p.name for p in video_dir.iterdir()), sorted(p.name for p in pipeline.iterdir())
    res = runner.invoke(app, ["wan2.1", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), *args])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert expect in out and res.output.count("error:") == 1 and "Traceback" not in out, out
    assert "ffmpeg version" not in out and "moov atom" not in out, out  # one line, not ffmpeg's whole stderr
    assert (sorted(p.name for p in video_dir.iterdir()), sorted(p.name for p in pipeline.iterdir())) == before


@pytest.mark.memory_plan
def test_dry_run_plans_the_clips_without_reading_them(pipeline, video_dir, tmp_path, monkeypatch):
    """The memory plan runs on the meta device: it counts the clips' samples at their size (stand-ins)
    and reads no weight and no video, and makes no cache."""
    from m4v_convert.backbones.wan import load
    from m4v_convert.distill import pipeline_samples

    made = []
    real = pipeline_samples.stand_in_samples
    monkeypatch.setattr(pipeline_samples, "stand_in_samples", lambda *a, **k: made.extend(real(*a, **k)) or made)
    monkeypatch.setattr(load, "load_wan_transformer", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    monkeypatch.setattr(V, "read_clip", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    res = runner.invoke(app, ["wan2.1", "--checkpoint", str(pipeline), "--out", str(tmp_path / "out"), "--videos",
                              str(video_dir), *SAMPLING, "--calib-cache", str(tmp_path / "cache"), "--dry-run"])
    assert res.exit_code == 0, res.output
    for part in ("calibration samples", "calibration sampling (pipeline components)", "text_encoder (float32)",
                 "vae (float32)", "--dry-run: stopped before loading any weight"):
        assert part in res.output, res.output
    assert len(made) == 4 and made[0].latents.shape == (16, 2, 4, 4) and made[0].text.shape == (512, 32)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.memory_plan
def test_the_memory_plan_counts_the_pipeline_components_until_the_cache_is_full(pipeline, tmp_path):
    """The text encoder (in the run's dtype) and the VAE (float32) that sampling loads beside the teacher,
    sized from their headers: equal to the loaded models' own parameter bytes; nothing once every sample
    is cached."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    from m4v_convert.jobs.memory import pipeline_sampling_phase

    cache = tmp_path / "cache"
    plan = SimpleNamespace(flags=SimpleNamespace(calib_cache=cache), distill=None, dtype=torch.bfloat16)
    adapter = SimpleNamespace(pipeline=pipeline, prompts=None, videos=[("clip", "caption")] * 4)
    phase = pipeline_sampling_phase(plan, adapter, 4)
    encoder = UMT5EncoderModel.from_pretrained(pipeline / "text_encoder")
    vae = AutoencoderKLWan.from_pretrained(pipeline / "vae")
    assert phase.parts == {"text_encoder (bfloat16)": 2 * sum(p.numel() for p in encoder.parameters()),
                           "vae (float32)": 4 * sum(p.numel() for p in vae.parameters())}
    cache.mkdir()
    for i in range(4):
        (cache / f"sample-{i:05d}.safetensors").write_bytes(b"")
    assert pipeline_sampling_phase(plan, adapter, 4) is None
