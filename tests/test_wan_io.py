"""Loading Wan2.1 transformers from every supported on-disk layout, and refusing bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from m4v_convert.backbones.wan import load as wan_io
from m4v_convert.backbones.wan.load import (
    find_wan_checkpoint,
    infer_wan_original_config,
    load_wan_transformer,
    wan_key_to_original,
    wan_original_config_to_diffusers,
)
from m4v_convert.errors import CheckpointError, M4VError
from m4v_convert.io.safetensors_io import read_header, read_metadata, read_state_dict
from m4v_convert.backbones.wan.testing import (
    LAYOUTS,
    make_tiny_wan,
    save_tiny_wan,
    tiny_wan_inputs,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "configs"
TINY_HEADS = 2  # tiny dim 32 is not a multiple of 128: bare original files need num_heads


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny_wan(seed=0)
    inputs = tiny_wan_inputs(model)
    with torch.no_grad():
        ref = model(**inputs).sample
    return model, inputs, ref


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """layout -> path of the tiny model saved in that layout (written once, never modified)."""
    base = tmp_path_factory.mktemp("wan_layouts")
    return {layout: save_tiny_wan(tiny[0], base / layout, layout) for layout in LAYOUTS}


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.mkdir()
        shutil.copy(src, dst / src.name)
        dst = dst / src.name
    return dst


def _kwargs(layout: str) -> dict:
    return {"num_heads": TINY_HEADS} if layout == "original-file" else {}


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_round_trips_bit_exactly(layout, tiny, saved):
    model, inputs, ref = tiny
    ckpt = find_wan_checkpoint(saved[layout], **_kwargs(layout))
    assert ckpt.kind == ("original" if layout.startswith("original") else "diffusers")
    assert ckpt.use_from_pretrained == (ckpt.kind == "diffusers")

    loaded = load_wan_transformer(saved[layout], **_kwargs(layout))
    assert type(loaded).__name__ == "WanTransformer3DModel"
    assert not loaded.training
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key
    with torch.no_grad():
        out = loaded(**inputs).sample
    assert torch.equal(out, ref)


@pytest.mark.parametrize("layout", ["diffusers-sharded", "original-sharded"])
def test_sharded_layouts_are_really_sharded(layout, saved):
    index = saved[layout] / "diffusion_pytorch_model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) >= 2
    assert all((saved[layout] / s).is_file() for s in shards)
    ckpt = find_wan_checkpoint(saved[layout])
    assert {f.name for f in ckpt.weight_files} == shards


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to list mapped files")
@pytest.mark.parametrize("layout", ["diffusers", "diffusers-sharded"])
def test_a_loaded_model_keeps_no_weight_file_mapped(layout, saved, monkeypatch):
    """The loader copies a memory-mapped file's tensors into owned memory one file at a time: once
    loaded, no weight file stays mapped (an output written over it cannot change the live model, and the
    file's pages do not count twice), and every shard was released before the next was copied."""
    import gc

    def mapped(files):
        maps = Path("/proc/self/maps").read_text()
        return {f.name for f in files if str(f.resolve()) in maps}

    ckpt = find_wan_checkpoint(saved[layout])
    seen = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: (collect(*a), seen.append(mapped(ckpt.weight_files)))[0])
    model = load_wan_transformer(saved[layout])
    assert mapped(ckpt.weight_files) == set()
    files = [f.name for f in ckpt.weight_files]
    assert len(seen) >= len(files)  # one release point per file
    for k, still in enumerate(seen[:len(files)]):  # after copying file k: files 0..k are released
        assert not still & set(files[:k + 1]), (k, still)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_pipeline_loads_the_transformer_subfolder(saved):
    ckpt = find_wan_checkpoint(saved["pipeline"])
    assert ckpt.subfolder == "transformer"
    assert ckpt.root == saved["pipeline"]
    assert ckpt.model_dir == saved["pipeline"] / "transformer"


def test_original_layout_uses_the_published_tensor_names(tiny, saved):
    cfg = tiny[0].config
    expected = {
        f"{m}.{p}"
        for m in ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0",
                  "time_embedding.2", "time_projection.1", "head.head")
        for p in ("weight", "bias")
    } | {"head.modulation"}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        expected.add(f"{b}.modulation")
        for attn in ("self_attn", "cross_attn"):
            expected |= {f"{b}.{attn}.{x}.{p}" for x in "qkvo" for p in ("weight", "bias")}
            expected |= {f"{b}.{attn}.norm_q.weight", f"{b}.{attn}.norm_k.weight"}
        expected |= {f"{b}.norm3.weight", f"{b}.norm3.bias"}
        expected |= {f"{b}.ffn.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
    assert set(read_header(saved["original"])) == expected
    config = json.loads((saved["original"] / "config.json").read_text())
    assert config["_class_name"] == "WanModel" and config["dim"] == 32 and config["num_heads"] == 2


def test_original_layout_goes_through_the_diffusers_converter(tiny, saved, monkeypatch):
    from diffusers.loaders import single_file_utils

    # The inverse key table, undone by diffusers' converter, gives back the model's own tensors.
    converted = single_file_utils.convert_wan_transformer_to_diffusers(read_state_dict(saved["original"]))
    want = tiny[0].state_dict()
    assert set(converted) == set(want)
    assert all(torch.equal(converted[k], want[k]) for k in want)

    calls = []
    real = single_file_utils.convert_wan_transformer_to_diffusers

    def spy(checkpoint, **kwargs):
        calls.append(set(checkpoint))
        return real(checkpoint, **kwargs)

    monkeypatch.setattr(single_file_utils, "convert_wan_transformer_to_diffusers", spy)
    load_wan_transformer(saved["original"])
    assert any("head.modulation" in keys and "blocks.0.self_attn.q.weight" in keys for keys in calls)


def test_comfyui_prefixed_single_file_loads(tiny, tmp_path):
    model, inputs, ref = tiny
    path = save_tiny_wan(model, tmp_path, "original-file", key_prefix="model.diffusion_model.")
    ckpt = find_wan_checkpoint(path, num_heads=TINY_HEADS)
    assert ckpt.key_prefix == "model.diffusion_model." and ckpt.config_source == "inferred from tensor shapes"
    with torch.no_grad():
        assert torch.equal(load_wan_transformer(path, num_heads=TINY_HEADS)(**inputs).sample, ref)


def test_bfloat16_load_keeps_the_same_fp32_modules_on_both_paths(saved):
    a = load_wan_transformer(saved["diffusers"], dtype=torch.bfloat16)  # from_pretrained
    b = load_wan_transformer(saved["original"], dtype="bf16")  # converter + load_state_dict
    da = {k: v.dtype for k, v in a.state_dict().items()}
    assert da == {k: v.dtype for k, v in b.state_dict().items()}
    assert da["scale_shift_table"] == torch.float32 and da["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

# config.json of the original releases (Wan-AI/Wan2.1-T2V-1.3B and -14B).
ORIGINAL_RELEASE_CONFIGS = {
    "wan2.1-1.3b.json": {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06,
                         "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12,
                         "num_layers": 30, "out_dim": 16, "text_len": 512},
    "wan2.1-14b.json": {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 5120, "eps": 1e-06,
                        "ffn_dim": 13824, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 40,
                        "num_layers": 40, "out_dim": 16, "text_len": 512},
}


def _recipe_kwargs(name: str) -> dict:
    cfg = json.loads((RECIPES / name).read_text())
    assert cfg["_class_name"] == "WanTransformer3DModel"
    out = {k: v for k, v in cfg.items() if not k.startswith("_")}
    out["patch_size"] = tuple(out["patch_size"])
    return out


@pytest.mark.parametrize("name", sorted(ORIGINAL_RELEASE_CONFIGS))
def test_original_release_config_maps_to_the_published_diffusers_config(name):
    assert wan_original_config_to_diffusers(ORIGINAL_RELEASE_CONFIGS[name]) == _recipe_kwargs(name)


@pytest.mark.parametrize("name", sorted(ORIGINAL_RELEASE_CONFIGS))
def test_config_inferred_from_shapes_matches_the_published_one(name):
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    kwargs = _recipe_kwargs(name)
    with init_empty_weights():
        meta = WanTransformer3DModel(**kwargs)
    shapes = {wan_key_to_original(k): v.shape for k, v in meta.state_dict().items()}
    inferred = infer_wan_original_config(shapes)  # heads = dim // 128
    assert inferred["num_heads"] == kwargs["num_attention_heads"]
    assert wan_original_config_to_diffusers(inferred) == kwargs


def test_explicit_config_overrides_inference(saved):
    cfg = json.loads((saved["original"] / "config.json").read_text())
    ckpt = find_wan_checkpoint(saved["original-file"], config=cfg)
    assert ckpt.config_source == "given" and ckpt.config["num_attention_heads"] == TINY_HEADS


# ----------------------------------------------------------------------------------------------
# Bad input: each raises CheckpointError with a one-line message naming the path
# ----------------------------------------------------------------------------------------------


def _expect_error(path, *needles, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_wan_transformer(path, **kwargs)
    msg = str(info.value)
    assert isinstance(info.value, M4VError)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def _rewrite(file: Path, edit) -> None:
    state = read_state_dict(file)
    edit(state)
    save_file(state, str(file))


def test_missing_path(tmp_path):
    _expect_error(tmp_path / "nope", str(tmp_path / "nope"), "does not exist")


def test_empty_folder(tmp_path):
    _expect_error(tmp_path, str(tmp_path), "empty", "config.json")


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    _expect_error(tmp_path, str(tmp_path), "no Wan2.1 checkpoint")


def test_pickle_only_folder(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    _expect_error(tmp_path, str(tmp_path), "pickle")


@pytest.mark.parametrize("layout,file", [
    ("diffusers", "diffusion_pytorch_model.safetensors"),
    ("original-sharded", "diffusion_pytorch_model-00002-of-00003.safetensors"),
])
def test_truncated_safetensors(layout, file, saved, tmp_path):
    folder = _copy(saved[layout], tmp_path / layout)
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[: len(data) - 100])
    _expect_error(folder, str(folder / file), "truncated or corrupt")


def test_missing_shard(saved, tmp_path):
    folder = _copy(saved["diffusers-sharded"], tmp_path / "ckpt")
    shard = sorted(folder.glob("*-of-*.safetensors"))[1]
    shard.unlink()
    _expect_error(folder, shard.name, "missing")


def test_config_of_another_architecture(saved, tmp_path):
    folder = _copy(saved["diffusers"], tmp_path / "ckpt")
    flux = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.33.0", "num_layers": 8,
            "num_single_layers": 16, "attention_head_dim": 64, "num_attention_heads": 30, "in_channels": 64}
    (folder / "config.json").write_text(json.dumps(flux))
    _expect_error(folder, str(folder / "config.json"), "FluxTransformer2DModel", "WanTransformer3DModel")


def test_weights_of_another_architecture(tmp_path):
    flux = {f"single_transformer_blocks.0.attn.to_{x}.weight": torch.zeros(4, 4) for x in "qkv"}
    flux["x_embedder.weight"] = torch.zeros(4, 4)
    save_file(flux, str(tmp_path / "flux.safetensors"))
    _expect_error(tmp_path / "flux.safetensors", "flux.safetensors", "Flux", "WanTransformer3DModel")


def test_pipeline_with_another_transformer(saved, tmp_path):
    folder = _copy(saved["pipeline"], tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="FluxPipeline", transformer=["diffusers", "FluxTransformer2DModel"])
    (folder / "model_index.json").write_text(json.dumps(index))
    _expect_error(folder, "model_index.json", "FluxTransformer2DModel", "WanTransformer3DModel")


def test_missing_key_diffusers_layout(saved, tmp_path):
    folder = _copy(saved["diffusers"], tmp_path / "ckpt")
    _rewrite(folder / "diffusion_pytorch_model.safetensors", lambda s: s.pop("blocks.1.attn2.to_k.weight"))
    _expect_error(folder, str(folder), "1 missing tensor", "blocks.1.attn2.to_k.weight")


def test_missing_key_original_layout_is_named_in_original_terms(saved, tmp_path):
    folder = _copy(saved["original"], tmp_path / "ckpt")
    _rewrite(folder / "diffusion_pytorch_model.safetensors", lambda s: s.pop("blocks.1.norm3.bias"))
    _expect_error(folder, str(folder), "missing", "blocks.1.norm3.bias")


def test_unexpected_key(saved, tmp_path):
    folder = _copy(saved["original"], tmp_path / "ckpt")
    _rewrite(folder / "diffusion_pytorch_model.safetensors",
             lambda s: s.__setitem__("blocks.0.self_attn.extra.weight", torch.ones(3)))
    _expect_error(folder, "unexpected", "blocks.0.self_attn.extra.weight")


def test_shape_mismatch_with_config(saved, tmp_path):
    folder = _copy(saved["diffusers"], tmp_path / "ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["ffn_dim"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    _expect_error(folder, str(folder), "shape mismatch", "blocks.0.ffn.net.0.proj.weight is [64, 32]", "[48, 32]")


def test_heads_cannot_be_inferred_without_override(saved):
    _expect_error(saved["original-file"], str(saved["original-file"]), "num_heads", "128")


def test_num_heads_contradicting_the_config(saved):
    _expect_error(saved["original"], "contradicts", num_heads=4)


# ----------------------------------------------------------------------------------------------
# safetensors_io
# ----------------------------------------------------------------------------------------------


def test_read_state_dict_prefix_filter_and_metadata(saved):
    state = read_state_dict(saved["original-sharded"], prefix_filter="blocks.1.")
    assert state and all(k.startswith("blocks.1.") for k in state)
    assert read_metadata(saved["original"]) == {"format": "pt"}
    assert read_metadata(saved["original"] / "diffusion_pytorch_model.safetensors") == {"format": "pt"}


def test_index_naming_a_tensor_its_shard_lacks(saved, tmp_path):
    folder = _copy(saved["original-sharded"], tmp_path / "ckpt")
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["head.modulation"] = "diffusion_pytorch_model-00003-of-00003.safetensors"
    index["weight_map"]["blocks.9.ffn.0.weight"] = "diffusion_pytorch_model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not in the shard it names"):
        read_state_dict(folder)


def test_diffusers_folders_use_from_pretrained_offline(saved, monkeypatch):
    from diffusers import WanTransformer3DModel

    seen = []
    real = WanTransformer3DModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(WanTransformer3DModel, "from_pretrained", classmethod(spy))
    load_wan_transformer(saved["pipeline"])
    assert len(seen) == 1
    assert seen[0]["local_files_only"] is True and seen[0]["subfolder"] == "transformer"
    assert wan_io.os.environ.get("HF_HUB_OFFLINE") == "1"
