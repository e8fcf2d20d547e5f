"""MM-DiM block pieces: re-composition, mixer, temporal branch, init from attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from m4v_convert.layers.init_from_attention import AttentionWeights, mmdim_from_attention
from m4v_convert.layers.mixer import Mamba2Mixer, MixerConfig
from m4v_convert.layers.mmdim import MMDiM, MMDiMConfig
from m4v_convert.layers.recompose import (
    NUM_PATHS, FrameBlock, Recomposer, VideoLayout, text_sandwich_indices, zigzag_order,
)
from m4v_convert.layers.temporal import TemporalBranch

MULTI_STAGE = VideoLayout((FrameBlock(2, 2, 3, 0), FrameBlock(1, 4, 6, 1), FrameBlock(2, 4, 6, 1)))


# ---------------------------------------------------------------- zigzag paths

@pytest.mark.parametrize("h,w", [(3, 4), (4, 4), (5, 2), (2, 7)])
def test_zigzag_paths_visit_every_cell_once_through_neighbours(h, w):
    orders = []
    for path in range(NUM_PATHS):
        order = zigzag_order(h, w, path)
        assert sorted(order.tolist()) == list(range(h * w))
        rows, cols = order // w, order % w
        steps = (rows[1:] - rows[:-1]).abs() + (cols[1:] - cols[:-1]).abs()
        assert torch.all(steps == 1), f"path {path} jumps"
        orders.append(tuple(order.tolist()))
    assert len(set(orders)) == NUM_PATHS


def test_zigzag_start_corners():
    h, w = 3, 4
    corners = {zigzag_order(h, w, p)[0].item() for p in range(4)}
    assert corners == {0, w - 1, (h - 1) * w, h * w - 1}
    # paths 0-3 are row snakes: the first w cells share a row; 4-7 column snakes
    assert (zigzag_order(h, w, 0)[:w] // w).unique().numel() == 1
    assert (zigzag_order(h, w, 4)[:h] % w).unique().numel() == 1


# ---------------------------------------------------------------- text sandwich

def test_text_sandwich_pads_are_zero_and_valid_text_touches_video():
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    b, lz, d = mask.shape[0], mask.shape[1], 3
    text = torch.randn(b, lz, d) + 5.0  # never zero
    layout = VideoLayout.single(2, 2, 2)
    rc = Recomposer(layout, 0, registers=True, text_sandwich=True)
    video = torch.randn(b, layout.num_tokens, d)
    seq = rc.forward(video, torch.randn(1, d), text, mask)
    n_video = rc.sequence_length(lz) - 2 * lz
    z_l, z_r = seq[:, :lz], seq[:, lz + n_video:]
    for i in range(b):
        valid = text[i][mask[i]]
        k = valid.shape[0]
        assert torch.equal(z_l[i, lz - k:], valid)  # right-aligned, ends right before the video
        assert torch.equal(z_r[i, :k], valid)  # left-aligned, starts right after the video
        assert torch.all(z_l[i, : lz - k] == 0) and torch.all(z_r[i, k:] == 0)


def test_text_sandwich_indices_all_pad_row():
    left, right = text_sandwich_indices(torch.zeros(1, 4, dtype=torch.bool))
    assert torch.all(left == 4) and torch.all(right == 4)


# ---------------------------------------------------------------- inverse

@pytest.mark.parametrize("path", list(range(NUM_PATHS)) + [None])
@pytest.mark.parametrize("layout", [VideoLayout.single(3, 2, 5), MULTI_STAGE])
@pytest.mark.parametrize("registers,sandwich", [(True, True), (False, True), (True, False), (False, False)])
def test_inverse_of_forward_is_identity(path, layout, registers, sandwich):
    b, d, lz = 2, 4, 5
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    text = torch.randn(b, lz, d)
    video = torch.randn(b, layout.num_tokens, d)
    rc = Recomposer(layout, path, registers=registers, text_sandwich=sandwich)
    seq = rc.forward(video, torch.randn(2, d), text, mask)
    assert seq.shape[1] == rc.sequence_length(lz)
    v, t = rc.inverse(seq, text, mask)
    assert torch.equal(v, video)
    if sandwich:
        # both copies come back and are summed at the valid positions; pads get zero
        assert torch.allclose(t, 2 * text * mask.unsqueeze(-1))
    else:
        assert t is None


def test_registers_sit_before_every_frame_and_once_at_the_end():
    layout = MULTI_STAGE
    d = 2
    regs = torch.tensor([[100.0, 100.0], [200.0, 200.0]])
    video = torch.zeros(1, layout.num_tokens, d)
    rc = Recomposer(layout, 3, registers=True, text_sandwich=False)
    seq = rc.forward(video, regs)[0, :, 0]
    is_reg = seq > 0
    expected, pos = [], 0
    for _, h, w, reg, _ in layout.frame_slices():
        expected.append((pos, 100.0 * (reg + 1)))
        pos += 1 + h * w
    expected.append((pos, 200.0))
    assert is_reg.sum().item() == layout.num_frames + 1
    for p, val in expected:
        assert seq[p].item() == val


def _time_major_by_hand(layout, path):
    """The time-major video order written out with loops: per frame block, its cells in the zigzag
    path's order, at each cell every frame (forwards at even cells, backwards at odd ones)."""
    order, start = [], 0
    for b in layout.blocks:
        cells = list(range(b.frame_tokens)) if path is None else zigzag_order(b.height, b.width, path).tolist()
        for k, cell in enumerate(cells):
            frames = range(b.num_frames) if k % 2 == 0 else reversed(range(b.num_frames))
            order += [start + t * b.frame_tokens + cell for t in frames]
        start += b.num_tokens
    return order


@pytest.mark.parametrize("path", [0, 5, None])
@pytest.mark.parametrize("layout", [VideoLayout.single(4, 3, 5), MULTI_STAGE])
def test_time_major_scan_is_the_order_by_hand_its_inverse_and_its_rotary_rows(path, layout):
    b, d, lz = 2, 3, 4
    video = torch.randn(b, layout.num_tokens, d)
    regs = torch.tensor([[100.0] * d, [200.0] * d])
    text, mask = torch.randn(b, lz, d), torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    rc = Recomposer(layout, path, registers=True, text_sandwich=True, time_major=True)
    seq = rc.forward(video, regs, text, mask)
    assert seq.shape[1] == rc.sequence_length(lz) == Recomposer(
        layout, path, registers=True, text_sandwich=True).sequence_length(lz)  # the same length: the same FLOPs
    body = seq[:, lz:seq.shape[1] - lz]
    is_reg = body[0, :, 0] >= 100
    assert torch.equal(body[:, ~is_reg], video[:, _time_major_by_hand(layout, path)])
    # each block's registers (one per frame) before it, the last block's once more at the end
    expected_regs, pos = [], 0
    for blk in layout.blocks:
        expected_regs += list(range(pos, pos + blk.num_frames))
        pos += blk.num_frames + blk.num_tokens
    assert torch.nonzero(is_reg).squeeze(1).tolist() == expected_regs + [pos]
    v, t = rc.inverse(seq, text, mask)
    assert torch.equal(v, video) and torch.allclose(t, 2 * text * mask.unsqueeze(-1))
    # a per-token table (RoPE) lands on the rows of its own tokens
    table = torch.arange(layout.num_tokens, dtype=torch.float32)[:, None]
    rows = rc.permute_rows(table, torch.tensor([-1.0]), lz)[lz:seq.shape[1] - lz, 0]
    assert rows[~is_reg].long().tolist() == _time_major_by_hand(layout, path) and torch.all(rows[is_reg] == -1)


def test_time_major_neighbours_are_one_step_apart():
    layout = VideoLayout.single(5, 4, 6)
    order = _time_major_by_hand(layout, 2)
    for a, b in zip(order, order[1:]):
        (ta, ca), (tb, cb) = divmod(a, 24), divmod(b, 24)
        same_cell_next_frame = ca == cb and abs(ta - tb) == 1
        same_frame_next_cell = ta == tb and abs(ca // 6 - cb // 6) + abs(ca % 6 - cb % 6) == 1
        assert same_cell_next_frame or same_frame_next_cell


def test_block_scan_option_feeds_the_mixer_its_order_and_is_off_by_default():
    layout = VideoLayout.single(3, 2, 4)
    video = torch.randn(1, layout.num_tokens, 8, dtype=torch.float64)
    seen = {}

    def run(**kw):
        torch.manual_seed(0)
        blk = _block(layer_index=1, **kw)
        blk.mixer.register_forward_hook(lambda m, args, out: seen.__setitem__(kw.get("scan"), args[0]))
        return blk(video, layout)[0]

    space, default = run(scan="space"), run()
    assert torch.equal(space, default)  # off: today's block exactly
    time_major, alternate = run(scan="time"), run(scan="alternate")  # layer 1 is odd: alternate = time
    assert torch.equal(time_major, alternate) and not torch.allclose(time_major, space)
    is_reg = torch.zeros(seen["time"].shape[1], dtype=torch.bool)
    is_reg[:layout.num_frames] = True
    is_reg[-1] = True
    assert torch.equal(seen["time"][0, ~is_reg], video[0, _time_major_by_hand(layout, 1)])
    assert MMDiMConfig(d_model=8, nheads=2, headdim=4, layer_index=2, scan="alternate").time_major is False
    with pytest.raises(ValueError, match="scan: expected one of space, time, alternate"):
        MMDiMConfig(d_model=8, nheads=2, headdim=4, scan="diagonal")


def test_index_tables_are_cached():
    from m4v_convert.layers.recompose import video_indices

    a = video_indices(MULTI_STAGE, 5, True, "cpu")
    b = video_indices(MULTI_STAGE, 5, True, "cpu")
    assert a[0] is b[0] and a[1] is b[1]


# ---------------------------------------------------------------- mixer

def _attention_weights(d, heads, hd, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    inner = heads * hd
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype) / math.sqrt(s[-1])  # noqa: E731
    return AttentionWeights(
        heads=heads, head_dim=hd,
        q_weight=r(inner, d), k_weight=r(inner, d), v_weight=r(inner, d), out_weight=r(d, inner),
        q_bias=r(inner), k_bias=r(inner), v_bias=r(inner), out_bias=r(d),
        q_norm_weight=1 + 0.1 * r(inner), k_norm_weight=1 + 0.1 * r(inner),
    )


def test_init_reproduces_causal_linear_attention():
    """With A→0, identity conv, constant gate and no output norm the mixer IS linear attention."""
    d, heads, hd, L = 12, 3, 4, 23
    w = _attention_weights(d, heads, hd)
    cfg = MMDiMConfig(d_model=d, nheads=heads, headdim=hd, bc_norm="across_groups", out_norm=False,
                      A_init=1e-12, dt_init=0.25, chunk_size=8, temporal=False, registers=False,
                      text_sandwich=False)
    block = mmdim_from_attention(cfg, w, dtype=torch.float64)
    u = torch.randn(2, L, d, dtype=torch.float64)
    got = block.mixer(u)

    rms = lambda t, wt: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * wt  # noqa: E731
    q = rms(u @ w.q_weight.T + w.q_bias, w.q_norm_weight).unflatten(-1, (heads, hd))
    k = rms(u @ w.k_weight.T + w.k_bias, w.k_norm_weight).unflatten(-1, (heads, hd))
    v = (u @ w.v_weight.T + w.v_bias).unflatten(-1, (heads, hd))
    scores = torch.einsum("bthn,bshn->bhts", q, k).tril()
    y = torch.einsum("bhts,bshp->bthp", scores, v).flatten(-2)
    gate = F.silu(torch.tensor(1.0, dtype=torch.float64))
    expected = (cfg.dt_init * gate * y) @ w.out_weight.T + w.out_bias
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-7)


def _dense_linear_attention(u, w, cfg, heads, hd, mask, rotate=None):
    """The init's oracle: (masked) linear attention with the teacher's q/k norms, written out densely."""
    rms = lambda t, wt: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * wt  # noqa: E731
    q = rms(u @ w.q_weight.T + w.q_bias, w.q_norm_weight).unflatten(-1, (heads, hd))
    k = rms(u @ w.k_weight.T + w.k_bias, w.k_norm_weight).unflatten(-1, (heads, hd))
    if rotate is not None:
        q, k = rotate(q), rotate(k)
    v = (u @ w.v_weight.T + w.v_bias).unflatten(-1, (heads, hd))
    scores = torch.einsum("bthn,bshn->bhts", q, k) * mask
    y = torch.einsum("bhts,bshp->bthp", scores, v).flatten(-2)
    gate = F.silu(torch.tensor(1.0, dtype=torch.float64))
    return (cfg.dt_init * gate * y) @ w.out_weight.T + w.out_bias


@pytest.mark.parametrize("rotary", [False, True])
def test_bidirectional_init_is_full_linear_attention_plus_the_diagonal(rotary):
    """Forward scan + reversed scan = every token reads every token (the diagonal twice)."""
    d, heads, hd, L = 12, 3, 4, 23
    w = _attention_weights(d, heads, hd)
    cfg = MMDiMConfig(d_model=d, nheads=heads, headdim=hd, bc_norm="across_groups", out_norm=False,
                      A_init=1e-12, dt_init=0.25, chunk_size=8, temporal=False, registers=False,
                      text_sandwich=False, bidirectional=True)
    block = mmdim_from_attention(cfg, w, dtype=torch.float64)
    u = torch.randn(2, L, d, dtype=torch.float64)
    ang = torch.randn(2, L, hd // 2, dtype=torch.float64)
    tables = (ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1))

    def rotate(t):  # interleaved pairs, one angle per pair, per batch item and position
        c, s_ = ang.cos()[:, :, None], ang.sin()[:, :, None]
        x1, x2 = t[..., 0::2], t[..., 1::2]
        return torch.stack([x1 * c - x2 * s_, x1 * s_ + x2 * c], -1).flatten(-2)

    got = block.mixer(u, rotary=tables if rotary else None)
    mask = torch.ones(L, L, dtype=torch.float64) + torch.eye(L, dtype=torch.float64)
    expected = _dense_linear_attention(u, w, cfg, heads, hd, mask, rotate if rotary else None)
    tol = 1e-5 if rotary else 1e-7  # the rotation runs in float32 (apply_rotary_table)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_joint_init_is_linear_attention_with_separate_text_weights(bidirectional):
    """Joint (double-stream) attention: text rows project with the text Q/K/V/O and norms, video
    rows with the video ones, and all rows attend as one sequence (oracle written densely)."""
    d, heads, hd, L = 12, 3, 4, 21
    torch.manual_seed(3)
    wv, wt = _attention_weights(d, heads, hd), _attention_weights(d, heads, hd, seed=1)
    cfg = MMDiMConfig(d_model=d, nheads=heads, headdim=hd, bc_norm="per_group", out_norm=False,
                      A_init=1e-12, dt_init=0.25, chunk_size=8, temporal=False, registers=False,
                      text_sandwich=False, bidirectional=bidirectional, text_projections=True)
    wv.q_norm_weight, wv.k_norm_weight = 1 + 0.1 * torch.randn(hd, dtype=torch.float64), 1 + 0.1 * torch.randn(hd, dtype=torch.float64)
    wt.q_norm_weight, wt.k_norm_weight = 1 + 0.1 * torch.randn(hd, dtype=torch.float64), 1 + 0.1 * torch.randn(hd, dtype=torch.float64)
    block = mmdim_from_attention(cfg, wv, dtype=torch.float64, text_weights=wt)
    rows = torch.zeros(L, dtype=torch.bool)
    rows[:5] = rows[-4:] = True  # a sandwich: text copies at both ends
    u = torch.randn(2, L, d, dtype=torch.float64)
    got = block.mixer(u, text_rows=rows)

    def head_rms(t, wt_):  # per-head RMSNorm (bc_norm per_group)
        t = t.unflatten(-1, (heads, hd))
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * wt_

    def proj(w):
        return (head_rms(u @ w.q_weight.T + w.q_bias, w.q_norm_weight),
                head_rms(u @ w.k_weight.T + w.k_bias, w.k_norm_weight),
                (u @ w.v_weight.T + w.v_bias).unflatten(-1, (heads, hd)))

    sel = rows.view(1, L, 1, 1)
    q, k, v = (torch.where(sel, a, b) for a, b in zip(proj(wt), proj(wv)))
    mask = torch.ones(L, L, dtype=torch.float64).tril()
    if bidirectional:
        mask = torch.ones(L, L, dtype=torch.float64) + torch.eye(L, dtype=torch.float64)
    y = torch.einsum("bhts,bshp->bthp", torch.einsum("bthn,bshn->bhts", q, k) * mask, v).flatten(-2)
    y = cfg.dt_init * F.silu(torch.tensor(1.0, dtype=torch.float64)) * y
    expected = torch.where(rows.view(1, L, 1), y @ wt.out_weight.T + wt.out_bias, y @ wv.out_weight.T + wv.out_bias)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-7)
    # without text rows every row is video
    torch.testing.assert_close(block.mixer(u), mmdim_from_attention(
        MMDiMConfig(**{**cfg.__dict__, "text_projections": False}), wv, dtype=torch.float64).mixer(u))


def test_joint_block_with_equal_weights_is_the_shared_block():
    """An MM-DiM with text projections equal to the video ones computes what the shared block
    does: the sandwich's text rows (pads included) are the ones that use the text weights."""
    d, heads, hd = 12, 3, 4
    w = _attention_weights(d, heads, hd)
    base = dict(d_model=d, nheads=heads, headdim=hd, bc_norm="across_groups", chunk_size=8, temporal=False)
    shared = mmdim_from_attention(MMDiMConfig(**base), w, dtype=torch.float64)
    joint = mmdim_from_attention(MMDiMConfig(**base, text_projections=True), w, dtype=torch.float64, text_weights=w)
    with torch.no_grad():
        joint.register_tokens.copy_(shared.register_tokens)
    layout = VideoLayout.single(2, 3, 4)
    video, text = torch.randn(2, 24, d, dtype=torch.float64), torch.randn(2, 5, d, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for a, b in zip(shared(video, layout, text, mask), joint(video, layout, text, mask)):
        torch.testing.assert_close(a, b)
    # different text weights change the output of video tokens too (they read the text)
    other = _attention_weights(d, heads, hd, seed=1)
    joint2 = mmdim_from_attention(MMDiMConfig(**base, text_projections=True), w, dtype=torch.float64,
                                  text_weights=other)
    with torch.no_grad():
        joint2.register_tokens.copy_(shared.register_tokens)
    assert not torch.allclose(joint2(video, layout, text, mask)[0], shared(video, layout, text, mask)[0])
    with pytest.raises(ValueError, match="text_weights"):
        mmdim_from_attention(MMDiMConfig(**base, text_projections=True), w)


@pytest.mark.parametrize("out_norm", [True, False])
def test_bidirectional_mixer_is_the_causal_mixer_both_ways(out_norm):
    """Oracle: a unidirectional twin (same weights) run forwards and on the reversed input; the
    pre-norm scan outputs sum (read off the twin with the norm and out_proj made identities)."""
    d, heads, hd, L = 8, 2, 4, 19
    cfg = MixerConfig(d_model=d, nheads=heads, headdim=hd, d_state=4, ngroups=1, chunk_size=4,
                      conv_activation="silu", bias=True, out_norm=out_norm, bidirectional=True)
    torch.manual_seed(1)
    bi = Mamba2Mixer(cfg).double()
    with torch.no_grad():
        for p in bi.parameters():
            p.add_(0.1 * torch.randn_like(p))
    twin = Mamba2Mixer(MixerConfig(**{**cfg.__dict__, "bidirectional": False, "out_norm": False})).double()
    twin.load_state_dict({k: v for k, v in bi.state_dict().items() if not k.startswith("norm.")})
    inner = heads * hd
    with torch.no_grad():  # z gate constant (silu(big) ≈ big → divide out), out_proj identity
        twin.in_proj.weight[:inner] = 0
        twin.in_proj.bias[:inner] = 30.0
        twin.out_proj.weight.copy_(torch.eye(d, inner, dtype=torch.float64))
        twin.out_proj.bias.zero_()
    u = torch.randn(2, L, d, dtype=torch.float64)
    scale = F.silu(torch.tensor(30.0, dtype=torch.float64))
    y = (twin(u) + twin(u.flip(1)).flip(1)) / scale  # (b, L, inner) scan outputs, D skip included
    z = u @ bi.in_proj.weight[:inner].T + bi.in_proj.bias[:inner]
    if out_norm:
        g = y * F.silu(z)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * bi.norm.weight
    else:
        g = y * F.silu(z)
    expected = g @ bi.out_proj.weight.T + bi.out_proj.bias
    tol = 1e-5 if out_norm else 1e-9  # the gated RMSNorm computes in float32
    torch.testing.assert_close(bi(u), expected, rtol=tol, atol=tol)
    # packed segments stay independent in both directions
    a, b = u[:1, :11], u[1:, :8]
    seq_idx = torch.tensor([[0] * 11 + [1] * 8], dtype=torch.int32)
    packed = bi(torch.cat([a, b], 1), seq_idx=seq_idx)
    torch.testing.assert_close(packed[:, :11], bi(a))
    torch.testing.assert_close(packed[:, 11:], bi(b))


def test_init_copies_weights_into_mamba2_layout():
    d, heads, hd = 8, 2, 4
    w = _attention_weights(d, heads, hd, dtype=torch.float32)
    cfg = MMDiMConfig(d_model=d, nheads=heads, headdim=hd, bc_norm="across_groups")
    m = mmdim_from_attention(cfg, w).mixer
    inner = heads * hd
    assert torch.equal(m.in_proj.weight[inner: 2 * inner], w.v_weight)
    assert torch.equal(m.in_proj.weight[2 * inner: 3 * inner], w.k_weight)
    assert torch.equal(m.in_proj.weight[3 * inner: 4 * inner], w.q_weight)
    assert torch.equal(m.out_proj.weight, w.out_weight)
    assert torch.equal(m.C_norm.weight, w.q_norm_weight)
    assert torch.equal(m.B_norm.weight, w.k_norm_weight)


def test_init_rejects_shape_mismatch():
    w = _attention_weights(8, 2, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="q_weight"):
        bad = AttentionWeights(**{**w.__dict__, "q_weight": torch.zeros(8, 7)})
        mmdim_from_attention(MMDiMConfig(d_model=8, nheads=2, headdim=4), bad)
    with pytest.raises(ValueError, match="heads"):
        mmdim_from_attention(MMDiMConfig(d_model=8, nheads=4, headdim=2), w)


def test_mixer_packed_segments_do_not_leak():
    cfg = MixerConfig(d_model=8, nheads=2, headdim=4, d_state=4, ngroups=1, chunk_size=4)
    torch.manual_seed(0)
    m = Mamba2Mixer(cfg).double()
    a, b = torch.randn(1, 7, 8, dtype=torch.float64), torch.randn(1, 6, 8, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 7 + [1] * 6], dtype=torch.int32)
    packed = m(torch.cat([a, b], 1), seq_idx=seq_idx)
    torch.testing.assert_close(packed[:, :7], m(a))
    torch.testing.assert_close(packed[:, 7:], m(b))


def test_mixer_rotary_is_used():
    cfg = MixerConfig(d_model=8, nheads=2, headdim=4, d_state=4, ngroups=2)
    torch.manual_seed(0)
    m = Mamba2Mixer(cfg)
    u = torch.randn(1, 5, 8)
    ang = torch.randn(5, 2).repeat_interleave(2, -1)
    out_rot = m(u, rotary=(ang.cos(), ang.sin()))
    out_id = m(u, rotary=(torch.ones(5, 4), torch.zeros(5, 4)))
    torch.testing.assert_close(out_id, m(u))
    assert not torch.allclose(out_rot, out_id)


def _mamba2_cls():
    if not torch.cuda.is_available():
        return None
    from m4v_convert.ops.ssd_triton import triton_scan_available

    if not triton_scan_available():
        return None
    try:
        from mamba_ssm.modules.mamba2 import Mamba2
    except Exception:
        return None
    return Mamba2


@pytest.mark.gpu
def test_mixer_state_dict_loads_into_mamba_ssm_mamba2():
    Mamba2 = _mamba2_cls()
    if Mamba2 is None:
        pytest.skip("needs CUDA and mamba-ssm")
    torch.manual_seed(0)
    d = 64
    ref = Mamba2(d_model=d, d_state=32, d_conv=4, expand=2, headdim=16, ngroups=2, use_mem_eff_path=False,
                 chunk_size=64, device="cuda")
    cfg = MixerConfig(d_model=d, nheads=8, headdim=16, d_state=32, ngroups=2, norm_eps=1e-5, chunk_size=64)
    ours = Mamba2Mixer(cfg).cuda()
    ours.load_state_dict(ref.state_dict(), strict=True)
    u = torch.randn(2, 100, d, device="cuda")
    torch.testing.assert_close(ours(u), ref(u), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- temporal branch

def test_temporal_branch_starts_as_noop_and_is_causal():
    layout = MULTI_STAGE
    torch.manual_seed(0)
    tb = TemporalBranch(6, grid=2, dim=4, heads=2, causal=True)
    video = torch.randn(2, layout.num_tokens, 6)
    assert torch.all(tb(video, layout) == 0)
    torch.nn.init.normal_(tb.up_proj.weight)
    out = tb(video, layout)
    assert out.abs().sum() > 0
    frames = layout.frame_slices()
    # change frame 2; frames 0, 1 keep their outputs, frame 2 changes
    start2, h2, w2 = frames[2][0], frames[2][1], frames[2][2]
    video2 = video.clone()
    video2[:, start2: start2 + h2 * w2] += 1.0
    out2 = tb(video2, layout)
    assert torch.equal(out2[:, :start2], out[:, :start2])
    assert not torch.allclose(out2[:, start2: start2 + h2 * w2], out[:, start2: start2 + h2 * w2])


def test_temporal_branch_bidirectional_sees_the_future_and_sources_restrict():
    layout = VideoLayout.single(4, 4, 4)
    torch.manual_seed(0)
    tb = TemporalBranch(6, grid=2, dim=4, heads=2, causal=False)
    torch.nn.init.normal_(tb.up_proj.weight)
    video = torch.randn(1, layout.num_tokens, 6)
    video2 = video.clone()
    video2[:, -16:] += 1.0
    assert not torch.allclose(tb(video2, layout)[:, :16], tb(video, layout)[:, :16])
    # frames 0, 1 are the only sources: changing frames 2, 3 leaves frames 0, 1 unchanged
    src = torch.tensor([True, True, False, False])
    assert torch.equal(tb(video2, layout, src)[:, :32], tb(video, layout, src)[:, :32])


def test_temporal_update_is_constant_within_a_region():
    layout = VideoLayout.single(2, 4, 6)
    torch.manual_seed(0)
    tb = TemporalBranch(3, grid=2, dim=4, heads=1)
    torch.nn.init.normal_(tb.up_proj.weight)
    out = tb(torch.randn(1, layout.num_tokens, 3), layout).reshape(2, 4, 6, 3)
    assert torch.allclose(out[:, :2, :3], out[:, :1, :1].expand(-1, 2, 3, -1))
    assert not torch.allclose(out[:, 0, 0], out[:, 0, 5])


def _dense_token_queries(tb: TemporalBranch, video, layout, sources=None):
    """``queries="tokens"`` one token, one head, one slot at a time: every frame's g×g regions averaged
    over the rows/columns PyTorch's adaptive pooling assigns them (floor(i·h/g) to ceil((i+1)·h/g)), the
    region embedding added, a token's query with its own region's embedding (row·g//h, col·g//w),
    softmax over the slots its frame may read and a zero null slot, then attn_out and up_proj."""
    b, g, dim, heads = video.shape[0], tb.grid, tb.dim, tb.heads
    hd = dim // heads
    x = tb.down_proj(video)
    slots, slot_frame, tokens = [], [], []  # tokens: (index, frame, region)
    start, f0 = 0, 0
    for blk in layout.blocks:
        h, w = blk.height, blk.width
        for f in range(blk.num_frames):
            frame = x[:, start + f * h * w: start + (f + 1) * h * w].reshape(b, h, w, dim)
            for i in range(g):
                for j in range(g):
                    rows = slice(i * h // g, -(-(i + 1) * h // g))
                    cols = slice(j * w // g, -(-(j + 1) * w // g))
                    slots.append(frame[:, rows, cols].mean((1, 2)) + tb.region_embed[i * g + j])
                    slot_frame.append(f0 + f)
            for r in range(h):
                for c in range(w):
                    tokens.append((start + f * h * w + r * w + c, f0 + f, (r * g // h) * g + c * g // w))
        start += blk.num_tokens
        f0 += blk.num_frames
    kv = tb.kv_proj(torch.stack(slots, 1))  # (b, S, 2·dim)
    k, v = kv[..., :dim], kv[..., dim:]
    out = torch.zeros(b, layout.num_tokens, dim)
    for n, frame, region in tokens:
        q = tb.q_proj(x[:, n] + tb.region_embed[region])  # (b, dim)
        for bi in range(b):
            for hh in range(heads):
                cols = slice(hh * hd, (hh + 1) * hd)
                scores, values = [torch.tensor(0.0)], [torch.zeros(hd)]  # the null slot
                for s, sf in enumerate(slot_frame):
                    if tb.causal and sf > frame:
                        continue
                    if sources is not None and not bool(sources[bi, sf] if sources.dim() == 2 else sources[sf]):
                        continue
                    scores.append(q[bi, cols] @ k[bi, s, cols] / math.sqrt(hd))
                    values.append(v[bi, s, cols])
                p = torch.softmax(torch.stack(scores), 0)
                out[bi, n, cols] = (p[:, None] * torch.stack(values)).sum(0)
    return tb.up_proj(tb.attn_out(out))


@pytest.mark.parametrize("causal, layout, grid", [
    (True, MULTI_STAGE, 2),
    (False, VideoLayout.single(3, 3, 5), 2),  # rows and columns not divisible by the grid: regions overlap
    (False, VideoLayout.single(2, 4, 4), 3),
])
def test_temporal_token_queries_match_a_dense_reference(causal, layout, grid):
    torch.manual_seed(0)
    tb = TemporalBranch(6, grid=grid, dim=4, heads=2, causal=causal, queries="tokens")
    video = torch.randn(2, layout.num_tokens, 6)
    assert torch.all(tb(video, layout) == 0)  # up_proj starts at zero: a no-op
    torch.nn.init.normal_(tb.up_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(tb(video, layout), _dense_token_queries(tb, video, layout), rtol=1e-5, atol=1e-6)
        t = torch.arange(layout.num_frames)
        sources = torch.stack([t % 2 == 0, t >= 1])  # per sample: the frames it may read
        torch.testing.assert_close(tb(video, layout, sources), _dense_token_queries(tb, video, layout, sources),
                                   rtol=1e-5, atol=1e-6)


def test_temporal_token_queries_differ_within_a_region():
    """What a token reads depends on the token (frames mode: one update per region, see above)."""
    layout = VideoLayout.single(2, 4, 6)
    torch.manual_seed(0)
    tb = TemporalBranch(3, grid=2, dim=4, heads=1, queries="tokens")
    torch.nn.init.normal_(tb.up_proj.weight)
    out = tb(torch.randn(1, layout.num_tokens, 3), layout).reshape(2, 4, 6, 3)
    assert not torch.allclose(out[:, 0, 0], out[:, 1, 1])  # same region, different tokens


def test_temporal_queries_frames_is_todays_branch():
    """The default builds the same parameters in the same order (so the same random draws and weights)
    as before the option existed, and a saved config without the field loads as it."""
    cfg = MMDiMConfig(d_model=8, nheads=2, headdim=4, temporal_dim=4, temporal_heads=2)
    assert cfg.temporal_queries == "frames"
    blk = MMDiM(cfg)
    assert [k for k in blk.state_dict() if k.startswith("temporal.")] == [
        f"temporal.{m}.{p}" for m in ("down_proj", "qkv", "attn_out", "up_proj") for p in ("weight", "bias")]
    old = {k: v for k, v in cfg.to_dict().items() if k != "temporal_queries"}
    assert MMDiMConfig.from_dict(old) == cfg
    with pytest.raises(ValueError, match="temporal queries"):
        MMDiM(MMDiMConfig(d_model=8, nheads=2, headdim=4, temporal_queries="pixels"))


# ---------------------------------------------------------------- full block

def _block(**kw):
    cfg = MMDiMConfig(d_model=8, nheads=2, headdim=4, num_registers=2, chunk_size=8, temporal_dim=4,
                      temporal_heads=2, bc_norm="across_groups", rotary=True, **kw)
    torch.manual_seed(0)
    blk = MMDiM(cfg)
    torch.nn.init.normal_(blk.temporal.up_proj.weight)
    return blk.double()


def test_block_no_leak_across_batch_items_and_text_masks_pads():
    blk = _block(layer_index=3)
    layout = MULTI_STAGE
    b, lz = 2, 4
    video = torch.randn(b, layout.num_tokens, 8, dtype=torch.float64)
    text = torch.randn(b, lz, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    v1, t1 = blk(video, layout, text, mask)
    video2, text2 = video.clone(), text.clone()
    video2[1] += 1
    text2[1] += 1
    text2[0, 2:] += 100  # pads of item 0 must not matter
    v2, t2 = blk(video2, layout, text2, mask)
    torch.testing.assert_close(v2[0], v1[0])
    torch.testing.assert_close(t2[0, :2], t1[0, :2])
    assert torch.all(t1[0, 2:] == 0)
    # the text influences the video (text sandwich is live)
    text3 = text.clone()
    text3[0, 0] += 1
    assert not torch.allclose(blk(video, layout, text3, mask)[0][0], v1[0])


def test_block_rotary_changes_output_and_is_ignored_when_off():
    layout = VideoLayout.single(2, 2, 2)
    video = torch.randn(1, 8, 8, dtype=torch.float64)
    ang = torch.randn(8, 2, dtype=torch.float64).repeat_interleave(2, -1)
    blk = _block()
    assert not torch.allclose(blk(video, layout, rotary=(ang.cos(), ang.sin()))[0], blk(video, layout)[0])


@pytest.mark.parametrize("kw,match", [
    (dict(video=torch.randn(1, 7, 8)), "layout"),
    (dict(video=torch.randn(1, 8, 5)), "video"),
    (dict(video=torch.randn(1, 0, 8)), "L=0"),
    (dict(text=torch.randn(2, 3, 8)), "text"),
    (dict(text=torch.randn(1, 3, 8), text_mask=torch.ones(1, 4, dtype=torch.bool)), "text_mask"),
    (dict(video=torch.zeros(1, 8, 8, dtype=torch.long)), "floating"),
])
def test_block_bad_input_names_the_argument(kw, match):
    blk = MMDiM(MMDiMConfig(d_model=8, nheads=2, headdim=4, temporal_dim=4, temporal_heads=2))
    args = dict(video=torch.randn(1, 8, 8), layout=VideoLayout.single(2, 2, 2))
    args.update(kw)
    if args["video"].shape[1] == 0:
        args["layout"] = VideoLayout.single(1, 1, 1)
    with pytest.raises(ValueError, match=match):
        blk(**args)


def test_config_round_trip():
    cfg = MMDiMConfig(d_model=8, nheads=2, headdim=4, layer_index=11, temporal=False)
    again = MMDiMConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.path == 3
    with pytest.raises(ValueError, match="unknown"):
        MMDiMConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_causal_depthwise_conv_matches_conv1d_and_respects_segments():
    from m4v_convert.layers.mixer import causal_depthwise_conv

    torch.manual_seed(0)
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ref = F.conv1d(x.transpose(1, 2), w, b, padding=3, groups=6)[..., :9].transpose(1, 2)
    torch.testing.assert_close(causal_depthwise_conv(x, w, b), ref)
    seq = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    packed = causal_depthwise_conv(x, w, b, seq)
    torch.testing.assert_close(packed[0, 4:], causal_depthwise_conv(x[:1, 4:], w, b)[0])
    torch.testing.assert_close(packed[1], ref[1])
    assert torch.autograd.gradcheck(lambda x, w, b: causal_depthwise_conv(x, w, b, seq), (x, w, b))


@pytest.mark.parametrize("device,dtype", [("meta", torch.bfloat16), ("cpu", torch.float64)])
def test_every_parameter_is_built_on_the_requested_device_and_dtype(device, dtype):
    # A block built in place of a bf16 / CUDA attention layer must not keep a stray CPU fp32
    # tensor (the gated RMSNorm weight once did): it would break --device cuda and mix dtypes on save.
    cfg = MMDiMConfig(d_model=16, nheads=2, headdim=8, bc_norm="across_groups", temporal=True)
    block = MMDiM(cfg, device=device, dtype=dtype)
    wrong = [(name, p.device.type, p.dtype) for name, p in block.named_parameters()
             if p.device.type != device or p.dtype != dtype]
    assert not wrong
