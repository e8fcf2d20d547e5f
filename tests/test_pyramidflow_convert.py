"""PyramidFlow miniFLUX → MM-DiM: swap, init, save/load, CLI end to end and its bad input, FLOPs."""

import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from cli import app
from m4v_convert import load_converted
from m4v_convert.backbones.pyramidflow import save_pyramidflow, token_layout
from m4v_convert.backbones.pyramidflow.converted import (
    M4VPyramidFluxTransformer,
    M4VPyramidDiffusionMMDiT,
    MMDiMSingleTransformerBlock,
    PyramidMMDiMAttention,
    PyramidMMDiMJointAttention,
    history_sources,
    video_layout,
)
from m4v_convert.backbones.pyramidflow.layout import apply_rope, rope_tables, sequence_position_ids
from m4v_convert.backbones.pyramidflow.testing import (
    make_tiny_miniflux,
    make_tiny_sd3,
    tiny_miniflux_config,
    tiny_pyramid_inputs,
)
from m4v_convert.errors import M4VError, RecipeError
from m4v_convert.io.converted import save_converted
from m4v_convert.recipes import RECIPES_DIR, load_recipe

MMDIM = {"bc_norm": "per_group", "rotary": True, "conv_activation": "identity", "num_registers": 3,
         "temporal_dim": 8, "temporal_heads": 2}
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """2 shared cores: oversubscribed BLAS threads make these tiny steps 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_miniflux(seed=3)  # 1 double-stream block (layer 0), 2 single-stream (layers 1, 2)


def _inputs(num_stages=3, seed=0):
    return tiny_pyramid_inputs(tiny_miniflux_config(), batch=2, num_stages=num_stages, num_history=3, seed=seed)


# ---------------------------------------------------------------- the swap and the init

def test_swap_replaces_exactly_the_single_stream_attentions(teacher):
    student = M4VPyramidFluxTransformer.from_teacher(teacher)
    assert student.convert_([2], MMDIM) == ["single_transformer_blocks.1"]
    assert student.converted_layers == [2]
    assert student.convert_([1, 2], MMDIM) == ["single_transformer_blocks.0"]
    assert student.converted_layers == [1, 2]
    assert type(student.transformer_blocks[0].attn) is type(teacher.transformer_blocks[0].attn)
    for j in (0, 1):
        blk, tblk = student.single_transformer_blocks[j], teacher.single_transformer_blocks[j]
        assert isinstance(blk, MMDiMSingleTransformerBlock) and isinstance(blk.attn, PyramidMMDiMAttention)
        assert blk.mmdim.config.layer_index == 1 + j and blk.mmdim.config.num_registers == 3
        d = tblk.proj_out.out_features
        mixer = blk.mmdim.mixer
        rows = {"x": tblk.attn.to_v, "B": tblk.attn.to_k, "C": tblk.attn.to_q}
        for k, (name, lin) in enumerate(rows.items(), start=1):
            assert torch.equal(mixer.in_proj.weight[k * d:(k + 1) * d], lin.weight), name
            assert torch.equal(mixer.in_proj.bias[k * d:(k + 1) * d], lin.bias), name
        assert torch.equal(mixer.C_norm.weight, tblk.attn.norm_q.weight)
        assert torch.equal(mixer.B_norm.weight, tblk.attn.norm_k.weight)
        # W_O = the attention columns of the fused proj_out; proj_out keeps the MLP columns and the bias
        assert torch.equal(mixer.out_proj.weight, tblk.proj_out.weight[:, :d]) and not mixer.out_proj.bias.any()
        assert torch.equal(blk.proj_out.weight, tblk.proj_out.weight[:, d:])
        assert torch.equal(blk.proj_out.bias, tblk.proj_out.bias)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for k, v in t_sd.items():
        if not k.startswith("single_transformer_blocks."):
            assert torch.equal(s_sd[k], v), k
        elif ".attn." not in k and ".proj_out." not in k:
            assert torch.equal(s_sd[k], v), k
    assert not any(k.startswith("single_transformer_blocks.") and ".attn.to_q." in k for k in s_sd)
    # untouched weights are the teacher's own tensors (one model in memory; tests/test_shared_weights.py),
    # and the forward takes the teacher's arguments
    assert student.x_embedder.weight is teacher.x_embedder.weight
    assert list(inspect.signature(type(student).forward).parameters) == \
        list(inspect.signature(type(teacher).forward).parameters)
    with pytest.raises(M4VError, match="out of range"):
        M4VPyramidFluxTransformer.from_teacher(teacher).convert_([3], MMDIM)


def test_swap_of_a_double_stream_block_takes_both_streams_weights(teacher):
    """A double-stream block keeps its MLPs and norms; its attention becomes an MM-DiM whose video
    rows come from to_q/k/v/to_out and whose text rows from add_q/k/v_proj/to_add_out."""
    student = M4VPyramidFluxTransformer.from_teacher(teacher)
    assert student.convert_([0], MMDIM) == ["transformer_blocks.0.attn"]
    assert student.converted_layers == [0]
    attn, t_attn = student.transformer_blocks[0].attn, teacher.transformer_blocks[0].attn
    assert isinstance(attn, PyramidMMDiMJointAttention) and attn.mmdim.config.text_projections
    mixer, d = attn.mmdim.mixer, 32
    for proj, out, norms, (q, k, v, o, nq, nk) in (
            (mixer.in_proj, mixer.out_proj, (mixer.C_norm, mixer.B_norm),
             (t_attn.to_q, t_attn.to_k, t_attn.to_v, t_attn.to_out[0], t_attn.norm_q, t_attn.norm_k)),
            (mixer.text_in_proj, mixer.text_out_proj, (mixer.text_C_norm, mixer.text_B_norm),
             (t_attn.add_q_proj, t_attn.add_k_proj, t_attn.add_v_proj, t_attn.to_add_out, t_attn.norm_added_q,
              t_attn.norm_added_k))):
        for i, lin in enumerate((v, k, q), start=1):
            assert torch.equal(proj.weight[i * d:(i + 1) * d], lin.weight)
            assert torch.equal(proj.bias[i * d:(i + 1) * d], lin.bias)
        assert torch.equal(out.weight, o.weight) and torch.equal(out.bias, o.bias)
        assert torch.equal(norms[0].weight, nq.weight) and torch.equal(norms[1].weight, nk.weight)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for key, value in t_sd.items():
        if not key.startswith("transformer_blocks.0.attn."):
            assert torch.equal(s_sd[key], value), key


def test_joint_init_is_causal_linear_attention_over_text_and_video(teacher):
    """Oracle for a converted double-stream block: the re-composed [text ; video] sequence, each
    token projected by its own stream's Q/K/V (norms and RoPE included), causal linear attention
    with decay, per-head RMS norm, then each stream's out projection."""
    student = M4VPyramidFluxTransformer.from_teacher(teacher)
    student.convert_([0], MMDIM)
    t_attn, attn = teacher.transformer_blocks[0].attn, student.transformer_blocks[0].attn
    kw = _inputs()
    layout = token_layout(kw["sample"], kw["encoder_attention_mask"])[2]
    g = torch.Generator().manual_seed(8)
    d, heads, hd, lz = 32, 2, 16, layout.text_len
    video = torch.randn(2, layout.video_len, d, generator=g)
    text = torch.randn(2, lz, d, generator=g)
    cos, sin = rope_tables(sequence_position_ids(layout), teacher.config.axes_dims_rope)
    with torch.no_grad():
        got_video, got_text = attn(video, encoder_hidden_states=text, image_rotary_emb=(cos, sin),
                                   token_layout=layout)
        cfg = attn.mmdim.config
        rc = attn.mmdim.recomposer(video_layout(layout))
        seq = rc.forward(video, attn.mmdim.register_tokens, text, layout.text_mask)
        rows = rc.text_rows(text, seq.device).view(1, -1, 1, 1)

        def qkv(q, k, v, nq, nk):
            return (nq(q(seq).unflatten(-1, (heads, hd))), nk(k(seq).unflatten(-1, (heads, hd))),
                    v(seq).unflatten(-1, (heads, hd)))

        vid = qkv(t_attn.to_q, t_attn.to_k, t_attn.to_v, t_attn.norm_q, t_attn.norm_k)
        txt = qkv(t_attn.add_q_proj, t_attn.add_k_proj, t_attn.add_v_proj, t_attn.norm_added_q, t_attn.norm_added_k)
        q, k, v = (torch.where(rows, b, a) for a, b in zip(vid, txt))
        rcos = rc.permute_rows(cos[lz:], torch.ones(hd), lz)
        rsin = rc.permute_rows(sin[lz:], torch.zeros(hd), lz)
        q, k = apply_rope(q, rcos, rsin), apply_rope(k, rcos, rsin)
        t = torch.arange(seq.shape[1])
        decay = math.exp(-cfg.A_init * cfg.dt_init)
        weights = torch.where(t[:, None] >= t[None, :], decay ** (t[:, None] - t[None, :]).double(), 0.0).float()
        scores = torch.einsum("bthp,bshp->bhts", q, k) * weights * cfg.dt_init
        y = torch.einsum("bhts,bshp->bthp", scores, v) * F.silu(torch.tensor(1.0))
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).flatten(-2)
        out = torch.where(rows.view(1, -1, 1), t_attn.to_add_out(y), t_attn.to_out[0](y))
        want_video, want_text = rc.inverse(out, text, layout.text_mask)
    torch.testing.assert_close(got_video, want_video, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_text, want_text, rtol=1e-4, atol=1e-5)
    mask = layout.text_mask
    assert got_text[~mask].abs().max() == 0 and got_text[mask].abs().min() > 0


def test_init_reproduces_normalized_causal_linear_attention_of_the_teacher(teacher):
    """At init the MM-DiM attention is, over the re-composed sequence, causal linear attention with
    the teacher's Q/K/V (q/k norms and RoPE included), decay e^{-A·dt} per token, RMS-normalized
    per head and projected by the attention columns of ``proj_out`` (the temporal branch is 0)."""
    student = M4VPyramidFluxTransformer.from_teacher(teacher)
    student.convert_([1], MMDIM)
    tblk, blk = teacher.single_transformer_blocks[0], student.single_transformer_blocks[0]
    kw = _inputs()
    layout = token_layout(kw["sample"], kw["encoder_attention_mask"])[2]  # top stage, with history at 3 levels
    g = torch.Generator().manual_seed(7)
    d, heads, hd = 32, 2, 16
    hs = torch.randn(2, layout.seq_len, d, generator=g)
    cos, sin = rope_tables(sequence_position_ids(layout), teacher.config.axes_dims_rope)  # the teacher's RoPE
    with torch.no_grad():
        got = blk.attn(hs, image_rotary_emb=(cos, sin), token_layout=layout)

        cfg = blk.mmdim.config
        lz = layout.text_len
        rc = blk.mmdim.recomposer(video_layout(layout))
        seq = rc.forward(hs[:, lz:], blk.mmdim.register_tokens, hs[:, :lz], layout.text_mask)
        q = tblk.attn.norm_q(tblk.attn.to_q(seq).unflatten(-1, (heads, hd)))
        k = tblk.attn.norm_k(tblk.attn.to_k(seq).unflatten(-1, (heads, hd)))
        v = tblk.attn.to_v(seq).unflatten(-1, (heads, hd))
        rcos = rc.permute_rows(cos[lz:], torch.ones(hd), lz)
        rsin = rc.permute_rows(sin[lz:], torch.zeros(hd), lz)
        q, k = apply_rope(q, rcos, rsin), apply_rope(k, rcos, rsin)
        n = seq.shape[1]
        t = torch.arange(n)
        decay = math.exp(-cfg.A_init * cfg.dt_init)
        weights = torch.where(t[:, None] >= t[None, :], decay ** (t[:, None] - t[None, :]).double(), 0.0).float()
        scores = torch.einsum("bthp,bshp->bhts", q, k) * weights * cfg.dt_init
        y = torch.einsum("bhts,bshp->bthp", scores, v) * F.silu(torch.tensor(1.0))  # z gate = silu(bias 1)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
        out = y.flatten(-2) @ tblk.proj_out.weight[:, :d].t()
        video, text = rc.inverse(out, hs[:, :lz], layout.text_mask)
    want = torch.cat([text, video], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # padded T5 rows give exactly zero, valid rows do not
    mask = layout.text_mask
    assert not mask.all() and got[:, :lz][~mask].abs().max() == 0 and got[:, :lz][mask].abs().min() > 0


def test_converted_model_keeps_the_teacher_path_outside_attention(teacher):
    """With the same attention output fed to both (teacher: before ``proj_out``; student: after the
    mixer's out projection = the attention columns), the converted model equals the teacher."""
    student = M4VPyramidFluxTransformer.from_teacher(teacher)
    student.convert_([1, 2], MMDIM)
    proj = torch.randn(32, 32, generator=torch.Generator().manual_seed(1))

    def fake_attention(hidden_states):
        return torch.tanh(hidden_states @ proj)

    class TeacherProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, token_layout=None):
            return fake_attention(hidden_states)

    class StudentAttention(torch.nn.Module):
        def __init__(self, w_o):
            super().__init__()
            self.w_o = w_o

        def forward(self, hidden_states, image_rotary_emb=None, attention_mask=None, token_layout=None):
            return fake_attention(hidden_states) @ self.w_o.t()

    import copy

    t = copy.deepcopy(teacher)
    for j, (tb, sb) in enumerate(zip(t.single_transformer_blocks, student.single_transformer_blocks)):
        tb.attn.set_processor(TeacherProcessor())
        sb.attn = StudentAttention(tb.proj_out.weight[:, :32].detach())
    kw = _inputs(seed=2)
    with torch.no_grad():
        for a, b in zip(student(**kw), t(**kw)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_registers_are_pyramid_levels_and_history_feeds_the_temporal_branch(teacher):
    kw = _inputs()
    layouts = token_layout(kw["sample"], kw["encoder_attention_mask"])
    top = layouts[2]
    assert [b.register for b in video_layout(top).blocks] == [b.level for b in top.blocks] == [0, 1, 2, 2]
    assert history_sources(top).tolist() == [True] * 3 + [False]
    # a one-stage call names its levels from m4v.full_grid (the recipe's resolution) …
    student = M4VPyramidFluxTransformer.from_teacher(teacher)
    student.convert_([1, 2], MMDIM, meta={"full_grid": [8, 12]})  # tiny top grid: (2, 3) · 4
    one = [kw["sample"][1]]
    mask = kw["encoder_attention_mask"][1::3]
    assert [b.level for b in student.token_layouts(one, mask)[0].blocks] == [0, 1, 1]
    # … and falls back to register 0 when it cannot (documented)
    student.register_to_config(m4v={**student.config["m4v"], "full_grid": [48, 80]})
    assert [b.level for b in student.token_layouts(one, mask)[0].blocks] == [None] * 3
    with torch.no_grad():
        for blk in student.single_transformer_blocks:  # registers that differ by level
            blk.attn.mmdim.register_tokens.normal_(std=1.0)
        out = student(one, kw["encoder_hidden_states"][1::3], mask, kw["pooled_projections"][1::3],
                      kw["timestep_ratio"][1::3])
        full = student(**kw)
        # a sampler's top grid (pyramid_top_grid) names them again: the stage's output in a full call
        with student.pyramid_top_grid((8, 12)):
            assert [b.level for b in student.token_layouts(one, mask)[0].blocks] == [0, 1, 1]
            named = student(one, kw["encoder_hidden_states"][1::3], mask, kw["pooled_projections"][1::3],
                            kw["timestep_ratio"][1::3])
    assert [b.level for b in student.token_layouts(one, mask)[0].blocks] == [None] * 3  # restored on exit
    torch.testing.assert_close(named[0], full[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], full[1], atol=1e-4)


def test_a_full_call_smaller_than_the_recipe_resolution_names_levels_by_stage(teacher):
    """The shipped 768p recipe calibrates on 24×40 latents, exactly two halvings of the 768p grid: a
    call holding every stage is levels 0, 1, 2 whatever its size (not 768p's −2, −1, 0)."""
    from m4v_convert.backbones.pyramidflow.calibration import (PyramidCalibSpec, pyramid_batch,
                                                               synthetic_pyramid_samples)

    student = M4VPyramidFluxTransformer.from_teacher(teacher)
    student.convert_([1, 2], MMDIM, meta={"full_grid": [48, 80]})
    spec = PyramidCalibSpec(4, 24, 20, latent_frames=3, latent_height=24, latent_width=40, text_len=6)
    kw = pyramid_batch(synthetic_pyramid_samples(spec, 1, 0), spec, torch.Generator().manual_seed(0))
    levels = [[b.level for b in lay.blocks] for lay in student.token_layouts(kw["sample"], kw["encoder_attention_mask"])]
    assert levels == [[0, 0, 0], [0, 1, 1], [1, 2, 2]]
    with torch.no_grad():
        assert all(torch.isfinite(v).all() for v in student(**kw))


def test_save_load_round_trip_is_bit_identical(teacher, tmp_path):
    student = M4VPyramidFluxTransformer.from_teacher(teacher)
    student.convert_([1, 2], MMDIM, meta={"full_grid": [8, 12]})
    with torch.no_grad():
        for p in student.single_transformer_blocks.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained" weights, not the init
    save_converted(student, tmp_path / "m" / "diffusion_transformer_768p", metadata={"recipe": "x"})
    loaded = load_converted(tmp_path / "m")  # finds the release-style subfolder
    assert type(loaded) is M4VPyramidFluxTransformer and loaded.converted_layers == [1, 2]
    assert loaded.config["m4v"]["full_grid"] == [8, 12]
    s_sd = student.state_dict()
    assert loaded.state_dict().keys() == s_sd.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, s_sd[k]), k
    kw = _inputs(seed=4)
    with torch.no_grad():
        for a, b in zip(loaded(**kw), student.eval()(**kw)):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def roots(tmp_path_factory, teacher):
    base = tmp_path_factory.mktemp("pf")
    save_pyramidflow(teacher, base / "miniflux", "768p")
    save_pyramidflow(teacher, base / "miniflux384", "384p")
    save_pyramidflow(make_tiny_sd3(seed=0), base / "sd3", "768p")
    return base


def _tiny_recipe(path, name="pyramidflow-miniflux-768p", **top):
    data = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    data["published"] = {k: str(RECIPES_DIR / v) for k, v in data["published"].items()}
    if data["variant"] == "miniflux":
        data["default_layers"] = "1-2"
    data["mmdim"].update(temporal_dim=8, temporal_heads=2)
    data["calib"].update(latent_frames=4, latent_height=8, latent_width=8, text_len=6, num_samples=6, batch_size=2)
    data["distill"]["grad_checkpointing"] = False  # a third faster; the recipe's default runs in the tests without --recipe
    data.update(top)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipes")
    return {"miniflux": _tiny_recipe(d / "mf.yaml"),
            "sd3": _tiny_recipe(d / "sd3.yaml", "pyramidflow-sd3-768p"),
            "allow": _tiny_recipe(d / "allow.yaml", allow_double_stream=True)}


def _convert(ckpt, out, recipe, *extra):
    # the memory plan (a meta-device step per stage before each run) is test_memory_plan's, PyramidFlow included
    return runner.invoke(app, ["pyramidflow", "--checkpoint", str(ckpt), "--out", str(out), "--recipe", str(recipe),
                               "--device", "cpu", "--threads", "1", "--no-memory-check", *extra])


def test_cli_converts_distills_and_writes_the_release_layout(roots, recipes, tmp_path):
    out = tmp_path / "converted"
    res = _convert(roots / "miniflux", out, recipes["miniflux"], "--distill-steps", "8")
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"diffusion_transformer_768p", "conversion.json", "README.md",
                                               "flops.json", "flops.md", "train_log.jsonl", "loss.png"}
    assert {p.name for p in (out / "diffusion_transformer_768p").iterdir()} == {
        "config.json", "diffusion_pytorch_model.safetensors", "m4v_transformer.py"}  # + diffusers' loader module
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["layers"] == [1, 2] and summary["calibration"] == "synthetic"
    for i in ("1", "2"):  # distillation reduced every layer's error
        assert summary["error_after"][i] < summary["error_before"][i]
    stage2 = summary["distill"]["stage2"]  # the recipe's stage 2 ran and is reported
    assert stage2["steps"] == 20 and f"{stage2['end_to_end_after']:.4f}" in (out / "README.md").read_text()
    assert "SYNTHETIC" in (out / "README.md").read_text().upper()
    flops = json.loads((out / "flops.json").read_text())
    assert [lay["index"] for lay in flops["layers"]] == [1, 2]
    model = load_converted(out)
    assert type(model) is M4VPyramidFluxTransformer and model.converted_layers == [1, 2]
    m4v = model.config["m4v"]
    assert m4v["recipe"] == "pyramidflow-miniflux-768p" and m4v["full_grid"] == [48, 80]
    assert set(m4v["layers"]) == {"1", "2"}
    from safetensors import safe_open

    with safe_open(str(out / "diffusion_transformer_768p" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.metadata()["layers"] == "1,2" and f.metadata()["format"] == "pt"
    with torch.no_grad():
        assert all(torch.isfinite(o).all() for o in model(**_inputs()))


def test_stage2_brings_the_whole_model_closer_to_the_teacher(roots, recipes, tmp_path):
    """Stage 2 alone (no stage 1): end-to-end error over all stages of held-out calls drops."""
    recipe = yaml.safe_load(recipes["miniflux"].read_text())
    recipe["distill"]["stage2"].update(lr=0.001)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = _convert(roots / "miniflux", tmp_path / "out", tmp_path / "r.yaml", "--distill-steps", "0",
                   "--stage2-steps", "30")
    assert res.exit_code == 0, res.output
    stage2 = json.loads((tmp_path / "out" / "conversion.json").read_text())["distill"]["stage2"]
    assert stage2["steps"] == 30 and stage2["end_to_end_after"] < 0.8 * stage2["end_to_end_before"], stage2
    off = _convert(roots / "miniflux", tmp_path / "off", tmp_path / "r.yaml", "--distill-steps", "0",
                   "--stage2-steps", "0")
    assert off.exit_code == 0 and json.loads((tmp_path / "off" / "conversion.json").read_text())[
        "distill"]["stage2"] == {"steps": 0}


@pytest.mark.parametrize("case", ["sd3_recipe_on_miniflux", "miniflux_recipe_on_sd3", "384p_root", "384p_folder",
                                  "no_subfolder", "fp16", "double_stream", "wan_recipe", "stages", "data_without_3",
                                  "wan_data", "resume_nowhere", "train_mode"])
def test_cli_bad_input_is_one_clear_message(case, roots, recipes, tmp_path):
    ckpt, recipe, extra = roots / "miniflux", recipes["miniflux"], ["--distill-steps", "1"]
    expect = {
        "sd3_recipe_on_miniflux": "not the sd3 one", "miniflux_recipe_on_sd3": "not the miniflux one",
        "384p_root": "no diffusion_transformer_768p", "384p_folder": "holds the 384p transformer",
        "no_subfolder": "not a PyramidFlow model folder", "fp16": "float16",
        "double_stream": "--layers: layers 0 are double-stream blocks (transformer_blocks.0-0), and this recipe does "
                         "not allow converting them (allow_double_stream: false)",
        "wan_recipe": "this command converts PyramidFlow",
        "stages": "--stages: expected a comma-separated subset of 1,2,3",
        "data_without_3": "--data is the fine-tune data of stage 3",
        "wan_data": "missing tensor 'text_mask'",
        "resume_nowhere": "--resume",
        "train_mode": "--train",
    }[case]
    if case == "sd3_recipe_on_miniflux":
        recipe = recipes["sd3"]
    elif case == "miniflux_recipe_on_sd3":
        ckpt = roots / "sd3"
    elif case == "384p_root":
        ckpt = roots / "miniflux384"
    elif case == "384p_folder":
        ckpt = roots / "miniflux384" / "diffusion_transformer_384p"
    elif case == "no_subfolder":
        (tmp_path / "empty").mkdir()
        ckpt = tmp_path / "empty"
    elif case == "fp16":
        extra += ["--dtype", "float16"]
    elif case == "double_stream":
        extra += ["--layers", "0-2"]
    elif case == "wan_recipe":
        recipe = "wan2.1"
    elif case == "stages":
        extra += ["--stages", "1,4"]
    elif case == "data_without_3":
        extra += ["--stages", "1,2", "--data", str(_pyramid_data(tmp_path / "data"))]
    elif case == "wan_data":  # the Wan --calib format (no text_mask / pooled) given as PyramidFlow --data
        from safetensors.torch import save_file

        (tmp_path / "wan").mkdir()
        save_file({"latents": torch.randn(4, 4, 8, 8), "text_embeds": torch.randn(6, 24)},
                  str(tmp_path / "wan" / "a.safetensors"))
        extra += ["--stages", "1,3", "--data", str(tmp_path / "wan")]
    elif case == "resume_nowhere":
        extra += ["--resume", str(tmp_path / "nowhere")]
    elif case == "train_mode":
        extra += ["--train", "everything"]
    out = tmp_path / "out"
    res = _convert(ckpt, out, recipe, *extra)
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert "error:" in text and expect.lower() in text.lower(), text
    assert not out.exists()
    if case == "double_stream":
        assert "(--layers 1-2)" in text and "allow_double_stream: true" in text


@pytest.mark.parametrize("variant", ["miniflux", "sd3"])
def test_cli_converts_double_stream_blocks_when_the_recipe_allows(variant, roots, recipes, tmp_path):
    """miniFLUX with allow_double_stream (all three blocks) and SD3 (its joint blocks, the last
    one context-pre-only): distilled, saved in the release layout, reloaded bit-identically."""
    ckpt, recipe, layers = ((roots / "miniflux", recipes["allow"], "0-2") if variant == "miniflux"
                            else (roots / "sd3", recipes["sd3"], "all"))
    out = tmp_path / "out"
    res = _convert(ckpt, out, recipe, "--distill-steps", "8", "--layers", layers)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "conversion.json").read_text())
    n = len(summary["layers"])
    assert n == 3 if variant == "miniflux" else n >= 2
    for i, before in summary["error_before"].items():
        assert summary["error_after"][i] < before, i
    model = load_converted(out)
    cls = M4VPyramidFluxTransformer if variant == "miniflux" else M4VPyramidDiffusionMMDiT
    assert type(model) is cls and model.converted_layers == summary["layers"]
    joint = [model.transformer_blocks[i].attn for i in summary["layers"] if i < model.config.num_layers]
    assert joint and all(isinstance(a, PyramidMMDiMJointAttention) for a in joint)
    if variant == "sd3":
        assert joint[-1].context_pre_only and not joint[0].context_pre_only
    flops = json.loads((out / "flops.json").read_text())
    assert flops["scope"].startswith("all blocks") and flops["converted_total_flops"] < flops["original_total_flops"]
    # reload = the saved model: compare with a second load (weights identical) on the same inputs
    again = load_converted(out)
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in again.state_dict().items())
    from m4v_convert.backbones.pyramidflow.testing import tiny_sd3_config

    config = tiny_miniflux_config() if variant == "miniflux" else tiny_sd3_config()
    kw = tiny_pyramid_inputs(config, batch=2, num_stages=3, num_history=3, seed=5)
    with torch.no_grad():
        for a, b in zip(model(**kw), again(**kw)):
            assert torch.equal(a, b) and torch.isfinite(a).all()


def test_flops_of_sd3_counts_the_joint_blocks():
    res = runner.invoke(app, ["flops", "pyramidflow-sd3-768p", "--no-crosscheck"])
    text = " ".join(res.output.split())
    assert res.exit_code == 0, text
    assert "all blocks (double-stream / joint blocks are converted too)" in text


def _pyramid_calib(folder, n=6, channels=4, frames=4, hw=8, lz=6, text_dim=24, pooled_dim=20, seed=0, **replace):
    """A --calib folder in the PyramidFlow format (two files: one batched, one single sample)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    mask = torch.zeros(n, lz, dtype=torch.long)
    for i in range(n):
        mask[i, : 1 + i % lz] = 1
    t = {"latents": torch.randn(n, channels, frames, hw, hw, generator=g),
         "text_embeds": torch.randn(n, lz, text_dim, generator=g), "text_mask": mask,
         "pooled": torch.randn(n, pooled_dim, generator=g)}
    t.update(replace)
    save_file({k: v.contiguous() for k, v in t.items() if v is not None}, str(folder / "batch.safetensors"))
    save_file({k: v[0].contiguous() for k, v in t.items() if v is not None and v.dim() > 1},
              str(folder / "single.safetensors"))
    return folder


def test_cli_distils_on_a_calibration_folder(roots, recipes, tmp_path):
    calib = _pyramid_calib(tmp_path / "calib")
    out = tmp_path / "out"
    res = _convert(roots / "miniflux", out, recipes["miniflux"], "--distill-steps", "8", "--calib", str(calib))
    assert res.exit_code == 0, res.output
    assert "7 samples from" in " ".join(res.output.split())  # 6 batched + 1 single
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["calibration"] == f"folder:{calib}"
    for i in ("1", "2"):
        assert summary["error_after"][i] < summary["error_before"][i]
    card = (out / "README.md").read_text()
    assert "SYNTHETIC" not in card.upper() and str(calib) in card
    assert load_converted(out).config["m4v"]["calibration"] == f"folder:{calib}"


@pytest.mark.parametrize("case,expect", [
    ("no_pooled", "missing tensor 'pooled'"),
    ("channels", "latents must be (C=4, F, H, W)"),
    ("not_pyramid", "multiples of 8"),
    ("mask_shape", "text_mask must have shape"),
    ("text_dim", "text_embeds must be (Lz, 24)"),
    ("empty_mask", "no valid text token"),
    ("not_a_folder", "not a folder"),
])
def test_cli_refuses_bad_calibration_folders(case, expect, roots, recipes, tmp_path):
    n = 6
    replace = {"no_pooled": {"pooled": None}, "channels": {"latents": torch.randn(n, 5, 4, 8, 8)},
               "not_pyramid": {"latents": torch.randn(n, 4, 4, 12, 8)},
               "mask_shape": {"text_mask": torch.ones(n, 5, dtype=torch.long)},
               "text_dim": {"text_embeds": torch.randn(n, 6, 23)},
               "empty_mask": {"text_mask": torch.zeros(n, 6, dtype=torch.long)}, "not_a_folder": {}}[case]
    calib = tmp_path / "nowhere" if case == "not_a_folder" else _pyramid_calib(tmp_path / "calib", **replace)
    out = tmp_path / "out"
    res = _convert(roots / "miniflux", out, recipes["miniflux"], "--distill-steps", "1", "--calib", str(calib))
    text = " ".join(res.output.split())
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "error: --calib" in text and expect in text, text
    assert not out.exists()


def test_sd3_latents_beyond_its_position_table_are_refused_before_training(roots, recipes, tmp_path):
    """The tiny SD3's pos_embed covers a 16×16 token grid: the shipped recipe's 24×40 latents (12×20
    tokens) and a --calib folder of 40×40 latents are one clear message each, not a traceback."""
    res = _convert(roots / "sd3", tmp_path / "a", "pyramidflow-sd3-768p", "--distill-steps", "1", "--layers", "all")
    text = " ".join(res.output.split())
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    assert "recipe pyramidflow-sd3-768p calib: latents of 24×40 make a 12×20 token grid" in text
    assert "pos_embed_max_size 16" in text and not (tmp_path / "a").exists()
    calib = _pyramid_calib(tmp_path / "calib", hw=40)
    res = _convert(roots / "sd3", tmp_path / "b", recipes["sd3"], "--distill-steps", "1", "--calib", str(calib))
    text = " ".join(res.output.split())
    assert res.exit_code != 0 and "error: --calib" in text and "20×20 token grid" in text, text


def test_a_folder_not_named_by_resolution_is_converted_with_a_note(roots, recipes, tmp_path):
    import shutil

    plain = tmp_path / "transformer"
    shutil.copytree(roots / "miniflux" / "diffusion_transformer_768p", plain)
    res = _convert(plain, tmp_path / "out", recipes["miniflux"], "--distill-steps", "1")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "is not named diffusion_transformer_768p/, so its resolution cannot be checked" in text
    named = _convert(roots / "miniflux", tmp_path / "out2", recipes["miniflux"], "--distill-steps", "1")
    assert named.exit_code == 0 and "cannot be checked" not in named.output


def test_recipes_validate_pyramidflow_fields(tmp_path):
    r = load_recipe("pyramidflow-miniflux-768p")
    assert (r.backbone, r.variant, r.resolution, r.allow_double_stream, r.default_layers) == \
        ("pyramidflow", "miniflux", "768p", False, "8-23")
    assert load_recipe("pyramidflow-miniflux-384p").resolution == "384p"
    assert load_recipe("pyramidflow-sd3-768p").variant == "sd3"
    assert load_recipe("wan2.1").variant is None
    for top, msg in (({"resolution": "1080p"}, "resolution"), ({"variant": "flux"}, "variant"),
                     ({"allow_double_stream": "yes"}, "allow_double_stream")):
        with pytest.raises(RecipeError, match=msg):
            load_recipe(_tiny_recipe(tmp_path / "bad.yaml", **top))
    wan = yaml.safe_load((RECIPES_DIR / "wan2.1.yaml").read_text())
    wan["published"] = {}
    wan["resolution"] = "768p"
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(wan))
    with pytest.raises(RecipeError, match="only used by backbone 'pyramidflow'"):
        load_recipe(tmp_path / "w.yaml")
    # a reversed scan would break the block-causal (autoregressive) attention it replaces
    pf = yaml.safe_load((RECIPES_DIR / "pyramidflow-miniflux-768p.yaml").read_text())
    pf["published"] = {}
    pf["mmdim"]["bidirectional"] = True
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pf))
    with pytest.raises(RecipeError, match="mmdim.bidirectional.*causal over frames"):
        load_recipe(tmp_path / "p.yaml")


# ---------------------------------------------------------------- FLOPs

def test_flops_hand_check_on_a_tiny_config():
    from m4v_convert.backbones.pyramidflow.flops import crosscheck_single_block, single_block_flops, stage_layout
    from m4v_convert.layers.mmdim import MMDiMConfig

    grids = [(1, 2), (2, 4), (4, 8)]
    layout = stage_layout(2, 3, grids)  # history: 1 frame at level 0, 1 at 1, 1 at 2; then the noisy frame
    assert [(b.num_frames, b.height, b.width, b.register) for b in layout.blocks] == \
        [(1, 1, 2, 0), (1, 2, 4, 1), (1, 4, 8, 2), (1, 4, 8, 2)]
    d, mlp, lz = 32, 128, 6
    n = lz + 2 + 8 + 32 + 32
    dims = {"d_model": d, "heads": 2, "head_dim": 16, "mlp": mlp, "num_double": 1, "num_single": 2}
    c = single_block_flops(dims, layout, lz, MMDiMConfig(d_model=d, nheads=2, headdim=16, **MMDIM))
    assert c["tokens"] == n
    assert c["attention_flops"] == 8 * n * d * d + 4 * n * n * d
    assert c["block_original_flops"] == c["attention_flops"] + 4 * n * d * mlp + 2 * d * 3 * d
    assert c["mmdim_sequence_length"] == (n - lz) + 2 * lz + 4 + 1
    assert c["block_converted_flops"] - c["mmdim_flops"] == c["block_original_flops"] - c["attention_flops"]
    assert c["mmdim_pure_flops"] < c["mmdim_flops"]
    # the analytic counts describe the modules that run (FlopCounterMode on real tiny blocks)
    check = crosscheck_single_block(tiny_miniflux_config(), layout, lz, MMDIM, device="cpu")
    assert check["ok"] and all(r["rel_diff"] == 0 for r in check["rows"])


@pytest.mark.parametrize("variant,index", [("miniflux", 0), ("sd3", 0), ("sd3", 1)])
def test_flops_of_double_stream_blocks_by_hand_and_measured(variant, index):
    """Joint blocks: attention over [text ; video] with both streams' Q/K/V/O, two 4x MLPs, two
    AdaLN-Zero (SD3's last block: no text MLP / out-projection, a 2d continuous AdaLN); converted:
    the MM-DiM over N' instead of the attention. Checked by hand and with FlopCounterMode."""
    from m4v_convert.backbones.pyramidflow.testing import tiny_sd3_config
    from m4v_convert.backbones.pyramidflow.flops import (crosscheck_double_block, double_block_flops, miniflux_dims,
                                               stage_layout)
    from m4v_convert.layers.mmdim import MMDiMConfig

    config = tiny_miniflux_config() if variant == "miniflux" else tiny_sd3_config()
    dims = miniflux_dims(config)
    d, m, lz = dims["d_model"], dims["mlp"], 6
    layout = stage_layout(2, 3, [(1, 2), (2, 4), (4, 8)])
    nv = layout.num_tokens
    n = lz + nv
    pre_only = variant == "sd3" and index == 1
    mc = MMDiMConfig(d_model=d, nheads=dims["heads"], headdim=dims["head_dim"], text_projections=True, **MMDIM)
    c = double_block_flops(dims, layout, lz, mc, pre_only)
    if pre_only:
        assert c["block_original_flops"] == (8 * n * d * d - 2 * lz * d * d) + 4 * n * n * d + 4 * nv * d * m \
            + 2 * d * 6 * d + 2 * d * 2 * d
    else:
        assert c["block_original_flops"] == 8 * n * d * d + 4 * n * n * d + 4 * n * d * m + 2 * (2 * d * 6 * d)
    assert c["block_converted_flops"] - c["mmdim_flops"] == c["block_original_flops"] - c["attention_flops"]
    check = crosscheck_double_block(config, layout, lz, MMDIM, device="cpu", layer_index=index)
    assert check["ok"] and all(r["rel_diff"] == 0 for r in check["rows"]), check["rows"]


def test_flops_768p_241_frames_against_the_paper(tmp_path):
    res = runner.invoke(app, ["flops", "pyramidflow-miniflux-768p", "--size", "768x1280", "--frames", "241",
                              "--json", str(tmp_path / "f.json")])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "f.json").read_text())
    assert r["tokens"] == 128 + 28 * 240 + 960 + 3840 + 3840 == 15488 and r["latent_frames"] == 31
    assert [lay["index"] for lay in r["layers"]] == list(range(8, 24))
    assert all({"index", "attention_flops", "mmdim_flops"} <= set(lay) for lay in r["layers"])
    orig, conv, pure = (r["mixed_layer"][k] / 1e12 for k in ("original", "converted", "pure_mamba"))
    assert r["original_total_flops"] / 1e12 == orig and r["converted_total_flops"] / 1e12 == conv
    # DESIGN §5: ≈ 3.2 TFLOPs per whole block, ≈ 51 for 16; the paper says 55.44 → 29.52 (26.64 pure Mamba)
    assert abs(orig - 51.4) < 0.1 and abs(orig / 55.44 - 1) < 0.1
    assert 20 < pure < conv < 35 and abs(pure / 26.64 - 1) < 0.15
    assert r["paper"]["mixed_layer_converted_tflops"] == 29.52 and r["paper_comparable"]
    # the paper's temporal branch (29.52 − 26.64 TFLOPs) in full-width d×d projections (2·d² each) per block
    tb = r["temporal_branch_vs_paper"]
    assert tb["history_tokens"] == 28 * 240 + 960 + 3840 and abs(tb["paper_flops"] - 2.88e12) < 1e6
    assert abs(tb["paper_projections_per_history_token"] - 2.88e12 / (16 * 2 * 1920 ** 2 * 11520)) < 1e-9
    assert abs(tb["paper_projections_per_token"] - 2.88e12 / (16 * 2 * 1920 ** 2 * 15488)) < 1e-9
    assert tb["ours_flops"] == r["mixed_layer"]["converted"] - r["mixed_layer"]["pure_mamba"] < 0.02 * tb["paper_flops"]
    assert r["attention_sublayer"]["original"] / 1e12 < orig and r["attention_sublayer"]["converted"] / 1e12 < conv
    g = r["generation"]
    assert g["units"] == 31 and g["model_calls"] == 3 * 20 + 30 * 3 * 10
    assert g["with_cfg"]["original"] == 2 * g["per_sample"]["original"] > 2 * g["per_sample"]["converted"]
    assert r["crosscheck"]["ok"]
    # the Wan report's keys, same meanings; hand counts at N = 15,488, d = 1920, 16 blocks
    wan_keys = {"attention_scores_total_flops", "converted_total_matmul_flops", "crossover_frames", "curve",
                "ffn_flops", "latent", "self_attention", "speedup", "token_grid", "converted_layers", "layers",
                "mmdim_config", "model", "name", "original_total_flops", "converted_total_flops", "tokens", "video",
                "text_len", "crosscheck"}
    assert wan_keys <= set(r)
    n, d = 15488, 1920
    assert r["attention_scores_total_flops"] == r["self_attention"]["scores"] == 16 * 4 * n * n * d
    assert r["self_attention"]["projections"] == 16 * 8 * n * d * d  # q, k, v and W_O (proj_out's attention columns)
    assert r["ffn_flops"] == 16 * 2 * 2 * n * d * 7680  # proj_mlp and proj_out's MLP columns
    assert r["speedup"] == r["original_total_flops"] / r["converted_total_flops"]
    assert r["latent"] == {"frames": 31, "height": 96, "width": 160}
    assert r["token_grid"] == {"frames": 31, "height": 48, "width": 80}
    c = r["curve"]
    assert c["frames"][0] == 1 and c["frames"][-1] == 241 and all((f - 1) % 8 == 0 for f in c["frames"])
    assert c["original"][-1] == r["original_total_flops"] and c["converted"][-1] == r["converted_total_flops"]
    assert all(a < b for a, b in zip(c["original"], c["original"][1:]))
    first = c["frames"].index(c["crossover_frames"])  # converted is cheaper from there on, dearer before
    assert all(cv < o for o, cv in zip(c["original"][first:], c["converted"][first:]))
    assert all(cv >= o for o, cv in zip(c["original"][:first], c["converted"][:first]))
    assert r["converted_total_matmul_flops"] < r["converted_total_flops"]
    bad = runner.invoke(app, ["flops", "pyramidflow-miniflux-768p", "--frames", "240"])
    assert bad.exit_code != 0 and "8k+1" in bad.output
    wan = runner.invoke(app, ["flops", "wan2.1"])
    assert wan.exit_code != 0 and "pick one" in wan.output


# ---------------------------------------------------------------- the shared distillation job

def test_pyramid_schedule_is_the_releases():
    """Per-stage flow of the release's scheduler (1000 steps, stage_range thirds, gamma 1/3, shift 1),
    worked by hand: stage s starts at sigma 1 - s/3 (index int(1000·s/3)), renoised for s > 0 to
    1 - o/(2 - o) with o = 1 - start (sqrt(1 + 1/gamma) = 2), and ends at the next stage's start
    sigma (0 at the last); timesteps split [1000, 1] in proportion to each stage's sigma distance."""
    from m4v_convert.backbones.pyramidflow.calibration import PyramidSchedule

    s = PyramidSchedule.release()
    o1, o2 = 1 - 0.667, 1 - 0.334
    starts = (1.0, 1 - o1 / (2 - o1), 1 - o2 / (2 - o2))
    ends = (0.667, 0.334, 0.0)
    assert s.start_sigmas == pytest.approx(starts) and s.end_sigmas == pytest.approx(ends)
    dist = [a - b for a, b in zip(starts, ends)]
    cut1, cut2 = dist[0] / sum(dist), (dist[0] + dist[1]) / sum(dist)
    t1, t2 = 1000 - int(cut1 * 1000), 1000 - int(cut2 * 1000)  # timesteps[i] = 1000 - i
    assert s.timestep_ranges == ((1000.0, t1), (t1, t2), (t2, 1.0))


def _halve(x):
    b, c, f, h, w = x.shape
    y = F.interpolate(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w), scale_factor=0.5, mode="bilinear")
    return y.reshape(b, f, c, h // 2, w // 2).permute(0, 2, 1, 3, 4)


def test_pyramid_batch_lies_on_the_release_flow_and_its_target_is_the_flow():
    """Oracle per stage, from the clean latents of each level (bilinear halvings, written here):
    start_s = s_s·ε_s + (1 − s_s)·up(x_{s−1}) (ε_0 at stage 0), end_s = e_s·ε_s + (1 − e_s)·x_s (x_s at
    the last stage), target = start − end, noisy = end + r·target with r read back from the
    timestep. ε_s is solved from the target; the release's noise pyramid then holds: ε_{s−1} =
    2·halve(ε_s). History clips are clean frames of their levels when the corruption is off."""
    from m4v_convert.backbones.pyramidflow.calibration import (PyramidCalibSpec, PyramidSchedule, pyramid_batch,
                                                               synthetic_pyramid_samples)

    spec = PyramidCalibSpec(latent_channels=4, text_dim=8, pooled_dim=4, latent_frames=3, latent_height=16,
                            latent_width=16, text_len=5, corrupt_ratio=0.0)
    samples = synthetic_pyramid_samples(spec, 3, seed=1)
    kwargs, target = pyramid_batch(samples, spec, torch.Generator().manual_seed(2), with_target=True)
    sched = PyramidSchedule.release()
    top = torch.stack([s.latents for s in samples])
    levels = [_halve(_halve(top)), _halve(top), top]
    targets = torch.split(target, [4 * lv.shape[3] * lv.shape[4] for lv in levels], dim=1)
    t = kwargs["timestep_ratio"].view(3, 3)  # rows (sample, stage), stage fastest
    eps = []
    for stage in range(3):
        t_max, t_min = sched.timestep_ranges[stage]
        r = ((t[:, stage] - t_min) / (t_max - t_min)).view(-1, 1, 1, 1, 1)
        assert 0 < r.min() and r.max() <= 1
        noisy = kwargs["sample"][stage][-1]
        tgt = targets[stage].view(noisy.shape)
        x0 = levels[stage][:, :, -1:]
        s_, e_ = sched.start_sigmas[stage], sched.end_sigmas[stage]
        up = 0 if stage == 0 else F.interpolate(levels[stage - 1][:, :, -1], scale_factor=2, mode="nearest")[:, :, None]
        # target = (s − e)·ε + (1 − s)·up − (1 − e)·x0
        e = (tgt - (1 - s_) * up + (1 - e_) * x0) / (s_ - e_)
        end = e_ * e + (1 - e_) * x0
        torch.testing.assert_close(noisy, end + r * tgt, atol=1e-4, rtol=0)
        eps.append(e)
        history = kwargs["sample"][stage][:-1]
        for clip in history:  # every history clip is a clean frame of some level (no corruption)
            assert any(clip.shape[3:] == lv.shape[3:] and any(torch.allclose(clip, lv[:, :, f:f + clip.shape[2]])
                       for f in range(lv.shape[2])) for lv in levels)
    for stage in (0, 1):
        torch.testing.assert_close(eps[stage], 2 * _halve(eps[stage + 1]), atol=1e-3, rtol=0)
    assert 0.7 < eps[2].std() < 1.3  # unit-variance noise at the top
    torch.testing.assert_close(kwargs["sample"][2][-2], top[:, :, 1:2])  # the last condition frame, full size


def _pyramid_data(folder, seed=5):
    return _pyramid_calib(folder, n=4, seed=seed)


def test_cli_stage3_fine_tunes_on_data_with_the_pyramidal_objective(roots, recipes, tmp_path):
    out = tmp_path / "s3"
    res = _convert(roots / "miniflux", out, recipes["miniflux"], "--stages", "1,3", "--distill-steps", "4",
                   "--stage3-steps", "15", "--lr", "0.003", "--data", str(_pyramid_data(tmp_path / "data")))
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "conversion.json").read_text())
    s3 = summary["distill"]["stage3"]
    assert s3["steps"] == 15 and summary["distill"]["stages"] == [1, 3]
    losses = [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
              if r.get("stage") == "stage3" and "loss" in r and "event" not in r]
    assert len(losses) == 15 and sum(losses[-5:]) < sum(losses[:5])  # the release's flow target is learnable
    assert "pyramidal flow matching" in (out / "README.md").read_text()
    # --train mmdim (default): outside the converted attention nothing moved
    from safetensors.torch import load_file

    t_sd = load_file(str(roots / "miniflux" / "diffusion_transformer_768p" / "diffusion_pytorch_model.safetensors"))
    s_sd = load_file(str(out / "diffusion_transformer_768p" / "diffusion_pytorch_model.safetensors"))
    kept = [k for k in t_sd if not k.startswith(("single_transformer_blocks.0.", "single_transformer_blocks.1."))]
    assert kept and all(torch.equal(s_sd[k], t_sd[k]) for k in kept)
    # without --data stage 3 is skipped, and says so
    res = _convert(roots / "miniflux", tmp_path / "nodata", recipes["miniflux"], "--stages", "3")
    assert res.exit_code == 0 and "stage 3 (flow-matching fine-tune) skipped" in res.output
    assert json.loads((tmp_path / "nodata" / "conversion.json").read_text())["distill"]["stage3"]["skipped"]


def test_cli_lora_trains_the_mlps_and_merges(roots, recipes, tmp_path):
    out = tmp_path / "lora"
    res = _convert(roots / "miniflux", out, recipes["miniflux"], "--stages", "2", "--stage2-steps", "3",
                   "--lr", "0.01", "--train", "lora")
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    t_sd = load_file(str(roots / "miniflux" / "diffusion_transformer_768p" / "diffusion_pytorch_model.safetensors"))
    s_sd = load_file(str(out / "diffusion_transformer_768p" / "diffusion_pytorch_model.safetensors"))
    assert not [k for k in s_sd if "lora" in k or "base_layer" in k]  # merged into their layers
    changed = {k for k in t_sd if k in s_sd and t_sd[k].shape == s_sd[k].shape and not torch.equal(s_sd[k], t_sd[k])}
    assert {"single_transformer_blocks.0.proj_mlp.weight", "transformer_blocks.0.ff.net.2.weight"} <= changed
    assert all(k.endswith("weight") and (".proj_mlp." in k or ".proj_out." in k or ".ff" in k) for k in changed)
    assert load_converted(out).converted_layers == [1, 2]


def test_cli_resume_after_an_interrupt_ends_with_the_uninterrupted_weights(roots, recipes, tmp_path,
                                                                          interrupt_stage2):
    from safetensors.torch import load_file

    common = ["--stages", "1,2", "--distill-steps", "3", "--stage2-steps", "8", "--checkpoint-every", "2",
              "--mixed-precision", "no"]
    ref = _convert(roots / "miniflux", tmp_path / "ref", recipes["miniflux"], *common,
                   "--run-dir", str(tmp_path / "ref_run"))
    assert ref.exit_code == 0, ref.output
    interrupt_stage2(6)
    run = tmp_path / "run"
    res = _convert(roots / "miniflux", tmp_path / "out", recipes["miniflux"], *common, "--run-dir", str(run))
    assert res.exit_code != 0 and not (tmp_path / "out").exists()
    state = json.loads((run / "state.json").read_text())
    assert state["stage"] == "stage2" and state["step"] == 4
    interrupt_stage2(None)
    res = _convert(roots / "miniflux", tmp_path / "out", recipes["miniflux"], *common, "--resume", str(run))
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output and "stage2 step 4" in " ".join(res.output.split())
    name = "diffusion_transformer_768p/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "out" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_of_the_converted_model_gives_the_same_gradients(teacher):
    from m4v_convert.backbones.pyramidflow.distill import PyramidDistillAdapter

    student = M4VPyramidFluxTransformer.from_teacher(teacher)
    student.convert_([1, 2], MMDIM, meta={"full_grid": [4, 4]})
    inputs = _inputs()

    def grads():
        student.zero_grad()
        sum(o.square().sum() for o in student(**inputs)).backward()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    plain = grads()
    PyramidDistillAdapter(layers=[1, 2], spec=None).enable_gradient_checkpointing(student)
    assert student.gradient_checkpointing
    checked = grads()
    assert plain.keys() == checked.keys() and any(".mmdim." in n for n in plain)
    for n in plain:
        torch.testing.assert_close(plain[n], checked[n])


def test_two_processes_equal_one_process_on_the_combined_batch(roots, recipes, tmp_path):
    from safetensors.torch import load_file

    common = ["--stages", "1,2", "--distill-steps", "3", "--stage2-steps", "3", "--mixed-precision", "no"]
    two = _convert(roots / "miniflux", tmp_path / "two", recipes["miniflux"], *common, "--batch-size", "1",
                   "--num-processes", "2")
    assert two.exit_code == 0, two.output
    one = _convert(roots / "miniflux", tmp_path / "one", recipes["miniflux"], *common, "--batch-size", "2")
    assert one.exit_code == 0, one.output

    def log(out):
        return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]

    def losses(records, stage):
        return [r["loss"] for r in records if r.get("stage") == stage and "loss" in r and "event" not in r]

    sums = [r["checksums"] for r in log(tmp_path / "two") if r.get("event") == "rank_checksums"]
    assert len(sums) == 2 and all(len(s) == 2 and s[0] == s[1] for s in sums)  # both ranks: identical weights
    for stage in ("stage1", "stage2"):
        assert len(losses(log(tmp_path / "two"), stage)) == 3
        torch.testing.assert_close(torch.tensor(losses(log(tmp_path / "two"), stage)),
                                   torch.tensor(losses(log(tmp_path / "one"), stage)), rtol=1e-4, atol=1e-6)
    name = "diffusion_transformer_768p/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
    for k in a:  # Adam normalizes tiny gradients, so allow a little more than float rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=2e-4)
    assert json.loads((tmp_path / "two" / "conversion.json").read_text())["distill"]["processes"] == 2


def test_default_precision_keeps_the_released_weights_exactly_and_bf16_autocast_tracks_fp32(roots, recipes, tmp_path):
    """--dtype auto: float32 weights, so every untouched tensor is written back bit-identical to the
    release file; bf16 autocast (what CUDA gets by default; forced here on CPU) distils about as
    well as float32; --dtype bfloat16 rounds the stored weights."""
    from safetensors.torch import load_file

    name = "diffusion_transformer_768p/diffusion_pytorch_model.safetensors"
    source = load_file(str(roots / "miniflux" / name))
    runs = {}
    for tag, extra in (("fp32", ["--mixed-precision", "no"]), ("autocast", ["--mixed-precision", "bf16"]),
                       ("bf16", ["--dtype", "bfloat16", "--mixed-precision", "no"])):
        res = _convert(roots / "miniflux", tmp_path / tag, recipes["miniflux"], "--stages", "1,2", "--distill-steps",
                       "8", "--stage2-steps", "4", *extra)
        assert res.exit_code == 0, res.output
        runs[tag] = (load_file(str(tmp_path / tag / name)), json.loads((tmp_path / tag / "conversion.json").read_text()))
    kept = [k for k in source if not k.startswith("single_transformer_blocks.")]
    for tag in ("fp32", "autocast"):
        saved = runs[tag][0]
        assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], source[k]) for k in kept)
    assert all(runs["bf16"][0][k].dtype == torch.bfloat16 for k in kept)
    fp32, autocast = runs["fp32"][1], runs["autocast"][1]
    for i in fp32["error_after"]:
        assert fp32["error_after"][i] < fp32["error_before"][i]
        assert abs(autocast["error_after"][i] - fp32["error_after"][i]) < 0.05 * fp32["error_after"][i]


# ---------------------------------------------------------------- the release's sampler (--teacher-calib)

def test_block_noise_has_the_releases_block_covariance():
    """Each 2×2 block ~ N(0, (1+γ)I − γ·11ᵀ) (the release's sample_block_noise), blocks independent."""
    from m4v_convert.backbones.pyramidflow.sampler import block_noise

    for gamma in (1 / 3, 0.2, 0.0):
        x = block_noise((2, 3, 2, 100, 100), gamma, torch.Generator().manual_seed(0))
        blocks = x.reshape(2, 3, 2, 50, 2, 50, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(-1, 4)  # (h p) (w q) → (p q)
        expect = (1 + gamma) * torch.eye(4) - gamma * torch.ones(4, 4)
        torch.testing.assert_close(torch.cov(blocks.T), expect, atol=0.02, rtol=0)
        across = x[..., :, 1:-1].reshape(-1, 2)  # columns 1|2, 3|4, ...: neighbours in different blocks
        assert abs(torch.corrcoef(across.T)[0, 1]) < 0.02
    assert block_noise((1, 1, 1, 4, 4), 1 / 3, torch.Generator()).reshape(2, 2, 2, 2).sum((1, 3)).abs().max() < 1e-5
    with pytest.raises(M4VError, match="gamma"):
        block_noise((1, 1, 1, 2, 2), 0.5, torch.Generator())


def _release_generate(model, text, mask, pooled, frames, height, width, steps, seed, gamma=1 / 3, stages=3):
    """The release's ``generate`` (T2V, no guidance, one latent frame per unit) and its scheduler,
    re-derived here from the release's code structure: numpy schedule, the history while-loop,
    ``get_pyramid_latent`` halvings, ``scheduler.step``. Block noise is drawn as the sampler's
    ``block_noise`` (tested above) in the same order, so both see the same random numbers."""
    import numpy as np

    from m4v_convert.backbones.pyramidflow.sampler import block_noise

    n = 1000
    sig = np.linspace(1, n, n, dtype=np.float64)[::-1] / n  # shift 1
    tsteps = sig * n
    rng = [0, 1 / 3, 2 / 3, 1]
    ori_start, start_s, end_s, dist = {}, {}, {}, []
    for i in range(stages):
        a, b = max(int(rng[i] * n), 0), min(int(rng[i + 1] * n), n)
        st, en = sig[a], (sig[b] if b < n else 0.0)
        ori_start[i] = st
        if i:
            o = 1 - st
            st = 1 - (1 / (math.sqrt(1 + 1 / gamma) * (1 - o) + o)) * o
        start_s[i], end_s[i] = st, en
        dist.append(st - en)
    ratios = {i: (sum(dist[:i]) / sum(dist) if i else 0.0, 1.0 if i == stages - 1 else sum(dist[:i + 1]) / sum(dist))
              for i in range(stages)}
    per_stage = {i: np.linspace(tsteps[int(ratios[i][0] * n)], tsteps[min(int(ratios[i][1] * n), n - 1)], n + 1)[:-1]
                 for i in range(stages)}
    stage_sig = np.linspace(1, 0, n + 1)[:-1]

    def pyramid(x):  # get_pyramid_latent: top level, then bilinear halvings; returned low → high
        out = [x]
        for _ in range(stages - 1):
            b, c, t, h, w = x.shape
            x = F.interpolate(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), size=(h // 2, w // 2), mode="bilinear")
            x = x.reshape(b, t, c, h // 2, w // 2).permute(0, 2, 1, 3, 4)
            out.append(x)
        return out[::-1]

    g = torch.Generator().manual_seed(seed)
    b = text.shape[0]
    lat = torch.randn(b, 4, frames, height, width, generator=g)
    lat = lat.permute(0, 2, 1, 3, 4).reshape(b * frames, 4, height, width)
    h, w = height, width
    for _ in range(stages - 1):
        h, w = h // 2, w // 2
        lat = F.interpolate(lat, size=(h, w), mode="bilinear") * 2
    lat = lat.reshape(b, frames, 4, h, w).permute(0, 2, 1, 3, 4)
    generated = []
    for unit in range(frames):
        past = [[] for _ in range(stages)]
        if unit:
            clean = pyramid(torch.cat(generated, dim=2))
            past = []
            for i_s in range(stages):
                inp = [clean[i_s][:, :, -1:]]
                cur_stage, ptx = i_s, 1
                while ptx < unit:
                    cur_stage = max(cur_stage - 1, 0)
                    if cur_stage == 0:
                        break
                    ptx += 1
                    inp.append(clean[cur_stage][:, :, -ptx:-(ptx - 1)])
                if cur_stage == 0 and ptx < unit:
                    inp.append(clean[0][:, :, :-ptx])
                past.append(list(reversed(inp)))
        x, hh, ww = lat[:, :, unit:unit + 1], h, w
        for i_s in range(stages):
            ts = np.linspace(per_stage[i_s][0], per_stage[i_s][-1], steps)
            sg = list(np.linspace(stage_sig[0], stage_sig[-1], steps)) + [0.0]
            if i_s:
                hh, ww = hh * 2, ww * 2
                x = F.interpolate(x[:, :, 0], size=(hh, ww), mode="nearest")[:, :, None]
                o = 1 - ori_start[i_s]
                alpha = 1 / (math.sqrt(1 + 1 / gamma) * (1 - o) + o)
                beta = alpha * (1 - o) / math.sqrt(gamma)
                x = alpha * x + beta * block_noise(x.shape, gamma, g)
            for k, t in enumerate(ts):
                v = model(sample=[past[i_s] + [x]], encoder_hidden_states=text, encoder_attention_mask=mask,
                          pooled_projections=pooled, timestep_ratio=torch.full((b,), float(t)))[0]
                x = x + (sg[k + 1] - sg[k]) * v
        generated.append(x)
    return torch.cat(generated, dim=2)


@pytest.mark.parametrize("steps", [1, 3])
def test_sampler_is_the_releases_generate_loop(teacher, steps):
    from m4v_convert.backbones.pyramidflow.sampler import sample_pyramid_video

    g = torch.Generator().manual_seed(1)
    text, pooled = torch.randn(2, 6, 24, generator=g), torch.randn(2, 20, generator=g)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    calls = []
    model = lambda **kw: calls.append([tuple(c.shape[2:]) for c in kw["sample"][0]]) or teacher(**kw)  # noqa: E731
    got = sample_pyramid_video(model, text, mask, pooled, channels=4, frames=4, height=8, width=8, steps=steps,
                               generator=torch.Generator().manual_seed(7))
    ref = _release_generate(teacher, text, mask, pooled, frames=4, height=8, width=8, steps=steps, seed=7)
    assert got.shape == (2, 4, 4, 8, 8)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert len(calls) == 4 * 3 * steps
    # frame 3, top stage: history frames 0, 1, 2 at levels 0, 1, 2 (the release rule), then the noisy frame
    assert calls[-1] == [(1, 2, 2), (1, 4, 4), (1, 8, 8), (1, 8, 8)]
    assert calls[0] == [(1, 2, 2)]  # the first frame has no history
    other = sample_pyramid_video(teacher, text, mask, pooled, channels=4, frames=4, height=8, width=8, steps=steps,
                                 generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(other, got)


def test_sampler_with_the_release_schedule_makes_the_calls_the_flops_report_counts(teacher):
    """The whole-generation FLOPs sum (backbones.pyramidflow.flops: SCHEDULE, stage_layout) and the sampler
    agree call by call: same number of model calls, and each call's clips are the layout it sums."""
    from m4v_convert.backbones.pyramidflow.sampler import sample_pyramid_video
    from m4v_convert.backbones.pyramidflow.flops import SCHEDULE, stage_layout, token_grids

    frames, calls = 5, []

    def model(**kw):
        calls.append(tuple((c.shape[2], c.shape[3] // 2, c.shape[4] // 2) for c in kw["sample"][0]))
        return [torch.zeros_like(kw["sample"][0][-1])]

    g = torch.Generator().manual_seed(0)
    sample_pyramid_video(model, torch.randn(1, 6, 24), torch.ones(1, 6, dtype=torch.long), torch.randn(1, 20),
                         channels=4, frames=frames, height=8, width=8, steps=SCHEDULE["unit_steps"],
                         first_frame_steps=SCHEDULE["first_frame_steps"], generator=g)
    grids = token_grids(64, 64)  # 8×8 latents = 64×64 pixels
    expect = []
    for u in range(frames):
        steps = SCHEDULE["first_frame_steps"] if u == 0 else SCHEDULE["unit_steps"]
        for stage in range(3):
            layout = tuple((b.num_frames, b.height, b.width) for b in stage_layout(stage, u, grids).blocks)
            expect += [layout] * steps[stage]
    assert calls == expect and len(calls) == 60 + 4 * 30


def test_cli_teacher_calibration_is_the_teachers_pyramid_samples_cached_and_reused(roots, recipes, teacher, tmp_path):
    from m4v_convert.backbones.pyramidflow.calibration import PyramidCalibSpec, synthetic_pyramid_samples
    from m4v_convert.backbones.pyramidflow.sampler import teacher_calibration_samples
    from safetensors.torch import load_file

    recipe = _tiny_recipe(tmp_path / "r.yaml")
    data = yaml.safe_load(recipe.read_text())
    data["calib"].update(teacher_steps=1, teacher_first_frame_steps=2)  # the release: 20 first, 10 after
    recipe.write_text(yaml.safe_dump(data))
    cache = tmp_path / "cache"
    res = _convert(roots / "miniflux", tmp_path / "a", recipe, "--stages", "1", "--distill-steps", "2",
                   "--calib-cache", str(cache))
    assert res.exit_code == 0, res.output
    assert "teacher samples 6/6" in res.output and "2 Euler steps per stage for the first frame, 1 for" in res.output
    assert json.loads((tmp_path / "a" / "conversion.json").read_text())["calibration"] == "teacher:synthetic"
    cached = load_file(str(cache / "teacher_samples.safetensors"))
    spec = PyramidCalibSpec(latent_channels=4, text_dim=24, pooled_dim=20, latent_frames=4, latent_height=8,
                            latent_width=8, text_len=6)
    texts = synthetic_pyramid_samples(spec, 6, seed=0)
    direct = teacher_calibration_samples(teacher, texts, spec, steps=1, seed=0, batch_size=2, first_frame_steps=2)
    torch.testing.assert_close(cached["latents"], torch.stack([s.latents for s in direct]), rtol=0, atol=1e-5)
    one_step = teacher_calibration_samples(teacher, texts[:2], spec, steps=1, seed=0, batch_size=2)
    assert not torch.allclose(cached["latents"][:2, :, 0], torch.stack([s.latents for s in one_step])[:, :, 0])
    assert torch.equal(cached["text_mask"], torch.stack([s.text_mask for s in texts]))
    assert not torch.allclose(cached["latents"][0], cached["latents"][1])
    stamp = (cache / "teacher_samples.safetensors").stat().st_mtime_ns
    res = _convert(roots / "miniflux", tmp_path / "b", recipe, "--stages", "1", "--distill-steps", "2",
                   "--calib-cache", str(cache))
    assert res.exit_code == 0 and "reused" in res.output, res.output
    assert (cache / "teacher_samples.safetensors").stat().st_mtime_ns == stamp
    # the text conditions of a --calib folder are other settings: refused, nothing written
    calib = _pyramid_calib(tmp_path / "calib")
    res = _convert(roots / "miniflux", tmp_path / "c", recipe, "--stages", "1", "--distill-steps", "2",
                   "--calib-cache", str(cache), "--calib", str(calib))
    text = " ".join(res.output.split())
    assert res.exit_code != 0 and "other settings" in text and "text_source" in text, text
    assert not (tmp_path / "c").exists()
    # --teacher-calib alone caches in <out>.train/teacher_calib, conditioned on the folder's texts
    res = _convert(roots / "miniflux", tmp_path / "d", recipe, "--stages", "1", "--distill-steps", "2",
                   "--teacher-calib", "--calib", str(calib))
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "d" / "conversion.json").read_text())
    assert summary["calibration"] == f"teacher:folder:{calib.resolve()}"
    assert (tmp_path / "d.train" / "teacher_calib" / "teacher_samples.safetensors").is_file()
    card = " ".join((tmp_path / "d" / "README.md").read_text().split())
    assert "sampled by the teacher" in card and str(calib) in card


# ---------------------------------------------------------------- eval of a PyramidFlow conversion

def _eval(teacher_root, student, out, *extra):
    return runner.invoke(app, ["eval", str(teacher_root), str(student), "--out", str(out), "--device", "cpu",
                               "--threads", "1", *extra])


def test_eval_pyramidflow_is_the_hand_computed_comparison(roots, recipes, teacher, tmp_path):
    """metrics.json against an oracle computed here from the pieces: same-seed samples of both models
    (the sampler, tested above), PSNR with the teacher's range, per-stage errors on the --calib batches."""
    from m4v_convert.backbones.pyramidflow.calibration import PyramidCalibSpec, folder_pyramid_samples, pyramid_batch
    from m4v_convert.backbones.pyramidflow.evaluate import BATCH_NOISE_SEED, SAMPLE_NOISE_BASE
    from m4v_convert.backbones.pyramidflow.sampler import sample_pyramid_video
    from PIL import Image

    out = tmp_path / "converted"
    assert _convert(roots / "miniflux", out, recipes["miniflux"], "--distill-steps", "4", "--stage2-steps", "2",
                    ).exit_code == 0
    calib = _pyramid_calib(tmp_path / "calib", n=2)  # 2 batched + 1 single sample, 4 frames of 8×8
    res = _eval(roots / "miniflux", out, tmp_path / "ev", "--calib", str(calib), "--seeds", "2", "--steps", "2")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["samples"] == 6 and m["conditions"] == 3 and m["pred_rel_error_on"] == "calibration latents"
    student = load_converted(out)
    spec = PyramidCalibSpec(4, 24, 20, latent_frames=4, latent_height=8, latent_width=8, text_len=6)
    conds = folder_pyramid_samples(calib, spec)
    mses = []
    for i in range(6):
        c = conds[i // 2]
        xs = [sample_pyramid_video(model, c.text[None], c.text_mask[None], c.pooled[None], channels=4, frames=4,
                                   height=8, width=8, steps=2, generator=torch.Generator().manual_seed(SAMPLE_NOISE_BASE + i))
              for model in (teacher, student)]
        lo, hi = xs[0].min(), xs[0].max()
        mses.append(float(((xs[1] - xs[0]) / (hi - lo)).double().pow(2).mean()))
    assert m["psnr_db"] == pytest.approx(10 * math.log10(len(mses) / sum(mses)), abs=1e-3)
    assert m["psnr_db_ci95"][0] <= m["psnr_db"] <= m["psnr_db_ci95"][1]
    g = torch.Generator().manual_seed(BATCH_NOISE_SEED)
    num, den = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for start in (0, 2):
            kw = pyramid_batch(conds[start:start + 2], spec, g)
            for s, (vt, vs) in enumerate(zip(teacher(**kw), student(**kw))):
                num[s] += (vs - vt).double().pow(2).sum()
                den[s] += vt.double().pow(2).sum()
    for s in range(3):
        assert m["pred_rel_error"][f"stage{s}"] == pytest.approx(float((num[s] / den[s]).sqrt()), rel=1e-4)
    assert 0 < m["pred_rel_error_mean"] < 1 and m["ssim"] < 1
    # 4 frames of 8+1 px; the first 4 samples, each 2 rows of 8 px + a 1 px gap; 8x upscaled
    assert Image.open(tmp_path / "ev" / "frames.png").size == (8 * 4 * 9, 8 * 4 * 17)


def test_eval_pyramidflow_of_an_unconverted_copy_is_exact(teacher, tmp_path, roots):
    from m4v_convert.backbones.pyramidflow.evaluate import PyramidEvalOptions, run_pyramid_eval

    copy_ = M4VPyramidFluxTransformer.from_teacher(teacher)
    copy_.convert_([], MMDIM, meta={"full_grid": [48, 80], "resolution": "768p", "variant": "miniflux"})
    copy_.register_to_config(m4v={**copy_.config["m4v"], "recipe": "pyramidflow-miniflux-768p"})
    save_converted(copy_, tmp_path / "copy" / "diffusion_transformer_768p", metadata={})
    m = run_pyramid_eval(PyramidEvalOptions(teacher=roots / "miniflux", student=tmp_path / "copy", out=tmp_path / "ev",
                                            conditions=1, seeds=2, steps=1, frames=2, device="cpu"))
    assert m["psnr_db"] == math.inf and m["ssim"] == pytest.approx(1.0)
    assert m["pred_rel_error_mean"] == 0 and m["sample_rel_error"] == 0
    assert m["conditions_source"] == "synthetic" and m["size"] == {"latent_frames": 2, "latent_height": 24,
                                                                  "latent_width": 40}  # the recipe's calibration size


@pytest.mark.parametrize("case,expect", [
    ("wan_option", "--prompts: Wan eval options"),
    ("sd3_teacher", "not the miniflux one"),
    ("frames_vs_calib", "--frames 3: the --calib latents have 4 frames"),
    ("calib_missing", "--calib"),
])
def test_eval_pyramidflow_bad_input_is_one_clear_message(case, expect, roots, recipes, tmp_path):
    out = tmp_path / "converted"
    assert _convert(roots / "miniflux", out, recipes["miniflux"], "--distill-steps", "1", "--stages", "1").exit_code == 0
    teacher_root, extra = roots / "miniflux", []
    if case == "wan_option":
        extra = ["--prompts", str(tmp_path / "p.txt")]
    elif case == "sd3_teacher":
        teacher_root = roots / "sd3"
    elif case == "frames_vs_calib":
        extra = ["--calib", str(_pyramid_calib(tmp_path / "calib")), "--frames", "3"]
    elif case == "calib_missing":
        extra = ["--calib", str(tmp_path / "nowhere")]
    res = _eval(teacher_root, out, tmp_path / "ev", *extra)
    text = " ".join(res.output.split())
    assert res.exit_code != 0 and "Traceback" not in res.output and "error:" in text and expect in text, text
    assert not (tmp_path / "ev").exists()
