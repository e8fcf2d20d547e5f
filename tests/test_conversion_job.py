"""The one conversion job: ``m4v-convert convert RECIPE`` converts a tiny Wan2.1, a tiny PyramidFlow
and a tiny generic-recipe model (CogVideoX) through the same six steps, and each writes a
``conversion.json`` of the one schema and the one model card; ``convert`` and a backbone command
given the same flags write the same tensors."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from m4v_convert import load_converted
from m4v_convert.backbones.pyramidflow import save_pyramidflow
from m4v_convert.backbones.pyramidflow.testing import make_tiny_miniflux
from m4v_convert.backbones.wan.testing import make_tiny_wan, save_tiny_wan
from m4v_convert.jobs.convert import SCHEMA_VERSION, ConversionSummary
from m4v_convert.recipes import RECIPES_DIR

runner = CliRunner()


def _recipe(path, base: str, calib: dict, mmdim: dict | None = None, **top):
    data = yaml.safe_load((RECIPES_DIR / f"{base}.yaml").read_text())
    data["published"] = {k: str(RECIPES_DIR / v) for k, v in (data.get("published") or {}).items()}
    data["mmdim"].update(mmdim or {})
    data["calib"].update(calib)
    data.update(top)
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """backbone → (checkpoint, recipe, extra flags), each a tiny model in its real on-disk format."""
    from diffusers import CogVideoXTransformer3DModel

    root = tmp_path_factory.mktemp("models")
    wan = save_tiny_wan(make_tiny_wan(seed=0), root / "wan")
    save_pyramidflow(make_tiny_miniflux(seed=3), root / "pf", "768p")
    torch.manual_seed(0)
    CogVideoXTransformer3DModel(  # diffusers' own tiny test configuration of the class
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=8, use_rotary_positional_embeddings=True).save_pretrained(root / "cog")
    small = {"num_samples": 6, "batch_size": 2}
    return {
        "wan": (wan, _recipe(root / "wan.yaml", "wan2.1", {"latent_frames": 2, "latent_height": 8,
                                                            "latent_width": 8, "text_len": 6, **small},
                             {"temporal_dim": 8, "temporal_heads": 2}), ["--size", "32x32", "--frames", "9"]),
        "pyramidflow": (root / "pf", _recipe(root / "pf.yaml", "pyramidflow-miniflux-768p",
                                             {"latent_frames": 4, "latent_height": 8, "latent_width": 8,
                                              "text_len": 6, **small}, {"temporal_dim": 8, "temporal_heads": 2},
                                             default_layers="1-2"), []),
        "generic": (root / "cog", "cogvideox", []),
    }


def _convert(command: list[str], ckpt, recipe, out, *extra):
    return runner.invoke(app, [*command, "--checkpoint", str(ckpt), "--out", str(out), "--distill-steps", "2",
                               "--stage2-steps", "1", "--device", "cpu", *extra])


@pytest.mark.parametrize("backbone", ["wan", "pyramidflow", "generic"])
def test_every_backbone_writes_the_one_schema_and_card(backbone, models, tmp_path):
    ckpt, recipe, extra = models[backbone]
    out = tmp_path / "out"
    res = _convert(["convert", recipe], ckpt, recipe, out, *extra)
    assert res.exit_code == 0, res.output
    summary = ConversionSummary.model_validate(json.loads((out / "conversion.json").read_text()))
    assert summary.schema_version == SCHEMA_VERSION and summary.backbone == backbone
    model = load_converted(out)
    assert summary.layers == model.converted_layers and model.config["m4v"]["backbone"] == backbone
    assert set(summary.error_before) == set(summary.error_after) == {str(i) for i in summary.layers}
    assert summary.distill.stage2["steps"] == 1 and summary.calibration == "synthetic"
    card = (out / "README.md").read_text()
    assert card.startswith("# Converted with m4v-convert") and "NOT ready" in card
    assert f"{summary.distill.stage2['end_to_end_after']:.4f}" in card  # the card shows what the summary holds


def test_convert_and_the_backbone_command_write_the_same_tensors(models, tmp_path):
    ckpt, recipe, extra = models["wan"]
    a = _convert(["convert", recipe], ckpt, recipe, tmp_path / "a", *extra)
    b = _convert(["wan2.1", "--recipe", recipe], ckpt, recipe, tmp_path / "b", *extra)
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ta = load_file(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    tb = load_file(str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
