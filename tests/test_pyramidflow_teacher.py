"""PyramidFlow teachers: release folder layout, loading errors, and the forward checked against a
dense re-implementation of the sequence / mask / RoPE rules written here from the weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from m4v_convert.backbones.pyramidflow import (
    PyramidDiffusionMMDiT,
    PyramidFluxTransformer,
    attention_mask,
    build_pyramidflow,
    history_clips,
    load_pyramidflow,
    save_pyramidflow,
    sequence_position_ids,
    token_layout,
)
from m4v_convert.backbones.pyramidflow.testing import (
    make_tiny_miniflux,
    make_tiny_sd3,
    tiny_miniflux_config,
    tiny_pyramid_inputs,
    tiny_sd3_config,
)
from m4v_convert.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- dense reference
def lin(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def feed_forward(sd, name, x):
    return lin(sd, name + ".net.2", gelu_tanh(lin(sd, name + ".net.0.proj", x)))


def time_text_embedding(sd, t, pooled):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    sinus = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()  # flip_sin_to_cos; float32 args as the model
    silu = F.silu
    e = lin(sd, "time_text_embed.timestep_embedder.linear_2", silu(lin(sd, "time_text_embed.timestep_embedder.linear_1", sinus)))
    p = lin(sd, "time_text_embed.text_embedder.linear_2", silu(lin(sd, "time_text_embed.text_embedder.linear_1", pooled)))
    return e + p


def ref_positions(clips, patch=2):
    """Per video token (t, h, w) like the release: fractional h/w via linear interpolation."""
    grid_h, grid_w = clips[-1].shape[-2] // patch, clips[-1].shape[-1] // patch
    rows, t0 = [], 0
    for c in clips:
        frames, h, w = c.shape[2], c.shape[3] // patch, c.shape[4] // patch
        hp = torch.arange(grid_h).float()
        wp = torch.arange(grid_w).float()
        if h != grid_h:
            hp = F.interpolate(hp[None, None], size=h, mode="linear")[0, 0]
        if w != grid_w:
            wp = F.interpolate(wp[None, None], size=w, mode="linear")[0, 0]
        for f in range(frames):
            for i in range(h):
                for j in range(w):
                    rows.append((t0 + f, hp[i].item(), wp[j].item()))
        t0 += frames
    return torch.tensor(rows, dtype=torch.float64)


def ref_rotate(x, positions, axes):
    """x (B, L, H, D) rotated as complex pairs; positions (L, n_axes)."""
    angles = []
    for a, d in enumerate(axes):
        inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(positions[:, a, None] * inv[None])
    rot = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, dim=-1))  # (L, D/2)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rot[None, :, None, :]).reshape(x.shape).to(x.dtype)


def ref_mask(text_valid, frame_of_video_token):
    """(B, L, L) bool by the stated rule, token by token."""
    rows = []
    for valid_row in text_valid.tolist():
        tokens = [(bool(v), 0) for v in valid_row] + [(True, t) for t in frame_of_video_token]
        rows.append([[kq[0] == kk[0] and kk[1] <= kq[1] for kk in tokens] for kq in tokens])
    return torch.tensor(rows)


def ref_attention(q, k, v, mask):
    """q/k/v (B, L, H, D); mask (B, L, L) → (B, L, H·D)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    return out.flatten(2)


def heads(x, n):
    return x.reshape(*x.shape[:-1], n, -1)


def patch_tokens(clip, p=2):
    """(B, C, T, H, W) → (B, T·h·w, p·p·C) with (p_row, p_col, c) channel order, by loops."""
    b, c, t, hh, ww = clip.shape
    out = []
    for f in range(t):
        for i in range(hh // p):
            for j in range(ww // p):
                out.append(clip[:, :, f, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(0, 2, 3, 1).reshape(b, -1))
    return torch.stack(out, dim=1)


def unpatch_tokens(tokens, t, h, w, c, p=2):
    b = tokens.shape[0]
    out = torch.zeros(b, c, t, h * p, w * p, dtype=tokens.dtype)
    n = 0
    for f in range(t):
        for i in range(h):
            for j in range(w):
                out[:, :, f, i * p : (i + 1) * p, j * p : (j + 1) * p] = tokens[:, n].reshape(b, p, p, c).permute(0, 3, 1, 2)
                n += 1
    return out


def video_frames(clips, p=2):
    frames, t0 = [], 0
    for c in clips:
        tokens = (c.shape[3] // p) * (c.shape[4] // p)
        for f in range(c.shape[2]):
            frames += [t0 + f] * tokens
        t0 += c.shape[2]
    return frames


def ref_miniflux(model, inputs):
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    nh, axes = cfg.num_attention_heads, list(cfg.axes_dims_rope)
    stages = inputs["sample"]
    n = len(stages)
    temb_all = time_text_embedding(sd, inputs["timestep_ratio"], inputs["pooled_projections"].double())
    text_all = lin(sd, "context_embedder", inputs["encoder_hidden_states"].double())
    outs = []
    for s, clips in enumerate(stages):
        temb, c = temb_all[s::n], text_all[s::n]
        valid = inputs["encoder_attention_mask"][s::n].bool()
        lz = c.shape[1]
        x = lin(sd, "x_embedder", torch.cat([patch_tokens(k.double()) for k in clips], dim=1))
        pos = torch.cat([torch.zeros(lz, 3, dtype=torch.float64), ref_positions(clips)])
        mask = ref_mask(valid, video_frames(clips))

        def qkv(pre, h, kind):
            q = heads(lin(sd, f"{pre}.to_q" if kind == "x" else f"{pre}.add_q_proj", h), nh)
            k = heads(lin(sd, f"{pre}.to_k" if kind == "x" else f"{pre}.add_k_proj", h), nh)
            v = heads(lin(sd, f"{pre}.to_v" if kind == "x" else f"{pre}.add_v_proj", h), nh)
            nq, nk = ("norm_q", "norm_k") if kind == "x" else ("norm_added_q", "norm_added_k")
            return rms_norm(q, sd[f"{pre}.{nq}.weight"], 1e-6), rms_norm(k, sd[f"{pre}.{nk}.weight"], 1e-6), v

        for i in range(cfg.num_layers):
            pre = f"transformer_blocks.{i}"
            m = lin(sd, f"{pre}.norm1.linear", F.silu(temb))[:, None].chunk(6, dim=-1)
            mc = lin(sd, f"{pre}.norm1_context.linear", F.silu(temb))[:, None].chunk(6, dim=-1)
            xn = layer_norm(x) * (1 + m[1]) + m[0]
            cn = layer_norm(c) * (1 + mc[1]) + mc[0]
            q, k, v = qkv(f"{pre}.attn", xn, "x")
            cq, ck, cv = qkv(f"{pre}.attn", cn, "c")
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
            a = ref_attention(ref_rotate(q, pos, axes), ref_rotate(k, pos, axes), v, mask)
            x = x + m[2] * lin(sd, f"{pre}.attn.to_out.0", a[:, lz:])
            x = x + m[5] * feed_forward(sd, f"{pre}.ff", layer_norm(x) * (1 + m[4]) + m[3])
            c = c + mc[2] * lin(sd, f"{pre}.attn.to_add_out", a[:, :lz])
            c = c + mc[5] * feed_forward(sd, f"{pre}.ff_context", layer_norm(c) * (1 + mc[4]) + mc[3])
        h = torch.cat([c, x], dim=1)
        for j in range(cfg.num_single_layers):
            pre = f"single_transformer_blocks.{j}"
            shift, scale, gate = lin(sd, f"{pre}.norm.linear", F.silu(temb))[:, None].chunk(3, dim=-1)
            hn = layer_norm(h) * (1 + scale) + shift
            q, k, v = qkv(f"{pre}.attn", hn, "x")
            a = ref_attention(ref_rotate(q, pos, axes), ref_rotate(k, pos, axes), v, mask)
            mlp = gelu_tanh(lin(sd, f"{pre}.proj_mlp", hn))
            h = h + gate * lin(sd, f"{pre}.proj_out", torch.cat([a, mlp], dim=-1))
        last = clips[-1]
        t, hh, ww = last.shape[2], last.shape[3] // 2, last.shape[4] // 2
        y = h[:, h.shape[1] - t * hh * ww :]
        scale, shift = lin(sd, "norm_out.linear", F.silu(temb))[:, None].chunk(2, dim=-1)
        y = lin(sd, "proj_out", layer_norm(y) * (1 + scale) + shift)
        outs.append(unpatch_tokens(y, t, hh, ww, last.shape[1]))
    return outs


def ref_sd3(model, inputs):
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    nh, p, big = cfg.num_attention_heads, cfg.patch_size, cfg.pos_embed_max_size
    stages = inputs["sample"]
    n = len(stages)
    temb_all = time_text_embedding(sd, inputs["timestep_ratio"], inputs["pooled_projections"].double())
    text_all = lin(sd, "context_embedder", inputs["encoder_hidden_states"].double())
    table = sd["pos_embed.pos_embed"].reshape(big, big, -1)
    conv_w = sd["pos_embed.proj.weight"].permute(0, 2, 3, 1).flatten(1)  # (D, p·p·C), (p_row, p_col, c)
    outs = []
    for s, clips in enumerate(stages):
        temb, c = temb_all[s::n], text_all[s::n]
        valid = inputs["encoder_attention_mask"][s::n].bool()
        lz = c.shape[1]
        gh, gw = clips[-1].shape[3] // p, clips[-1].shape[4] // p
        top, left = (big - gh) // 2, (big - gw) // 2
        stage_table = table[top : top + gh, left : left + gw]  # (gh, gw, D)
        xs = []
        for clip in clips:
            h, w = clip.shape[3] // p, clip.shape[4] // p
            pe = stage_table
            if (h, w) != (gh, gw):
                pe = F.interpolate(pe.permute(2, 0, 1)[None], size=(h, w), mode="bilinear")[0].permute(1, 2, 0)
            tok = patch_tokens(clip.double(), p) @ conv_w.T + sd["pos_embed.proj.bias"]
            xs.append(tok + pe.reshape(1, h * w, -1).repeat(1, clip.shape[2], 1))
        x = torch.cat(xs, dim=1)
        frames = [0] * lz + video_frames(clips, p)
        pos = torch.tensor(frames, dtype=torch.float64)[:, None]
        mask = ref_mask(valid, video_frames(clips, p))
        for i in range(cfg.num_layers):
            pre = f"transformer_blocks.{i}"
            last_block = i == cfg.num_layers - 1
            m = lin(sd, f"{pre}.norm1.linear", F.silu(temb))[:, None].chunk(6, dim=-1)
            xn = layer_norm(x) * (1 + m[1]) + m[0]
            if last_block:
                scale, shift = lin(sd, f"{pre}.norm1_context.linear", F.silu(temb))[:, None].chunk(2, dim=-1)
                cn = layer_norm(c) * (1 + scale) + shift
            else:
                mc = lin(sd, f"{pre}.norm1_context.linear", F.silu(temb))[:, None].chunk(6, dim=-1)
                cn = layer_norm(c) * (1 + mc[1]) + mc[0]
            a_ = f"{pre}.attn"
            q = rms_norm(heads(lin(sd, f"{a_}.to_q", xn), nh), sd[f"{a_}.norm_q.weight"], 1e-5)
            k = rms_norm(heads(lin(sd, f"{a_}.to_k", xn), nh), sd[f"{a_}.norm_k.weight"], 1e-5)
            v = heads(lin(sd, f"{a_}.to_v", xn), nh)
            cq = rms_norm(heads(lin(sd, f"{a_}.add_q_proj", cn), nh), sd[f"{a_}.norm_add_q.weight"], 1e-5)
            ck = rms_norm(heads(lin(sd, f"{a_}.add_k_proj", cn), nh), sd[f"{a_}.norm_add_k.weight"], 1e-5)
            cv = heads(lin(sd, f"{a_}.add_v_proj", cn), nh)
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
            dim = q.shape[-1]
            a = ref_attention(ref_rotate(q, pos, [dim]), ref_rotate(k, pos, [dim]), v, mask)
            x = x + m[2] * lin(sd, f"{a_}.to_out.0", a[:, lz:])
            x = x + m[5] * feed_forward(sd, f"{pre}.ff", layer_norm(x) * (1 + m[4]) + m[3])
            if not last_block:
                c = c + mc[2] * lin(sd, f"{a_}.to_add_out", a[:, :lz])
                c = c + mc[5] * feed_forward(sd, f"{pre}.ff_context", layer_norm(c) * (1 + mc[4]) + mc[3])
        last = clips[-1]
        t, hh, ww = last.shape[2], last.shape[3] // p, last.shape[4] // p
        y = x[:, x.shape[1] - t * hh * ww :]
        scale, shift = lin(sd, "norm_out.linear", F.silu(temb))[:, None].chunk(2, dim=-1)
        y = lin(sd, "proj_out", layer_norm(y) * (1 + scale) + shift)
        outs.append(unpatch_tokens(y, t, hh, ww, last.shape[1], p))
    return outs


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_flux():
    return make_tiny_miniflux(seed=0)


@pytest.fixture(scope="module")
def tiny_sd3():
    return make_tiny_sd3(seed=0)


@pytest.fixture(scope="module")
def flux_root(tmp_path_factory, tiny_flux):
    root = tmp_path_factory.mktemp("pyramid-flow-miniflux")
    save_pyramidflow(tiny_flux, root, "384p")
    save_pyramidflow(tiny_flux, root, "768p")
    return root


@pytest.fixture(scope="module")
def sd3_root(tmp_path_factory, tiny_sd3):
    root = tmp_path_factory.mktemp("pyramid-flow-sd3")
    save_pyramidflow(tiny_sd3, root, "768p")
    return root


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ----------------------------------------------------------------------------- forward vs reference
def test_miniflux_forward_matches_dense_reference(flux_root):
    # the model under test comes off disk: release folder layout, through the loader
    model = load_pyramidflow(flux_root, variant="miniflux", resolution="768p", dtype=torch.float32)
    inputs = tiny_pyramid_inputs(tiny_miniflux_config(), batch=2, num_stages=2, num_history=3, seed=1)
    with torch.no_grad():
        got = model(**inputs)
        want = ref_miniflux(model, inputs)
    assert len(got) == 2
    for g, w, clips in zip(got, want, inputs["sample"]):
        assert g.shape == clips[-1].shape
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4)


def test_sd3_forward_matches_dense_reference(sd3_root):
    model = load_pyramidflow(sd3_root, variant="sd3", resolution="768p", dtype=torch.float32)
    inputs = tiny_pyramid_inputs(tiny_sd3_config(), batch=2, num_stages=2, num_history=3, seed=2)
    with torch.no_grad():
        got = model(**inputs)
        want = ref_sd3(model, inputs)
    for g, w, clips in zip(got, want, inputs["sample"]):
        assert g.shape == clips[-1].shape
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4)


def test_padding_and_other_stages_do_not_leak(tiny_flux):
    inputs = tiny_pyramid_inputs(tiny_miniflux_config(), seed=3)
    with torch.no_grad():
        base = tiny_flux(**inputs)
        # padded text content is invisible to everything that is not padding
        ehs = inputs["encoder_hidden_states"].clone()
        ehs[inputs["encoder_attention_mask"] == 0] = 100.0
        padded = tiny_flux(**{**inputs, "encoder_hidden_states": ehs})
        # stage 1's latents never reach stage 0
        sample = [inputs["sample"][0], [torch.randn_like(c) for c in inputs["sample"][1]]]
        other = tiny_flux(**{**inputs, "sample": sample})
    for a, b in zip(base, padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base[0], other[0], atol=0, rtol=0)
    assert not torch.allclose(base[1], other[1])


def test_gradient_checkpointing_gives_same_gradients():
    model = make_tiny_miniflux(seed=4)
    inputs = tiny_pyramid_inputs(tiny_miniflux_config(), batch=1, num_stages=1, num_history=1, seed=4)

    def grads():
        model.zero_grad()
        sum(o.square().sum() for o in model(**inputs)).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    checked = grads()
    for a, b in zip(plain, checked):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- layout / mask rules
def test_mask_rules(tiny_flux):
    inputs = tiny_pyramid_inputs(tiny_miniflux_config(), batch=3, num_stages=2, num_history=3, seed=5)
    for layout in tiny_flux.token_layouts(inputs["sample"], inputs["encoder_attention_mask"]):
        mask = attention_mask(layout)[:, 0]
        t = sequence_position_ids(layout)[:, 0]
        lz = layout.text_len
        is_video = torch.arange(layout.seq_len) >= lz
        for b in range(mask.shape[0]):
            valid = torch.cat([layout.text_mask[b], torch.ones(layout.video_len, dtype=torch.bool)])
            m = mask[b]
            assert m.diagonal().all()
            # a frame never sees a later frame; same-frame video tokens see each other
            vv = is_video[:, None] & is_video[None, :]
            assert not m[vv & (t[None, :] > t[:, None])].any()
            assert m[vv & (t[None, :] == t[:, None])].all()
            assert m[vv & (t[None, :] < t[:, None])].all()
            # pads see only pads, and only pads see pads
            pad = ~valid
            assert not m[pad][:, valid].any() and m[pad][:, pad].all()
            assert not m[valid][:, pad].any()
            # valid text sees valid text and the t = 0 frame(s) only
            vt = valid & ~is_video
            assert m[vt][:, vt].all()
            assert torch.equal(m[vt][:, is_video].any(0), (t == 0)[is_video])


def test_layout_blocks_roles_levels_and_positions(tiny_flux):
    inputs = tiny_pyramid_inputs(tiny_miniflux_config(), batch=1, num_stages=2, num_history=3, base_grid=(2, 3))
    layouts = token_layout(inputs["sample"], inputs["encoder_attention_mask"], num_levels=2)
    # stage 0: [2 old frames @0, last cond @0, noisy @0]; stage 1: [2 old @0, last cond @1, noisy @1]
    assert layouts[0].frame_blocks() == [(2, 2, 3, 0), (1, 2, 3, 0), (1, 2, 3, 0)]
    assert layouts[1].frame_blocks() == [(2, 2, 3, 0), (1, 4, 6, 1), (1, 4, 6, 1)]
    assert [b.role for b in layouts[1].blocks] == ["history", "history", "noisy"]
    assert [b.start for b in layouts[1].blocks] == [6, 18, 42] and layouts[1].seq_len == 66
    pos = sequence_position_ids(layouts[1])
    old = pos[6:12]  # first history frame, 2×3 tokens on a 4×6 grid: positions 2i + 0.5
    assert torch.equal(old[:, 1], torch.tensor([0.5, 0.5, 0.5, 2.5, 2.5, 2.5], dtype=torch.float64))
    assert torch.equal(old[:, 2], torch.tensor([0.5, 2.5, 4.5] * 2, dtype=torch.float64))
    assert pos[:6].abs().sum() == 0 and pos[42:, 0].unique().tolist() == [3.0]
    # a single-stage call only names levels when told the top grid
    single = [inputs["sample"][0]]
    assert token_layout(single, inputs["encoder_attention_mask"][:1])[0].blocks[0].level is None
    named = token_layout(single, inputs["encoder_attention_mask"][:1], full_grid=(4, 6), num_levels=2)[0]
    assert [b.level for b in named.blocks] == [0, 0, 0]


def test_release_history_rule_and_768p_token_counts():
    assert history_clips(2, 30) == [(28, 0), (1, 1), (1, 2)]
    assert history_clips(0, 3) == [(2, 0), (1, 0)]
    assert history_clips(2, 2) == [(1, 1), (1, 2)]
    grids = {0: (12, 20), 1: (24, 40), 2: (48, 80)}  # 768×1280 video → 96×160 latents → 2×2 patches
    assert [h * w for h, w in grids.values()] == [240, 960, 3840]
    clips = [torch.empty(1, 16, f, 2 * grids[lv][0], 2 * grids[lv][1], device="meta") for f, lv in history_clips(2, 30)]
    clips.append(torch.empty(1, 16, 1, 96, 160, device="meta"))
    (layout,) = token_layout([clips], torch.ones(1, 128), full_grid=(48, 80))
    assert layout.seq_len == 128 + 28 * 240 + 960 + 3840 + 3840
    assert [b.level for b in layout.blocks] == [0, 1, 2, 2]


# ----------------------------------------------------------------------------- folder layout and loading
def test_save_load_roundtrip_is_exact(flux_root, sd3_root, tiny_flux, tiny_sd3):
    for root, model, cls in [(flux_root, tiny_flux, PyramidFluxTransformer), (sd3_root, tiny_sd3, PyramidDiffusionMMDiT)]:
        folder = root / "diffusion_transformer_768p"
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
        assert json.loads((folder / "config.json").read_text())["_class_name"] == cls.__name__
        loaded = load_pyramidflow(root, dtype=torch.float32)
        assert type(loaded) is cls
        want, got = model.state_dict(), loaded.state_dict()
        assert list(got) == list(want)
        for k in want:
            assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
        # held in memory of its own, allocator-aligned, not as views of the mapped file (whose unaligned
        # offsets change matmul summation order: a loaded teacher then differs from its in-memory twin)
        misaligned = [k for k, t in got.items() if t.data_ptr() % 64]
        assert not misaligned, misaligned[:3]
    bf16 = load_pyramidflow(flux_root / "diffusion_transformer_384p", variant="miniflux", resolution="384p")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_loader_refuses_bad_requests(flux_root, sd3_root):
    with pytest.raises(CheckpointError, match="bfloat16 or float32"):
        load_pyramidflow(flux_root, dtype=torch.float16)
    with pytest.raises(CheckpointError, match="miniflux transformer, not the sd3"):
        load_pyramidflow(flux_root, variant="sd3")
    with pytest.raises(CheckpointError, match="sd3 transformer, not the miniflux"):
        load_pyramidflow(sd3_root / "diffusion_transformer_768p", variant="miniflux")
    with pytest.raises(CheckpointError, match="holds the 384p transformer"):
        load_pyramidflow(flux_root / "diffusion_transformer_384p", resolution="768p")
    with pytest.raises(CheckpointError, match="no diffusion_transformer_384p/"):
        load_pyramidflow(sd3_root, resolution="384p")


def test_loader_refuses_bad_folders(tmp_path, flux_root):
    src = flux_root / "diffusion_transformer_384p"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pyramidflow(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json and no"):
        load_pyramidflow(tmp_path / "empty")

    def variant_of(name, edit):
        folder = _copy_folder(src, tmp_path / name / "diffusion_transformer_384p")
        edit(folder)
        return folder

    from safetensors.torch import load_file, save_file

    def resave(folder, change):
        state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        change(state)
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))

    cases = {
        "missing keys: proj_out.bias": lambda f: resave(f, lambda s: s.pop("proj_out.bias")),
        "unexpected keys: extra.weight": lambda f: resave(f, lambda s: s.update({"extra.weight": torch.zeros(2)})),
        "wrong shape": lambda f: resave(f, lambda s: s.update({"proj_out.bias": torch.zeros(3)})),
        "not a readable safetensors": lambda f: (f / "diffusion_pytorch_model.safetensors").write_bytes(
            (src / "diffusion_pytorch_model.safetensors").read_bytes()[:-100]
        ),
        "only has diffusion_pytorch_model.bin": lambda f: (f / "diffusion_pytorch_model.safetensors").rename(
            f / "diffusion_pytorch_model.bin"
        ),
        "not valid JSON": lambda f: (f / "config.json").write_text("{nope"),
    }
    for i, (message, edit) in enumerate(cases.items()):
        folder = variant_of(f"case{i}", edit)
        with pytest.raises(CheckpointError, match=message):
            load_pyramidflow(folder.parent, dtype=torch.float32)


def test_published_configs_build_full_size_on_meta():
    flux = build_pyramidflow(REPO / "recipes/configs/pyramidflow-miniflux.json")
    sd3 = build_pyramidflow(REPO / "recipes/configs/pyramidflow-sd3.json")
    assert isinstance(flux, PyramidFluxTransformer) and isinstance(sd3, PyramidDiffusionMMDiT)
    # the release files are 7.89 GB and 8.34 GB of fp32 (the SD3 one includes the 192² sincos table)
    n_flux = sum(t.numel() for t in flux.state_dict().values())
    n_sd3 = sum(t.numel() for t in sd3.state_dict().values())
    assert round(n_flux * 4 / 1e9, 2) == 7.89 and round(n_sd3 * 4 / 1e9, 2) == 8.34
    assert len(flux.transformer_blocks) == 8 and len(flux.single_transformer_blocks) == 16
    single = flux.single_transformer_blocks[0]
    assert tuple(single.proj_out.weight.shape) == (1920, 1920 + 7680)
    assert single.attn.heads == 30 and single.attn.head_dim == 64
    assert len(sd3.transformer_blocks) == 24 and sd3.transformer_blocks[-1].attn.context_pre_only
    assert tuple(sd3.pos_embed.pos_embed.shape) == (1, 192 * 192, 1536)
    assert all(t.is_meta for t in flux.parameters())
