"""Recipes for new backbones (issue #8): the schema, the generic adapter, three diffusers backbones
converted with YAML only, ``recipes --check``, and every bad input refused before weights load."""

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from m4v_convert import load_converted
from m4v_convert.backbones.generic import model as G
from m4v_convert.backbones.generic.conversion import as_converted, check_recipe
from m4v_convert.errors import M4VError, RecipeError
from m4v_convert.recipes import RECIPES_DIR, available_recipes, load_recipe

runner = CliRunner()


# ------------------------------------------------------------------------------------------ tiny models


def tiny_cogvideox(**overrides):
    """CogVideoX-5B's layout (RoPE), tiny; ``overrides`` give the other variants."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
               text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
               max_text_seq_length=8, use_rotary_positional_embeddings=True)
    return CogVideoXTransformer3DModel(**{**cfg, **overrides}).eval()


def tiny_ltx():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                      cross_attention_dim=24, num_layers=2, caption_channels=10).eval()


def tiny_hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=12,
        pooled_projection_dim=6, rope_axes_dim=(4, 6, 6), guidance_embeds=True).eval()


def cog_inputs(b=2):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    g = torch.Generator().manual_seed(1)
    cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), 3)
    return {"hidden_states": torch.randn(b, 3, 4, 8, 8, generator=g), "encoder_hidden_states":
            torch.randn(b, 5, 12, generator=g), "timestep": torch.tensor([100.0, 700.0][:b]),
            "image_rotary_emb": (cos, sin)}


def ltx_inputs(b=2):
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(b, 3 * 4 * 4, 4, generator=g), "encoder_hidden_states":
            torch.randn(b, 5, 10, generator=g), "timestep": torch.tensor([10.0, 900.0][:b]),
            "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]][:b]),
            "num_frames": 3, "height": 4, "width": 4}


def hunyuan_inputs(b=2):
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(b, 4, 3, 8, 8, generator=g), "encoder_hidden_states":
            torch.randn(b, 5, 12, generator=g), "timestep": torch.tensor([10.0, 900.0][:b]),
            "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]][:b]),
            "pooled_projections": torch.randn(b, 6, generator=g), "guidance": torch.full((b,), 6000.0)}


BACKBONES = {
    "cogvideox": (tiny_cogvideox, cog_inputs, (2, 3, 4, 8, 8)),
    "ltx-video": (tiny_ltx, ltx_inputs, (2, 48, 4)),
    "hunyuanvideo": (tiny_hunyuan, hunyuan_inputs, (2, 4, 3, 8, 8)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, (make, _, _) in BACKBONES.items():
        make().save_pretrained(root / name)
        out[name] = root / name
    return out


def _recipe_file(tmp_path: Path, base: str, edit) -> Path:
    data = yaml.safe_load((RECIPES_DIR / f"{base}.yaml").read_text())
    data["published"] = {k: str(RECIPES_DIR / v) for k, v in (data.get("published") or {}).items()}
    edit(data)
    path = tmp_path / f"{base}-edited.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ every recipe


@pytest.mark.parametrize("name", available_recipes())
def test_every_shipped_recipe_loads_and_builds(name):
    r = load_recipe(name)
    assert r.name == name and r.description and r.to_dict()["name"] == name
    assert r.published and all(p.is_file() for p in r.published.values())
    if r.backbone != "generic":
        return
    for model in r.published:  # full-size published configs, on the meta device
        report = check_recipe(r, model=model)
        assert report.layers and set(report.selected) == {i.index for i in report.layers}
        cfg = json.loads(r.published[model].read_text())
        assert all(i.heads * i.head_dim == i.d_model for i in report.layers)
        assert report.layers[0].heads == cfg["num_attention_heads"]


def test_published_layer_counts():
    counts = {("cogvideox", "5b"): 42, ("cogvideox", "2b"): 30, ("ltx-video", "2b"): 28,
              ("hunyuanvideo", "13b"): 40, ("wan2.2-ti2v", "5b"): 30}
    for (name, model), n in counts.items():
        assert len(check_recipe(load_recipe(name), model=model).layers) == n


# ------------------------------------------------------------------------------------------ bad input


def _bad(tmp_path, base, edit, *expect):
    path = _recipe_file(tmp_path, base, edit)
    with pytest.raises(M4VError) as e:
        check_recipe(load_recipe(path), model=next(iter(load_recipe(base).published)))
    text = str(e.value)
    assert str(path) in text
    for part in expect:
        assert part in text, text
    return text


def test_schema_errors_name_file_line_and_field(tmp_path):
    text = _bad(tmp_path, "cogvideox", lambda d: d["attention"].update(qq="to_q"),
                "unknown field 'attention.qq'", "expected one of")
    assert ": line " in text
    _bad(tmp_path, "cogvideox", lambda d: d["attention"].update(heads=[2]), "field 'attention.heads'", "int or str")
    _bad(tmp_path, "cogvideox", lambda d: d["tokens"].update(layout="interleaved"), "field 'tokens.layout'",
         "video_only")
    _bad(tmp_path, "cogvideox", lambda d: d["tokens"].pop("text_order"), "tokens.text_order", "first or last")
    _bad(tmp_path, "ltx-video", lambda d: d["grid"].pop("args"), "grid.args")
    _bad(tmp_path, "ltx-video", lambda d: d["rope"].update(span="some_heads"), "field 'rope.span'")
    _bad(tmp_path, "cogvideox", lambda d: d.pop("attention"), "field 'attention'", "backbone 'generic'")
    _bad(tmp_path, "wan2.2-ti2v", lambda d: d["attention"].update(pattern="blocks.(\\d+.attn1"),
         "attention.pattern", "regular expression")
    _bad(tmp_path, "wan2.1", lambda d: d["calib"].update(teacher_first_frame_steps=20),
         "calib.teacher_first_frame_steps", "only used by backbone 'pyramidflow'")
    # several mistakes: one line each
    text = _bad(tmp_path, "cogvideox", lambda d: (d["grid"].update(layout="CFHW"), d["model"].update(klass=1)),
                "grid.layout", "model.klass")
    assert len(text.splitlines()) == 2


def test_model_level_errors_are_refused_on_the_meta_model(tmp_path):
    _bad(tmp_path, "cogvideox", lambda d: d["attention"].update(pattern=r"transformer_blocks\.(\d+)\.attn9"),
         "'attention.pattern'", "matches no module", "transformer_blocks.0.attn1")
    _bad(tmp_path, "cogvideox",
         lambda d: d["attention"].update(pattern=r"transformer_blocks\.(\d+)\.ff", **{"class": None}),
         "transformer_blocks.0.ff", "not an attention layer", "attention.q.path")
    _bad(tmp_path, "cogvideox", lambda d: d["attention"].update(pattern=r"transformer_blocks\.(\d+)\.norm1"),
         "CogVideoXLayerNormZero", "not an attention module of class ['Attention']")
    _bad(tmp_path, "cogvideox", lambda d: d["attention"].update(heads=7, head_dim=None),
         "disagrees with the declared heads", "attention.heads")
    _bad(tmp_path, "hunyuanvideo", lambda d: d["attention"]["out"].update(columns=[0, "6*inner"]),
         "attention.out.columns", "out of range")
    _bad(tmp_path, "ltx-video", lambda d: d["rope"].update(module="rotary"), "rope.module", "no such submodule")
    _bad(tmp_path, "ltx-video", lambda d: d["grid"]["args"].update(frames="frames"), "grid.args.frames",
         "not an argument")
    _bad(tmp_path, "ltx-video", lambda d: d["mmdim"].update(bc_norm="per_group"), "attention.q_norm", "mmdim.bc_norm")


def test_bad_recipes_are_refused_before_weights_load(checkpoints, tmp_path):
    # the checkpoint has a config and NO weights: each error must come from the recipe check
    ckpt = tmp_path / "config-only"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((checkpoints["hunyuanvideo"] / "config.json").read_text())
    cases = [
        (lambda d: d["attention"].update(heads=3, head_dim=None), "declared heads"),
        (lambda d: d["attention"]["out"].update(columns=[16, "6*inner"]), "out of range"),
        (lambda d: d["attention"].update(pattern=r"single_transformer_blocks\.(\d+)\.norm"), "not an attention"),
        (lambda d: d["attention"].update(bogus=1), "unknown field 'attention.bogus'"),
    ]
    for i, (edit, expect) in enumerate(cases):
        path = _recipe_file(tmp_path, "hunyuanvideo", edit)
        out = tmp_path / f"out{i}"
        res = runner.invoke(app, ["convert", str(path), "--checkpoint", str(ckpt), "--out", str(out),
                                  "--device", "cpu"])
        text = " ".join(res.output.split())
        assert res.exit_code != 0 and "Traceback" not in res.output and expect in text, text
        assert not out.exists()
    # the recipe is fine: now it is the missing weights that stop it (from the folder, before loading)
    res = runner.invoke(app, ["convert", "hunyuanvideo", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"),
                              "--device", "cpu"])
    assert res.exit_code == 2 and "no safetensors weights found in" in " ".join(res.output.split())


def test_checkpoint_of_another_class_is_refused(checkpoints, tmp_path):
    res = runner.invoke(app, ["convert", "cogvideox", "--checkpoint", str(checkpoints["ltx-video"]),
                              "--out", str(tmp_path / "o")])
    text = " ".join(res.output.split())
    assert res.exit_code != 0 and "LTXVideoTransformer3DModel" in text and "model.class" in text


# ------------------------------------------------------------------------------------------ recipes --check


def test_recipes_check_lists_the_right_layers(checkpoints):
    res = runner.invoke(app, ["recipes", "--check", "hunyuanvideo", "--checkpoint", str(checkpoints["hunyuanvideo"]),
                              "--layers", "1"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    rows = [ln for ln in lines if "single_transformer_blocks." in ln]
    assert len(rows) == 2 and not [ln for ln in lines if ln.split()[1:2] == ["transformer_blocks.0.attn"]]
    assert "kept" in rows[0] and "-> MM-DiM" in rows[1] and "cols[0:32]" in rows[1]
    assert "2 attention layers match" in res.output and "nothing was converted" in res.output
    full = runner.invoke(app, ["recipes", "--check", "cogvideox", "--model", "5b"])
    assert full.exit_code == 0 and "transformer_blocks.41.attn1" in full.output and "48×64" in full.output
    listing = runner.invoke(app, ["recipes"])
    assert listing.exit_code == 0 and "cogvideox" in listing.output and "wan2.1" in listing.output


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_converts_through_the_cli(name, checkpoints, tmp_path):
    _, inputs, shape = BACKBONES[name]
    out = tmp_path / "out"
    extra = ["--stage2-steps", "1"] if name == "cogvideox" else ["--stage2-steps", "0"]
    res = runner.invoke(app, ["convert", name, "--checkpoint", str(checkpoints[name]), "--out", str(out),
                              "--distill-steps", "1", "--device", "cpu", *extra])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "conversion.json").read_text())
    flops = json.loads((out / "flops.json").read_text())
    assert summary["layers"] == [0, 1] and summary["recipe"] == name
    assert set(summary["error_after"]) == {"0", "1"}
    assert flops["converted_layers_flops"] < flops["attention_layers_flops"]
    model = load_converted(out)
    assert type(model).__name__.startswith("M4V") and model.converted_layers == [0, 1]
    saved = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    state = model.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    assert any(".mmdim.mixer.in_proj.weight" in k for k in saved)
    with torch.no_grad():
        y = model(**inputs(), return_dict=False)[0]
        y2 = load_converted(out)(**inputs(), return_dict=False)[0]
    assert tuple(y.shape) == shape and torch.isfinite(y).all() and torch.equal(y, y2)


def test_converted_model_keeps_forward_signature_and_return_structure(checkpoints):
    import inspect

    from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel

    cls = G.converted_class("CogVideoXTransformer3DModel")
    assert list(inspect.signature(cls.forward).parameters) == \
        list(inspect.signature(CogVideoXTransformer3DModel.forward).parameters)
    r = load_recipe("hunyuanvideo")
    teacher = HunyuanVideoTransformer3DModel.from_pretrained(str(checkpoints["hunyuanvideo"])).eval()
    student = G.converted_class("HunyuanVideoTransformer3DModel").from_teacher(teacher, r.spec, r.raw)
    infos = G.selected_infos(student, r.spec, dict(student.config), r.mmdim, [0])
    student.convert_(infos, r.mmdim)
    seen = {}
    attn = student.single_transformer_blocks[0].attn
    attn.register_forward_hook(lambda m, a, o: seen.update(out=o))
    with torch.no_grad():
        student(**hunyuan_inputs(), return_dict=False)
    video, text = seen["out"]  # (video, text), as the original attention returns
    assert video.shape == (2, 48, 32) and text.shape == (2, 5, 32)
    assert isinstance(student.single_transformer_blocks[0].proj_out, G.FusedOutputRemainder)
    assert isinstance(student.single_transformer_blocks[1].proj_out, torch.nn.Linear)  # not converted


# ------------------------------------------------------------------------------------------ adapter details


def test_generic_recipe_converts_wan_exactly_like_the_wan_adapter():
    """wan2.2-ti2v.yaml (generic path) on a WanTransformer3DModel == the dedicated Wan adapter."""
    from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel, record_teacher_layers
    from m4v_convert.backbones.wan.testing import make_tiny_wan, tiny_wan_inputs

    teacher = make_tiny_wan()
    r, wan = load_recipe("wan2.2-ti2v"), load_recipe("wan2.1")
    assert r.mmdim == wan.mmdim
    torch.manual_seed(0)
    a = M4VWanTransformer3DModel.from_teacher(teacher)
    a.convert_([0, 1], wan.mmdim)
    torch.manual_seed(0)
    b = G.converted_class("WanTransformer3DModel").from_teacher(teacher, r.spec, r.raw)
    b.convert_(G.selected_infos(b, r.spec, dict(b.config), r.mmdim, [0, 1]), r.mmdim)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    batch = tiny_wan_inputs(teacher, batch=2)
    batch["encoder_hidden_states"][0, 3:] = 0  # padding rows
    with torch.no_grad():
        assert torch.equal(a(**batch, return_dict=False)[0], b(**batch, return_dict=False)[0])
    ref = record_teacher_layers(teacher, batch, [0, 1])
    gen_teacher = as_converted(copy.deepcopy(teacher), r)
    got = G.record_teacher_layers(gen_teacher, batch, G.selected_infos(gen_teacher, r.spec, dict(teacher.config),
                                                                        r.mmdim, [0, 1]))
    for i in (0, 1):
        assert torch.equal(ref[i].hidden_states, got[i].hidden_states) and torch.equal(ref[i].output, got[i].output)
        assert torch.equal(ref[i].pre_out, got[i].pre_out)
        for key in ("text", "text_mask"):
            assert torch.equal(ref[i].context[key], got[i].context[key])
        assert ref[i].context["layout"] == got[i].context["layout"]
        assert all(torch.equal(x, y) for x, y in zip(ref[i].context["rotary"], got[i].context["rotary"]))


def test_fused_qkv_slices_give_the_unfused_init(tmp_path):
    model = tiny_cogvideox()
    r = load_recipe("cogvideox")
    fused_path = _recipe_file(tmp_path, "cogvideox", lambda d: d["attention"].update(
        q={"path": "to_qkv", "rows": [0, "inner"]}, k={"path": "to_qkv", "rows": ["inner", "2*inner"]},
        v={"path": "to_qkv", "rows": ["2*inner", "3*inner"]}))
    rf = load_recipe(fused_path)
    fused = copy.deepcopy(model)
    fused.fuse_qkv_projections()
    cls = G.converted_class("CogVideoXTransformer3DModel")
    torch.manual_seed(0)
    a = cls.from_teacher(model, r.spec, r.raw)
    a.convert_(G.selected_infos(a, r.spec, dict(a.config), r.mmdim, [0]), r.mmdim)
    torch.manual_seed(0)
    b = cls.from_teacher(fused, rf.spec, rf.raw)
    b.convert_(G.selected_infos(b, rf.spec, dict(b.config), rf.mmdim, [0]), rf.mmdim)
    ma, mb = a.transformer_blocks[0].attn1.mmdim.state_dict(), b.transformer_blocks[0].attn1.mmdim.state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    bad = _recipe_file(tmp_path, "cogvideox", lambda d: d["attention"].update(
        q={"path": "to_qkv", "rows": [0, "inner"]}, k={"path": "to_qkv", "rows": ["inner", "2*inner"]},
        v={"path": "to_qkv", "rows": ["3*inner", "4*inner"]}))
    rb = load_recipe(bad)
    with pytest.raises(RecipeError, match=r"attention\.v\.rows.*out of range"):
        G.selected_infos(fused, rb.spec, dict(fused.config), rb.mmdim, [0])


def test_rope_tables_per_head_match_rotating_each_head():
    from m4v_convert.layers.mixer import apply_rotary_interleaved, apply_rotary_table, rotary_table

    g = torch.Generator().manual_seed(0)
    n_tok, heads, n = 6, 3, 8
    theta = torch.rand(n_tok, heads * n // 2, generator=g) * 6
    cos, sin = theta.cos().repeat_interleave(2, -1), theta.sin().repeat_interleave(2, -1)
    x = torch.randn(2, n_tok, heads, n, generator=g)
    got = apply_rotary_table(x, rotary_table(cos, sin, groups=heads))
    for h in range(heads):
        sl = slice(h * n, (h + 1) * n)
        ref = apply_rotary_interleaved(x[:, :, h:h + 1], cos[:, sl], sin[:, sl])
        assert torch.allclose(got[:, :, h:h + 1], ref, atol=1e-6)
    # shapes a model may hand over: (N, w), (b, N, w), Wan's (1, N, 1, w)
    t = torch.randn(n_tok, n)
    for shaped in (t, t[None].expand(2, -1, -1), t[None, :, None]):
        c, _ = G.rope_tables((shaped, shaped), "head", heads, n, n_tok)
        assert c.shape[-2:] == (n_tok, n)
    with pytest.raises(M4VError, match="width"):
        G.rope_tables((t, t), "all_heads", heads, n, n_tok)


def test_single_file_checkpoint_with_a_published_config(tmp_path):
    """model.single_file: an original-layout .safetensors (LTX key names) + the recipe's config."""
    from safetensors.torch import save_file

    model = tiny_ltx()
    rename = (("proj_in", "patchify_proj"), ("time_embed", "adaln_single"), ("norm_q", "q_norm"), ("norm_k", "k_norm"))
    original = {}
    for k, v in model.state_dict().items():
        for a, b in rename:
            k = k.replace(a, b)
        original["model.diffusion_model." + k] = v.contiguous()
    save_file(original, str(tmp_path / "ltx.safetensors"))
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}
    (tmp_path / "tiny.json").write_text(json.dumps({"_class_name": "LTXVideoTransformer3DModel", **cfg}))
    path = _recipe_file(tmp_path, "ltx-video", lambda d: d.update(published={"tiny": str(tmp_path / "tiny.json")}))
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", str(path), "--checkpoint", str(tmp_path / "ltx.safetensors"), "--out",
                              str(out), "--distill-steps", "0", "--stage2-steps", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    state, teacher = load_converted(out).state_dict(), model.state_dict()
    kept = [k for k in teacher if ".attn1." not in k]
    assert kept and all(torch.equal(state[k], teacher[k]) for k in kept)
    # a file without single_file: true is refused with the field named
    res = runner.invoke(app, ["convert", "cogvideox", "--checkpoint", str(tmp_path / "ltx.safetensors"), "--out",
                              str(tmp_path / "o2")])
    assert res.exit_code != 0 and "single_file" in res.output


def test_docs_worked_example_is_a_valid_recipe(tmp_path):
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "recipes.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    data = yaml.safe_load(block)
    data["published"] = {"13b": str(RECIPES_DIR / "configs" / "hunyuanvideo-13b.json")}
    (tmp_path / "doc.yaml").write_text(yaml.safe_dump(data))
    report = check_recipe(load_recipe(tmp_path / "doc.yaml"), model="13b")
    assert len(report.layers) == 40 and report.layers[0].fused_out


# ------------------------------------------------------------------------------ the shared distillation job

def test_generic_conversion_resumes_after_an_interrupt_with_the_uninterrupted_weights(checkpoints, tmp_path,
                                                                                       interrupt_stage2):
    common = ["--distill-steps", "3", "--stage2-steps", "6", "--checkpoint-every", "2", "--mixed-precision", "no",
              "--device", "cpu"]

    def run(out, *extra):
        return runner.invoke(app, ["convert", "cogvideox", "--checkpoint", str(checkpoints["cogvideox"]), "--out",
                                   str(out), *common, *extra])

    ref = run(tmp_path / "ref", "--run-dir", str(tmp_path / "ref_run"))
    assert ref.exit_code == 0, ref.output
    summary = json.loads((tmp_path / "ref" / "conversion.json").read_text())
    stages = {int(k.removeprefix("stage")): s for k, s in summary["stages"].items()}
    assert stages[1]["steps"] == 3 and stages[2]["steps"] == 6
    assert stages[2]["end_to_end_after"] < stages[2]["end_to_end_before"]
    interrupt_stage2(4)
    state_dir = tmp_path / "run"
    res = run(tmp_path / "out", "--run-dir", str(state_dir))
    assert res.exit_code != 0 and not (tmp_path / "out").exists()
    assert json.loads((state_dir / "state.json").read_text())["step"] == 2
    interrupt_stage2(None)
    res = run(tmp_path / "out", "--resume", str(state_dir))
    assert res.exit_code == 0, res.output
    assert "stage2 step 2" in " ".join(res.output.split())
    a = load_file(str(tmp_path / "ref" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,expect", [
    (["--train", "lora"], "--train lora: not offered for generic recipes"),
    (["--grad-checkpointing"], "--grad-checkpointing: not offered for generic recipes"),
    (["--stages", "1,3"], None),
])
def test_generic_conversion_refuses_or_skips_what_it_does_not_offer(extra, expect, checkpoints, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", "cogvideox", "--checkpoint", str(checkpoints["cogvideox"]), "--out", str(out),
                              "--distill-steps", "1", "--device", "cpu", *extra])
    if expect:
        assert res.exit_code != 0 and expect in " ".join(res.output.split()) and "Traceback" not in res.output
        assert not out.exists()
    else:  # stage 3 is skipped, with the reason, and the run still lands
        assert res.exit_code == 0, res.output
        summary = json.loads((out / "conversion.json").read_text())
        stages = {int(k.removeprefix("stage")): s for k, s in summary["stages"].items()}
        assert "prediction type" in stages[3]["skipped"] and "stage 3" in res.output


@pytest.mark.parametrize("base,edit,expect", [
    ("pyramidflow-miniflux-768p", lambda d: d.pop("variant"),
     "field 'variant' backbone 'pyramidflow' needs this field (one of ['miniflux', 'sd3'])"),
    ("pyramidflow-miniflux-768p", lambda d: d.pop("resolution"),
     "field 'resolution' backbone 'pyramidflow' needs this field (one of ['384p', '768p'])"),
    ("ltx-video", lambda d: d.pop("grid"), "field 'grid' backbone 'generic' needs this section (see docs/recipes.md)"),
    ("wan2.1", lambda d: d.update(allow_double_stream=True),
     "field 'allow_double_stream' is only used by backbone 'pyramidflow'"),
    ("wan2.1", lambda d: d.update(inputs={"text_dim": 32}), "field 'inputs' is only used by backbone 'generic'"),
    ("pyramidflow-miniflux-384p", lambda d: d["mmdim"].update(bidirectional=True),
     "field 'mmdim.bidirectional' must be false for PyramidFlow: its attention is causal over frames "
     "(autoregressive generation), and a reversed scan would let every frame read the frames after it"),
    ("pyramidflow-miniflux-768p", lambda d: d["mmdim"].update(scan="alternate"),
     "field 'mmdim.scan' must be 'space' for PyramidFlow: its attention is causal over frames, and a time-major "
     "scan runs back through the frames at every other position (earlier frames would read later ones)"),
    ("wan2.1", lambda d: d["mmdim"].update(scan="diagonal"),
     "invalid mmdim settings: scan: expected one of space, time, alternate, got 'diagonal'"),
    ("wan2.1", lambda d: d["mmdim"].update(temporal_queries="pixels"),
     "invalid mmdim settings: temporal queries: expected one of frames, tokens, got 'pixels'"),
])
def test_backbone_specific_recipe_fields_come_from_the_registry_with_their_messages(tmp_path, base, edit, expect):
    """The fields a registry entry claims, requires or refuses, with the loader's messages word for word."""
    path = _recipe_file(tmp_path, base, edit)
    with pytest.raises(M4VError) as e:
        load_recipe(path)
    assert expect in " ".join(str(e.value).split()), str(e.value)


# ------------------------------------------------------------------------------------------ every variant a recipe names


def tiny_cogvideox_2b():
    """CogVideoX-2B's layout: no RoPE (sin-cos position embeddings), so the pipeline passes no rotary table."""
    return tiny_cogvideox(use_rotary_positional_embeddings=False)


def tiny_cogvideox_1_5():
    """CogVideoX 1.5's layout (diffusers' own tiny test configuration): a patch spans 2 frames."""
    return tiny_cogvideox(patch_size_t=2, use_learned_positional_embeddings=False, patch_bias=False)


def tiny_wan22_ti2v():
    """Wan2.2 TI2V-5B's layout: 48 latent channels (the 16x-spatial Wan2.2 VAE)."""
    from m4v_convert.backbones.wan.testing import make_tiny_wan

    return make_tiny_wan(seed=3, in_channels=48, out_channels=48)


def cog_2b_inputs(b=2):
    # its sin-cos position table covers max_text_seq_length text tokens: the pipeline pads to it
    text = torch.randn(b, 8, 12, generator=torch.Generator().manual_seed(2))
    return {**cog_inputs(b), "encoder_hidden_states": text, "image_rotary_emb": None}


def cog_1_5_inputs(b=2):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    rope = get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), 2)  # 4 latent frames, 2 per patch
    return {**cog_inputs(b), "hidden_states": torch.randn(b, 4, 4, 8, 8, generator=torch.Generator().manual_seed(2)),
            "image_rotary_emb": rope}


def wan22_inputs(b=2):
    from m4v_convert.backbones.wan.testing import tiny_wan_inputs

    return tiny_wan_inputs(tiny_wan22_ti2v(), batch=b)


def _save_wan22_pipeline(root: Path, experts: int) -> Path:
    """A Wan2.2 Diffusers pipeline folder: transformer/ (and transformer_2/ for the A14B MoE pair)."""
    model = tiny_wan22_ti2v()
    model.save_pretrained(root / "transformer")
    index = {"_class_name": "WanPipeline", "expand_timesteps": experts == 1,
             "transformer": ["diffusers", "WanTransformer3DModel"]}
    if experts == 2:
        model.save_pretrained(root / "transformer_2")
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


# recipe -> {variant its description names: (tiny model of that layout, inputs, which folder to convert)};
# cogvideox 5B, LTX-Video 2B and HunyuanVideo 13B are the BACKBONES above
VARIANTS = {
    "cogvideox": {"2b": (tiny_cogvideox_2b, cog_2b_inputs, None), "1.5": (tiny_cogvideox_1_5, cog_1_5_inputs, None)},
    "wan2.2-ti2v": {"ti2v-5b": (None, wan22_inputs, 1), "a14b-expert": (None, wan22_inputs, 2)},
}


def test_every_shipped_generic_recipe_has_its_named_variants_checked():
    """A new shipped generic recipe must come with the variants its description names (issue 27, item 9)."""
    shipped = {n for n in available_recipes() if load_recipe(n).backbone == "generic"}
    assert shipped == set(BACKBONES) | set(VARIANTS) | {"wan2.2-ti2v"}
    assert "2B / 5B / 1.5" in load_recipe("cogvideox").description
    assert "TI2V-5B" in load_recipe("wan2.2-ti2v").description


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in VARIANTS.items() for v in vs])
def test_a_shipped_recipe_converts_every_variant_it_names(name, variant, tmp_path):
    make, inputs, experts = VARIANTS[name][variant]
    if experts is None:
        make().save_pretrained(tmp_path / "ckpt")
        ckpt = tmp_path / "ckpt"
    else:  # the pipeline folder itself (TI2V-5B) or one expert's folder of the A14B pair
        root = _save_wan22_pipeline(tmp_path / "pipe", experts)
        ckpt = root if experts == 1 else root / "transformer_2"
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", name, "--checkpoint", str(ckpt), "--out", str(out),
                              "--distill-steps", "1", "--stage2-steps", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    if variant == "1.5":  # its 3-frame synthetic calibration used to stop: "F = 3 is not a multiple of ... 2"
        assert "rounded up to this model's patch sizes" in " ".join(res.output.split())
    assert json.loads((out / "conversion.json").read_text())["layers"] == [0, 1]
    model = load_converted(out)  # the generic class, also where a family adapter has a class of the same name
    assert type(model).__module__ == G.__name__ and model.converted_layers == [0, 1]
    batch = inputs()
    with torch.no_grad():
        y = model(**batch, return_dict=False)[0]
        assert torch.isfinite(y).all() and y.shape == batch["hidden_states"].shape
        if name == "wan2.2-ti2v":  # the TI2V pipeline (expand_timesteps) passes one timestep per token
            b, _, f, h, w = batch["hidden_states"].shape
            per_token = batch["timestep"][:, None].expand(b, f * h * w // 4).contiguous()
            torch.testing.assert_close(model(**{**batch, "timestep": per_token}, return_dict=False)[0], y)


def test_a_generic_recipe_asking_for_gradient_checkpointing_is_refused(checkpoints, tmp_path):
    import yaml

    from m4v_convert.recipes import RECIPES_DIR

    data = yaml.safe_load((RECIPES_DIR / "cogvideox.yaml").read_text())
    data.setdefault("distill", {})["grad_checkpointing"] = True
    recipe = tmp_path / "cog.yaml"
    recipe.write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["convert", str(recipe), "--checkpoint", str(checkpoints["cogvideox"]),
                              "--out", str(tmp_path / "out"), "--distill-steps", "1"])
    assert res.exit_code == 2 and "distill.grad_checkpointing: not offered for generic recipes" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
