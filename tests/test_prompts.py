"""Calibration from real prompts (issue 37 part 1): ``--prompts`` with a Wan pipeline folder encodes each
prompt with the pipeline's own encoder and samples the teacher through the pipeline itself, cached one
sample per file, resumable; bad input refused before any weight is read."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from m4v_convert.backbones.wan import prompts as P

runner = CliRunner()
PROMPTS = ["a red ball rolls left", "a blue cube moves right", "a green ball rolls up", "the red cube moves down"]
SAMPLING = ["--calib-size", "32x32", "--calib-frames", "5", "--teacher-steps", "2"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from m4v_convert.backbones.wan.testing import make_tiny_wan_pipeline

    folder = tmp_path_factory.mktemp("prompts") / "pipe"
    make_tiny_wan_pipeline(seed=0).save_pretrained(folder)
    return folder


def _convert(pipeline, tmp_path, cache, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return runner.invoke(app, ["wan2.1", "--checkpoint", str(pipeline), "--out", str(tmp_path / "out"), "--prompts",
                               str(prompts), *SAMPLING, "--calib-cache", str(cache), "--distill-steps", "1",
                               "--stage2-steps", "0", *extra])


def test_prompt_samples_are_the_pipelines_own(pipeline, tmp_path):
    """The cached text embeddings equal WanPipeline.encode_prompt's and the latents equal
    WanPipeline(..., output_type="latent") for the same seed and settings."""
    from diffusers import WanPipeline

    cache = tmp_path / "cache"
    res = _convert(pipeline, tmp_path, cache)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert summary["calibration"].startswith("prompts:") and summary["pipeline"]
    assert "sampled by the teacher" in (tmp_path / "out" / "README.md").read_text()
    pipe = WanPipeline.from_pretrained(pipeline)
    for i, prompt in enumerate(PROMPTS):
        saved = load_file(str(cache / f"sample-{i:05d}.safetensors"))
        embeds, negative = pipe.encode_prompt(prompt, P.DEFAULT_NEGATIVE, do_classifier_free_guidance=True,
                                              max_sequence_length=P.MAX_SEQUENCE_LENGTH)
        assert torch.equal(saved["text_embeds"], embeds[0])
        n_tokens = len(prompt.split()) + 1  # words + </s>; every row after the mask is zero
        assert saved["text_embeds"][n_tokens:].abs().sum() == 0 and saved["text_embeds"][:n_tokens].abs().sum() > 0
        want = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=32, width=32, num_frames=5,
                    num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(i),
                    output_type="latent").frames[0]
        assert saved["latents"].shape == (16, 2, 4, 4)
        # the conversion's teacher holds its weights in owned memory, from_pretrained's are memory-mapped:
        # CPU matmuls may sum in another order (wan/load.py, _own_cpu_tensors), so float32 rounding apart
        assert ((saved["latents"] - want).norm() / want.norm()).item() < 1e-5
    # the converted pipeline folder runs in diffusers as downloaded pipelines do
    from diffusers import DiffusionPipeline

    converted = DiffusionPipeline.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(converted).__name__ == "WanPipeline" and converted.transformer.converted_layers == [0, 1]
    video = converted(PROMPTS[0], height=32, width=32, num_frames=5, num_inference_steps=2, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 5, 3, 32, 32) and torch.isfinite(video).all()


def test_a_killed_sampling_run_keeps_its_samples_and_continues(pipeline, tmp_path, monkeypatch):
    from m4v_convert.distill import sample_cache

    cache = tmp_path / "cache"
    saved = []
    real = sample_cache.save_atomic

    def interrupted(tensors, path):
        if len(saved) == 2:
            raise KeyboardInterrupt  # Ctrl-C while sampling the third prompt
        saved.append(path.name)
        real(tensors, path)

    monkeypatch.setattr(sample_cache, "save_atomic", interrupted)
    res = _convert(pipeline, tmp_path, cache)
    assert res.exit_code == 130, res.output
    kept = {f.name: f.read_bytes() for f in cache.glob("sample-*.safetensors")}
    assert sorted(kept) == ["sample-00000.safetensors", "sample-00001.safetensors"]
    assert not list(cache.glob(".*tmp*"))  # no half-written sample
    monkeypatch.setattr(sample_cache, "save_atomic", lambda t, p: (saved.append(p.name), real(t, p)))
    saved.clear()
    res = _convert(pipeline, tmp_path, cache, "--overwrite")
    assert res.exit_code == 0, res.output
    assert saved == ["sample-00002.safetensors", "sample-00003.safetensors"]  # only the missing ones
    assert "sampling 2 of 4 prompts" in " ".join(res.output.split())
    assert all((cache / name).read_bytes() == data for name, data in kept.items())


@pytest.mark.parametrize("case,expect", [
    ("transformer", "needs a diffusers pipeline folder as --checkpoint"),
    ("empty", "no prompts in it"),
    ("frames", "--calib-frames 6: the video VAE compresses time 4x"),
    ("few", "the calibration needs at least 4"),
    ("size-alone", "give --prompts FILE"),
    ("steps-alone", "--teacher-steps: the steps of the teacher's samples"),
    ("jsonl", "prompts.jsonl:2: expected"),
])
def test_bad_prompt_input_is_refused_before_loading(pipeline, tmp_path, monkeypatch, case, expect):
    from m4v_convert.backbones.wan import load

    monkeypatch.setattr(load, "load_wan_transformer", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    ckpt, args = pipeline, ["--prompts", str(prompts), *SAMPLING]
    if case == "transformer":
        ckpt = pipeline / "transformer"
    elif case == "empty":
        prompts.write_text("\n \n")
    elif case == "frames":
        args = ["--prompts", str(prompts), "--calib-frames", "6"]
    elif case == "few":
        prompts.write_text("one prompt\n")
    elif case == "size-alone":
        args = ["--calib-size", "32x32"]
    elif case == "steps-alone":
        args = ["--teacher-steps", "3"]
    elif case == "jsonl":
        bad = tmp_path / "prompts.jsonl"
        bad.write_text('{"prompt": "a red ball"}\n{"text": "no prompt key"}\n')
        args = ["--prompts", str(bad)]
    res = runner.invoke(app, ["wan2.1", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), *args])
    assert res.exit_code == 2 and res.output.count("error:") == 1 and "Traceback" not in res.output, res.output
    assert expect in " ".join(res.output.split())
    assert not (tmp_path / "out").exists()


def test_a_cogvideox_pipeline_samples_its_prompts(tmp_path):
    """A generic recipe whose pipeline: section names CogVideoXPipeline: its samples are the pipeline's own
    (encode_prompt at max_text_seq_length, the pipeline's DDIM sampler with guidance 6 and an empty negative
    prompt), its (F, C, H, W) latents stored as (C, F, H, W)."""
    from diffusers import CogVideoXPipeline

    from m4v_convert.backbones.generic.testing import make_tiny_cogvideox_pipeline

    make_tiny_cogvideox_pipeline(seed=0, max_text_seq_length=16).save_pretrained(tmp_path / "cog")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cache = tmp_path / "cache"
    res = runner.invoke(app, ["convert", "cogvideox", "--checkpoint", str(tmp_path / "cog"), "--out",
                              str(tmp_path / "out"), "--prompts", str(prompts), "--calib-size", "16x16",
                              "--calib-frames", "5", "--teacher-steps", "2", "--calib-cache", str(cache),
                              "--distill-steps", "1", "--stage2-steps", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["calibration"].startswith("prompts:")
    pipe = CogVideoXPipeline.from_pretrained(tmp_path / "cog")
    for i, prompt in enumerate(PROMPTS):
        saved = load_file(str(cache / f"sample-{i:05d}.safetensors"))
        embeds, negative = pipe.encode_prompt(prompt, "", do_classifier_free_guidance=True, max_sequence_length=16)
        assert torch.equal(saved["text_embeds"], embeds[0])
        want = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=16, width=16, num_frames=5,
                    num_inference_steps=2, guidance_scale=6.0, generator=torch.Generator().manual_seed(i),
                    output_type="latent").frames[0]
        assert want.shape == (2, 4, 2, 2) and saved["latents"].shape == (4, 2, 2, 2)
        want = want.transpose(0, 1)
        assert ((saved["latents"] - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("args,expect", [
    (["convert", "ltx-video", "--prompts", "P"], "--prompts: not offered for recipe ltx-video: LTXPipeline.encode_prompt"),
    (["convert", "hunyuanvideo", "--prompts", "P"], "takes no negative prompt"),
    (["convert", "cogvideox", "--videos", "P"], "--videos: not offered for generic recipes"),
    (["convert", "cogvideox", "--calib-size", "16x16"], "--calib-size: they set the teacher's samples of --prompts"),
    (["convert", "cogvideox", "--prompts", "P"], "--prompts needs a diffusers pipeline folder as --checkpoint"),
    (["pyramidflow", "--prompts", "P"], "--prompts: not offered for pyramidflow recipes"),
])
def test_other_backbones_refuse_prompts(tmp_path, args, expect):
    from diffusers import CogVideoXTransformer3DModel

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                time_embed_dim=2, text_embed_dim=16, num_layers=1, sample_width=2, sample_height=2,
                                sample_frames=9, patch_size=2).save_pretrained(tmp_path / "cog")
    args = [str(prompts) if a == "P" else a for a in args]
    res = runner.invoke(app, [*args, "--checkpoint", str(tmp_path / "cog"), "--out", str(tmp_path / "o")])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and expect in out and res.output.count("error:") == 1, res.output
