"""Wan2.1 → MM-DiM end to end: swap, distill, save, reload, pipeline, CLI and its bad input."""

import inspect
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from m4v_convert import load_converted
from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel, WanMMDiMAttention, record_teacher_layers
from m4v_convert.convert import parse_layers
from m4v_convert.errors import M4VError
from m4v_convert.io.converted import save_converted
from m4v_convert.backbones.wan.testing import make_tiny_wan, save_tiny_wan, save_tiny_wan_recipe, tiny_wan_inputs

RECIPE_MMDIM = {"bc_norm": "across_groups", "rotary": True, "temporal_causal": False, "temporal_dim": 8,
                "temporal_heads": 2}
runner = CliRunner()


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_wan(seed=1)


def _inputs(model, pad_from=3):
    kw = tiny_wan_inputs(model, batch=2, frames=3, height=8, width=8, text_len=5)
    kw["encoder_hidden_states"][0, pad_from:] = 0  # item 0 has padding, as pipelines pad
    return kw


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0-2,5,7-8", 10) == [0, 1, 2, 5, 7, 8]
    assert parse_layers("3,1,1", 4) == [1, 3]
    for bad in ("1-", "a", "3-1", "1,,2"):
        with pytest.raises(M4VError, match="--layers"):
            parse_layers(bad, 4)
    with pytest.raises(M4VError, match="out of range"):
        parse_layers("0-4", 4)


def test_swap_replaces_only_selected_attn1_and_keeps_the_rest(teacher):
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    replaced = student.convert_([1], RECIPE_MMDIM)
    assert replaced == ["blocks.1.attn1"]
    assert isinstance(student.blocks[1].attn1, WanMMDiMAttention)
    assert not isinstance(student.blocks[0].attn1, WanMMDiMAttention)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for k, v in t_sd.items():
        if not k.startswith("blocks.1.attn1."):
            assert torch.equal(s_sd[k], v), k
    # untouched weights are the teacher's own tensors (training copies what it would change:
    # tests/test_shared_weights.py)
    assert student.blocks[0].ffn.net[2].weight is teacher.blocks[0].ffn.net[2].weight
    # init comes from the attention weights
    mixer = student.blocks[1].attn1.mmdim.mixer
    inner = 32
    assert torch.equal(mixer.in_proj.weight[3 * inner:4 * inner], teacher.blocks[1].attn1.to_q.weight)
    assert torch.equal(mixer.out_proj.weight, teacher.blocks[1].attn1.to_out[0].weight)


def test_converted_model_takes_the_original_arguments(teacher):
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    student.convert_([0, 1], RECIPE_MMDIM)
    orig = inspect.signature(type(teacher).forward).parameters
    conv = inspect.signature(type(student).forward).parameters
    assert list(orig) == list(conv)
    with torch.no_grad():
        out = student(**_inputs(teacher)).sample
    assert out.shape == teacher(**_inputs(teacher)).sample.shape and torch.isfinite(out).all()


def test_unconverted_student_equals_teacher_and_converted_layer_matches_recorded_context(teacher):
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    kw = _inputs(teacher)
    with torch.no_grad():
        torch.testing.assert_close(student(**kw).sample, teacher(**kw).sample, rtol=0, atol=0)
    # the context a converted attn1 receives inside the model = what stage 1 records from the teacher
    student.convert_([0], RECIPE_MMDIM)
    seen = {}
    student.blocks[0].attn1.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    student.blocks[0].attn1.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    with torch.no_grad():
        student(**kw)
    rec = record_teacher_layers(teacher, kw, [0])[0]
    torch.testing.assert_close(seen["in"], rec.hidden_states, rtol=0, atol=0)  # block 0 input is untouched
    with torch.no_grad():
        direct, _ = student.blocks[0].attn1.mmdim(rec.hidden_states, **rec.context)
    torch.testing.assert_close(seen["out"], direct, rtol=0, atol=0)
    assert rec.context["text_mask"].tolist() == [[True, True, True, False, False], [True] * 5]


def test_save_load_round_trip_is_bit_identical(teacher, tmp_path):
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    student.convert_([0, 1], RECIPE_MMDIM)
    with torch.no_grad():
        for p in student.blocks[0].attn1.mmdim.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained" weights, not the init
    files = save_converted(student, tmp_path / "m", metadata={"recipe": "wan2.1"}, max_shard_bytes=40_000)
    assert any("-of-" in f for f in files)  # small shard size forces a sharded index
    loaded = load_converted(tmp_path / "m")
    assert type(loaded) is M4VWanTransformer3DModel and loaded.converted_layers == [0, 1]
    for k, v in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    kw = _inputs(teacher)
    with torch.no_grad():
        assert torch.equal(loaded(**kw).sample, student.eval()(**kw).sample)


def test_load_converted_refuses_plain_checkpoint(teacher, tmp_path):
    save_tiny_wan(teacher, tmp_path / "plain")
    with pytest.raises(M4VError, match="not a converted model"):
        load_converted(tmp_path / "plain")


def _tiny_pipeline_parts(transformer):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "square", "moving", "left"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=transformer.config.text_dim,
                                               d_ff=32, d_kv=8, num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=transformer.config.in_channels, dim_mult=[1, 1], num_res_blocks=1,
                           temperal_downsample=[False], latents_mean=[0.0] * transformer.config.in_channels,
                           latents_std=[1.0] * transformer.config.in_channels,
                           scale_factor_temporal=1, scale_factor_spatial=2).eval()
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def test_converted_model_drops_into_wan_pipeline(teacher, tmp_path):
    from diffusers import WanPipeline

    student = M4VWanTransformer3DModel.from_teacher(teacher)
    student.convert_([0, 1], RECIPE_MMDIM)
    save_converted(student, tmp_path / "m", metadata={})
    loaded = load_converted(tmp_path / "m")
    parts = _tiny_pipeline_parts(loaded)

    def run(transformer):
        pipe = WanPipeline(transformer=transformer, **parts)
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator().manual_seed(0)
        return pipe(prompt="a red square moving left", negative_prompt="", height=16, width=16, num_frames=3,
                    num_inference_steps=2, guidance_scale=1.0, generator=gen, output_type="pt",
                    max_sequence_length=8).frames

    frames = run(loaded)
    assert frames.shape[-2:] == (16, 16) and torch.isfinite(frames).all()
    # the pipeline really used the converted transformer: the teacher gives other frames
    assert not torch.allclose(frames, run(teacher))
    # and the saved student reproduces the loaded one exactly through the pipeline
    assert torch.equal(frames, run(student.eval()))


# ---------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, teacher):
    return save_tiny_wan(teacher, tmp_path_factory.mktemp("ckpt") / "wan")


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    return save_tiny_wan_recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml")


def _convert(ckpt, out, recipe_file, *extra):
    # stage 2 has its own tests (test_distill.py); a few steps keep the CLI tests quick
    stage2 = [] if "--stage2-steps" in extra else ["--stage2-steps", "2"]
    return runner.invoke(app, ["wan2.1", "--checkpoint", str(ckpt), "--out", str(out), "--recipe", str(recipe_file),
                               "--size", "32x32", "--frames", "9", *stage2, *extra])


def test_cli_converts_distills_and_writes_everything(ckpt, recipe_file, tmp_path):
    out = tmp_path / "converted"
    res = _convert(ckpt, out, recipe_file, "--layers", "all", "--distill-steps", "25")
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "flops.json", "flops.md", "flops.png",
            "README.md", "conversion.json"} <= names
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["calibration"] == "synthetic" and summary["layers"] == [0, 1]
    for i in ("0", "1"):  # distillation reduced every layer's error
        assert summary["error_after"][i] < summary["error_before"][i]
    flops = json.loads((out / "flops.json").read_text())
    assert flops["converted_total_flops"] > 0 and [l["index"] for l in flops["layers"]][:2] == [0, 1]
    from safetensors import safe_open

    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["recipe"] == "wan2.1" and meta["layers"] == "0,1" and meta["format"] == "pt"
    assert "SYNTHETIC" in (out / "README.md").read_text().upper()
    model = load_converted(out)
    assert model.converted_layers == [0, 1]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["m4v"]["recipe"] == "wan2.1" and set(cfg["m4v"]["layers"]) == {"0", "1"}


def test_cli_reads_a_calibration_folder(ckpt, recipe_file, tmp_path):
    from safetensors.torch import save_file

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        save_file({"latents": torch.randn(3, 4, 2, 8, 8), "text_embeds": torch.randn(3, 6, 32)},
                  str(calib / f"{i}.safetensors"))
    out = tmp_path / "c"
    res = _convert(ckpt, out, recipe_file, "--layers", "1", "--distill-steps", "2", "--calib", str(calib))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "conversion.json").read_text())["calibration"].startswith("folder:")
    bad = tmp_path / "badcalib"
    bad.mkdir()
    save_file({"latents": torch.randn(5, 2, 8, 8)}, str(bad / "x.safetensors"))
    res = _convert(ckpt, tmp_path / "d", recipe_file, "--calib", str(bad), "--distill-steps", "1")
    assert res.exit_code != 0 and "text_embeds" in res.output and not (tmp_path / "d").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "layers", "layers_range", "exists", "recipe",
                                  "yaml", "other_arch", "device"])
def test_cli_bad_input_is_one_clear_message(case, ckpt, recipe_file, tmp_path):
    out = tmp_path / "out"
    args = dict(ckpt=ckpt, recipe=recipe_file, extra=["--distill-steps", "1"])
    expect = {
        "missing": "does not exist", "empty": "checkpoint", "corrupt": "", "layers": "--layers",
        "layers_range": "out of range", "exists": "--overwrite", "recipe": "unknown recipe", "yaml": "invalid YAML",
        "other_arch": "", "device": "cuda",
    }[case]
    if case == "missing":
        args["ckpt"] = tmp_path / "nope"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args["ckpt"] = tmp_path / "empty"
    elif case == "corrupt":
        bad = tmp_path / "corrupt"
        save_tiny_wan(make_tiny_wan(), bad)
        f = bad / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
        args["ckpt"] = bad
    elif case == "layers":
        args["extra"] += ["--layers", "0-x"]
    elif case == "layers_range":
        args["extra"] += ["--layers", "0-5"]
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    elif case == "recipe":
        args["recipe"] = "no-such-recipe"
    elif case == "yaml":
        y = tmp_path / "bad.yaml"
        y.write_text("name: [unclosed\n")
        args["recipe"] = y
    elif case == "other_arch":
        other = tmp_path / "flux"
        other.mkdir()
        (other / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "num_layers": 2}))
        from safetensors.torch import save_file

        save_file({"x_embedder.weight": torch.zeros(2, 2)}, str(other / "diffusion_pytorch_model.safetensors"))
        args["ckpt"] = other
    elif case == "device":
        if torch.cuda.is_available():
            pytest.skip("machine has CUDA")
        args["extra"] += ["--device", "cuda"]
    res = _convert(args["ckpt"], out, args["recipe"], *args["extra"])
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert "error:" in text and expect.lower() in text.lower()
    if case == "exists":
        assert (out / "keep.txt").read_text() == "user data"
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


@pytest.mark.parametrize("where", ["distill", "save"])
def test_cli_interrupt_leaves_no_partial_output(where, ckpt, recipe_file, tmp_path, monkeypatch):
    import m4v_convert.distill.stage1 as stage1
    import m4v_convert.io.converted as converted

    def boom(*a, **k):
        if where == "save":  # half-written output folder at the moment of the interrupt
            Path(a[1], "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    if where == "distill":
        monkeypatch.setattr(stage1, "run_stage1", boom)
    else:
        monkeypatch.setattr(converted, "save_converted", boom)
    out = tmp_path / "out"
    res = _convert(ckpt, out, recipe_file, "--distill-steps", "1")
    assert res.exit_code == 130 and "interrupted" in res.output
    assert list(tmp_path.iterdir()) == []


def test_cli_recipes_lists_shipped_recipes():
    res = runner.invoke(app, ["recipes"])
    assert res.exit_code == 0 and "wan2.1" in res.output and "Wan2.1" in res.output


def test_cli_flops_for_published_config(tmp_path):
    res = runner.invoke(app, ["flops", "wan2.1", "--model", "1.3b", "--size", "480x832", "--frames", "81",
                              "--json", str(tmp_path / "f.json"), "--no-crosscheck"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "f.json").read_text())
    n = 32760
    assert report["tokens"] == n and len(report["layers"]) == 30
    assert report["original_total_flops"] > report["converted_total_flops"] > 0
    bad = runner.invoke(app, ["flops", "wan2.1", "--model", "7b"])
    assert bad.exit_code != 0 and "1.3b" in bad.output
