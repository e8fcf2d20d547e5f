"""``m4v-convert generate``: a converted pipeline folder to a video file, timed, beside the original's."""

import pytest
import torch
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    from m4v_convert.backbones.wan.testing import make_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("gen")
    make_tiny_wan_pipeline(seed=0).save_pretrained(root / "original")
    res = runner.invoke(app, ["wan2.1", "--checkpoint", str(root / "original"), "--out", str(root / "converted"),
                              "--distill-steps", "1", "--stage2-steps", "0"])
    assert res.exit_code == 0, res.output
    return root


ARGS = ["--prompt", "a red ball rolls left", "--size", "16x16", "--frames", "5", "--steps", "2", "--seed", "3"]


def test_generate_writes_the_frames_the_pipeline_makes_and_compares(pipelines, tmp_path):
    import imageio.v3 as iio

    import m4v_convert

    out = tmp_path / "ball.mp4"
    res = runner.invoke(app, ["generate", str(pipelines / "converted"), *ARGS, "--output", str(out),
                              "--compare", str(pipelines / "original")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "s per denoising step" in text and "left: original, right: converted" in text
    video = iio.imread(out)  # a playable file: decoded back by ffmpeg
    assert video.shape == (5, 16, 16, 3)
    side = iio.imread(tmp_path / "ball-compare.mp4")
    assert side.shape == (5, 16, 32, 3)
    # the file holds the pipeline's frames (up to the codec's loss)
    pipe = m4v_convert.load_pipeline(pipelines / "converted")
    frames = pipe(prompt="a red ball rolls left", height=16, width=16, num_frames=5, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(3), output_type="np").frames[0]
    err = abs(video.astype("float32") / 255 - frames).mean()
    assert err < 0.1, err
    assert abs(side[:, :, 16:].astype("float32") - video.astype("float32")).mean() < 8  # right half: converted


@pytest.mark.parametrize("extra,expect", [
    (["--frames", "6"], "--frames 6: the video VAE compresses time 4x"),
    (["--size", "20x16"], "multiples of 16"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
])
def test_generate_refuses_bad_input_before_loading(pipelines, tmp_path, extra, expect):
    res = runner.invoke(app, ["generate", str(pipelines / "converted"), *ARGS, *extra, "--output",
                              str(tmp_path / "v.mp4")])
    assert res.exit_code == 2 and res.output.count("error:") == 1 and "Traceback" not in res.output, res.output
    assert expect in " ".join(res.output.split())
    assert not (tmp_path / "v.mp4").exists()


def test_generate_refuses_a_model_that_is_not_a_converted_pipeline(pipelines, tmp_path):
    for model, expect in ((pipelines / "converted" / "transformer", "not a diffusers pipeline folder"),
                          (pipelines / "original", "its transformer is not a converted one")):
        res = runner.invoke(app, ["generate", str(model), *ARGS, "--output", str(tmp_path / "v.mp4")])
        assert res.exit_code == 2 and expect in " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["generate", str(pipelines / "converted"), *ARGS, "--output",
                              str(pipelines / "converted" / "v.mp4")])
    assert res.exit_code == 2 and "inside the input" in res.output
