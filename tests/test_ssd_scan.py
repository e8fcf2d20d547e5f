"""SSD scan: chunked PyTorch path vs the step-by-step oracle, seq_idx resets, gradients,
causality, input validation, Triton parity (GPU only) and import robustness without mamba-ssm."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from m4v_convert.ops import (
    select_ssd_backend,
    ssd_scan,
    ssd_scan_chunked,
    ssd_scan_ref,
    triton_scan_available,
)

F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]


def make_inputs(b=2, L=23, h=4, p=3, n=5, g=2, *, seed=0, dtype=F64, device="cpu", D="h", z=False,
                dt_bias=False, init=False, seq_idx=None, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype=dtype, device=device)

    args = dict(
        x=rnd(b, L, h, p),
        # positive dt so the (0, inf) clamp is never active unless a test wants it
        dt=(torch.rand(b, L, h, generator=gen, dtype=F64) * 0.5 + 0.05).to(dtype=dtype, device=device),
        A=(-torch.rand(h, generator=gen, dtype=F64) * 1.5 - 0.1).to(dtype=dtype, device=device),
        B=rnd(b, L, g, n, scale=0.5),
        C=rnd(b, L, g, n, scale=0.5),
    )
    kw = {}
    if D == "h":
        kw["D"] = rnd(h)
    elif D == "hp":
        kw["D"] = rnd(h, p)
    if z:
        kw["z"] = rnd(b, L, h, p)
    if dt_bias:
        kw["dt_bias"] = rnd(h, scale=0.5)
        kw["dt_softplus"] = True
    if init:
        kw["initial_states"] = rnd(b, h, p, n)
    if seq_idx is not None:
        kw["seq_idx"] = seq_idx.to(device)
    if requires_grad:
        for t in list(args.values()) + float_tensors(kw):
            t.requires_grad_(True)
    return args, kw


def float_tensors(kw):
    return [v for v in kw.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def run(fn, args, kw, **extra):
    return fn(args["x"], args["dt"], args["A"], args["B"], args["C"], **kw, **extra)


def assert_close(a, b, tol=1e-10):
    assert a.shape == b.shape
    assert torch.isfinite(a).all()
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1.0)
    assert err <= tol * scale, f"max abs err {err:.3e} (scale {scale:.3e})"


# ----------------------------------------------------------------------------- chunked vs ref

OPTION_SETS = {
    "plain": dict(D=None),
    "D_h": dict(D="h"),
    "D_hp": dict(D="hp"),
    "z": dict(D=None, z=True),
    "dt_bias_softplus": dict(D=None, dt_bias=True),
    "init": dict(D=None, init=True),
    "all": dict(D="hp", z=True, dt_bias=True, init=True),
}


@pytest.mark.parametrize("opts", list(OPTION_SETS), ids=list(OPTION_SETS))
@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_matches_ref_options(opts, seed):
    args, kw = make_inputs(L=29, seed=seed, **OPTION_SETS[opts])
    for final in (False, True):
        y_ref = run(ssd_scan_ref, args, kw, return_final_states=final)
        y = run(ssd_scan_chunked, args, kw, chunk_size=8, return_final_states=final)
        if final:
            assert_close(y[0], y_ref[0])
            assert_close(y[1], y_ref[1])
            assert y[1].shape == (2, 4, 3, 5) and y[1].dtype == F64
        else:
            assert isinstance(y, torch.Tensor)
            assert_close(y, y_ref)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("L", [1, 16, 37])
def test_chunked_matches_ref_lengths_and_chunks(chunk_size, L):
    args, kw = make_inputs(L=L, seed=L + chunk_size, D="hp", z=True, dt_bias=True, init=True)
    y_ref, s_ref = run(ssd_scan_ref, args, kw, return_final_states=True)
    y, s = run(ssd_scan_chunked, args, kw, chunk_size=chunk_size, return_final_states=True)
    assert_close(y, y_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("g", [1, 2, 6])
def test_chunked_matches_ref_groups(g):
    args, kw = make_inputs(h=6, g=g, L=21, seed=g, D="h", init=True)
    y_ref, s_ref = run(ssd_scan_ref, args, kw, return_final_states=True)
    y, s = run(ssd_scan_chunked, args, kw, chunk_size=4, return_final_states=True)
    assert_close(y, y_ref)
    assert_close(s, s_ref)


def test_groups_map_heads_to_group_i_div_ratio():
    # With g=2, h=4, heads 0,1 read group 0 and heads 2,3 read group 1: expanding B/C to
    # per-head groups (g=h) must give the same result.
    args, kw = make_inputs(h=4, g=2, L=11, seed=3)
    y = run(ssd_scan_chunked, args, kw, chunk_size=4)
    args2 = dict(args, B=args["B"].repeat_interleave(2, dim=2), C=args["C"].repeat_interleave(2, dim=2))
    assert_close(run(ssd_scan_chunked, args2, kw, chunk_size=4), y)
    args3 = dict(args, B=args["B"].repeat(1, 1, 2, 1), C=args["C"].repeat(1, 1, 2, 1))  # wrong mapping
    assert (run(ssd_scan_chunked, args3, kw, chunk_size=4) - y).abs().max() > 1e-3


@pytest.mark.parametrize("D", ["h", "hp"])
def test_ref_recurrence_by_hand(D):
    # Check the oracle itself against a plain loop over batch, heads and time.
    args, kw = make_inputs(b=2, L=5, h=4, p=2, n=3, g=2, seed=7, D=D, z=True, dt_bias=True, init=True)
    x, dt, A, B, C = (args[k] for k in ("x", "dt", "A", "B", "C"))
    Dm = kw["D"] if kw["D"].dim() == 2 else kw["D"][:, None].expand(4, 2)
    y = torch.empty_like(x)
    S_final = torch.empty_like(kw["initial_states"])
    for i in range(2):
        for j in range(4):
            k = j // 2  # heads 0,1 -> group 0; heads 2,3 -> group 1
            S = kw["initial_states"][i, j]
            for t in range(5):
                d = torch.nn.functional.softplus(dt[i, t, j] + kw["dt_bias"][j])
                S = torch.exp(d * A[j]) * S + d * torch.outer(x[i, t, j], B[i, t, k])
                out = S @ C[i, t, k] + Dm[j] * x[i, t, j]
                y[i, t, j] = out * torch.nn.functional.silu(kw["z"][i, t, j])
            S_final[i, j] = S
    y_ref, s_ref = run(ssd_scan_ref, args, kw, return_final_states=True)
    assert_close(y_ref, y)
    assert_close(s_ref, S_final)


def test_dt_limit_clamps_like_the_kernel():
    args, kw = make_inputs(L=19, seed=5)
    args["dt"] = args["dt"] - 0.3  # some negative dt, no softplus
    assert (args["dt"] < 0).any()
    y = run(ssd_scan_chunked, args, kw, chunk_size=8)
    y_clamped = run(ssd_scan_chunked, dict(args, dt=args["dt"].clamp(min=0)), kw, chunk_size=8)
    assert_close(y, y_clamped)
    assert_close(run(ssd_scan_ref, args, kw), y)
    lim = (0.1, 0.2)
    y_lim = run(ssd_scan_chunked, args, kw, chunk_size=8, dt_limit=lim)
    assert_close(y_lim, run(ssd_scan_ref, dict(args, dt=args["dt"].clamp(*lim)), kw))
    assert_close(y_lim, run(ssd_scan_ref, args, kw, dt_limit=lim))


def test_lower_precision_dtypes():
    args, kw = make_inputs(L=40, seed=2, D="h", z=True, init=True)
    y64, s64 = run(ssd_scan_ref, args, kw, return_final_states=True)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        a = {k: v.to(dtype) for k, v in args.items()}
        k = {k: v.to(dtype) for k, v in kw.items()}
        y, s = run(ssd_scan_chunked, a, k, chunk_size=16, return_final_states=True)
        assert y.dtype == dtype and s.dtype == torch.float32
        ref_y, ref_s = run(ssd_scan_ref, {k_: v.double() for k_, v in a.items()},
                           {k_: v.double() for k_, v in k.items()}, return_final_states=True)
        rel = (y.double() - ref_y).norm() / ref_y.norm()
        assert rel < tol, rel
        assert (s.double() - ref_s).norm() / ref_s.norm() < tol
    del y64, s64


def test_ssd_scan_dispatch_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton's interpreter off: CPU tensors are refused
    args, kw = make_inputs(L=13, seed=4, D="hp", z=True)
    y = run(ssd_scan, args, kw, chunk_size=4)
    assert_close(y, run(ssd_scan_ref, args, kw))
    assert_close(run(ssd_scan, args, kw, chunk_size=4, backend="torch"), y)
    assert select_ssd_backend(args["x"], 4) == "torch"
    with pytest.raises(RuntimeError, match="triton"):
        run(ssd_scan, args, kw, chunk_size=4, backend="triton")
    with pytest.raises(ValueError, match="'backend'"):
        run(ssd_scan, args, kw, backend="cuda")


def test_noncontiguous_inputs():
    args, kw = make_inputs(L=17, seed=8, D="h", z=True, init=True)
    nc = {k: v.transpose(0, 1).contiguous().transpose(0, 1) for k, v in args.items() if v.dim() >= 2}
    nc = dict(args, **nc)
    assert not nc["x"].is_contiguous()
    assert_close(run(ssd_scan, nc, kw, chunk_size=8), run(ssd_scan_ref, args, kw))


# ----------------------------------------------------------------------------- seq_idx


def segments(b, lengths):
    row = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])
    return row[None].expand(b, -1).contiguous()


@pytest.mark.parametrize("lengths,chunk_size", [
    ((5, 11, 7), 4),  # boundaries inside chunks
    ((8, 8, 8), 8),  # boundaries exactly at chunk boundaries
    ((3, 20), 32),  # a single chunk (chunk_size > L)
    ((1, 1, 9, 1), 3),  # one-step segments
])
def test_seq_idx_chunked_matches_ref(lengths, chunk_size):
    L = sum(lengths)
    si = segments(2, lengths)
    si[1] = 0  # second batch item: one segment
    args, kw = make_inputs(L=L, seed=L, D="hp", z=True, dt_bias=True, init=True, seq_idx=si)
    y_ref, s_ref = run(ssd_scan_ref, args, kw, return_final_states=True)
    y, s = run(ssd_scan_chunked, args, kw, chunk_size=chunk_size, return_final_states=True)
    assert_close(y, y_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("lengths,chunk_size", [((6, 10), 4), ((8, 8), 8), ((5, 4, 7), 16)])
def test_seq_idx_packed_equals_separate(lengths, chunk_size):
    L = sum(lengths)
    args, kw = make_inputs(b=2, L=L, seed=11, D="h", z=True, dt_bias=True, init=True,
                           seq_idx=segments(2, lengths))
    y, s = run(ssd_scan_chunked, args, kw, chunk_size=chunk_size, return_final_states=True)
    start = 0
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        a = {k: v[:, sl] if v.dim() >= 3 else v for k, v in args.items()}
        k = {name: (v[:, sl] if name == "z" else v) for name, v in kw.items() if name != "seq_idx"}
        if i > 0:
            k.pop("initial_states")  # initial_states only feeds segment 0
        y_i, s_i = run(ssd_scan_chunked, a, k, chunk_size=chunk_size, return_final_states=True)
        assert_close(y[:, sl], y_i)
        start += n
    assert_close(s, s_i)  # final state = state of the last segment alone


def test_seq_idx_no_leak_across_segments_or_batch():
    lengths, L = (9, 12), 21
    si = segments(2, lengths)
    args, kw = make_inputs(b=2, L=L, seed=12, D="h", init=True, seq_idx=si)
    y = run(ssd_scan_chunked, args, kw, chunk_size=8)
    # perturb every input of segment 0 of batch item 0
    pert = {k: v.clone() for k, v in args.items()}
    for k in ("x", "dt", "B", "C"):
        pert[k][0, :9] += 1.0
    y2 = run(ssd_scan_chunked, pert, kw, chunk_size=8)
    assert torch.equal(y2[0, 9:], y[0, 9:])  # segment 1 exactly unchanged
    assert torch.equal(y2[1], y[1])  # other batch item exactly unchanged
    assert (y2[0, :9] - y[0, :9]).abs().max() > 1e-3
    # initial_states only reaches segment 0
    k2 = dict(kw, initial_states=kw["initial_states"] * 3)
    y3 = run(ssd_scan_chunked, args, k2, chunk_size=8)
    assert torch.equal(y3[:, 9:], y[:, 9:])
    assert (y3[:, :9] - y[:, :9]).abs().max() > 1e-3


def test_seq_idx_not_starting_at_zero_ignores_initial_states():
    # Kernel convention: the state before position 0 belongs to segment id 0.
    si = segments(1, (4, 6)) + 1  # ids 1, 2
    args, kw = make_inputs(b=1, L=10, seed=13, D=None, init=True, seq_idx=si)
    y = run(ssd_scan_chunked, args, kw, chunk_size=4)
    no_init = {k: v for k, v in kw.items() if k != "initial_states"}
    assert torch.equal(y, run(ssd_scan_chunked, args, no_init, chunk_size=4))
    assert_close(run(ssd_scan_ref, args, kw), y)


# ----------------------------------------------------------------------------- gradients


def test_gradcheck_chunked():
    si = segments(1, (2, 5))  # a segment boundary inside the first chunk of 3
    args, kw = make_inputs(b=1, L=7, h=2, p=2, n=2, g=1, seed=21, D="hp", z=True, dt_bias=True, init=True,
                           seq_idx=si)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    inputs = [args.get(k, kw.get(k)).clone().requires_grad_(True) for k in names]

    def f(x, dt, A, B, C, D, z, dt_bias, initial_states):
        y, s = ssd_scan_chunked(x, dt, A, B, C, chunk_size=3, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                initial_states=initial_states, seq_idx=si, return_final_states=True)
        return y, s

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_chunked_plain_positive_dt():
    args, kw = make_inputs(b=2, L=6, h=2, p=2, n=2, g=2, seed=22, D="h")
    inputs = [args[k].clone().requires_grad_(True) for k in ("x", "dt", "A", "B", "C")] + [
        kw["D"].clone().requires_grad_(True)]

    def f(x, dt, A, B, C, D):
        return ssd_scan_chunked(x, dt, A, B, C, chunk_size=4, D=D)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_chunked_grads_match_ref_grads():
    si = segments(2, (13, 20, 15))
    args, kw = make_inputs(b=2, L=48, h=4, p=4, n=6, g=2, seed=23, D="hp", z=True, dt_bias=True, init=True,
                           seq_idx=si, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    wy = torch.randn(2, 48, 4, 4, generator=gen, dtype=F64)
    ws = torch.randn(2, 4, 4, 6, generator=gen, dtype=F64)
    leaves = list(args.values()) + float_tensors(kw)

    def grads(fn, **extra):
        y, s = run(fn, args, kw, return_final_states=True, **extra)
        return torch.autograd.grad((y * wy).sum() + (s * ws).sum(), leaves)

    for g_c, g_r in zip(grads(ssd_scan_chunked, chunk_size=16), grads(ssd_scan_ref)):
        assert_close(g_c, g_r, tol=1e-9)


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("t", [0, 7, 8, 20])
def test_causality(t):
    args, kw = make_inputs(L=24, seed=31, D="h", z=True, dt_bias=True, init=True)
    y = run(ssd_scan_chunked, args, kw, chunk_size=8)
    pert = {k: v.clone() for k, v in args.items()}
    for k in ("x", "dt", "B", "C"):
        pert[k][:, t] += 0.7
    kz = dict(kw, z=kw["z"].clone())
    kz["z"][:, t] += 0.7
    y2 = run(ssd_scan_chunked, pert, kz, chunk_size=8)
    assert torch.equal(y2[:, :t], y[:, :t])
    assert (y2[:, t:] - y[:, t:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- bad input

b_, L_, h_, p_, n_, g_ = 2, 5, 4, 3, 2, 2


def _good():
    args, kw = make_inputs(b=b_, L=L_, h=h_, p=p_, n=n_, g=g_, seed=0, D="h", z=True, dt_bias=True, init=True,
                           seq_idx=torch.zeros(b_, L_, dtype=torch.long))
    return dict(args, **kw)


BAD_CASES = [
    ("x", lambda a: a.update(x=a["x"][0]), "(batch, seqlen, nheads, headdim)"),
    ("x", lambda a: a.update(x=a["x"][:, :0], dt=a["dt"][:, :0], B=a["B"][:, :0], C=a["C"][:, :0], z=None,
                             seq_idx=None), "seqlen >= 1"),
    ("x", lambda a: a.update(x=a["x"].long()), "floating"),
    ("dt", lambda a: a.update(dt=a["dt"][:, :, :2]), "(batch, seqlen, nheads)"),
    ("dt", lambda a: a.update(dt=a["dt"][:, :-1]), "(batch, seqlen, nheads)"),
    ("dt", lambda a: a.update(dt=a["dt"].int()), "floating"),
    ("A", lambda a: a.update(A=a["A"][:, None]), "(nheads,)"),
    ("A", lambda a: a.update(A=a["A"][:3]), "(nheads,)"),
    ("B", lambda a: a.update(B=a["B"][..., 0]), "(batch, seqlen, ngroups, dstate)"),
    ("B", lambda a: a.update(B=a["B"][:1]), "(batch, seqlen, ngroups, dstate)"),
    ("B", lambda a: a.update(B=a["B"][:, :, :1].expand(-1, -1, 3, -1), C=a["C"][:, :, :1].expand(-1, -1, 3, -1)),
     "divide nheads"),
    ("C", lambda a: a.update(C=a["C"][..., :1]), "same shape as B"),
    ("C", lambda a: a.update(C=a["C"].to(torch.int64)), "floating"),
    ("D", lambda a: a.update(D=torch.ones(h_, p_ + 1, dtype=F64)), "(nheads, headdim)"),
    ("D", lambda a: a.update(D=torch.ones(h_, dtype=torch.int32)), "floating"),
    ("z", lambda a: a.update(z=a["z"][..., :1]), "(batch, seqlen, nheads, headdim)"),
    ("dt_bias", lambda a: a.update(dt_bias=torch.zeros(h_ + 1, dtype=F64)), "(nheads,)"),
    ("initial_states", lambda a: a.update(initial_states=a["initial_states"][..., :1]),
     "(batch, nheads, headdim, dstate)"),
    ("seq_idx", lambda a: a.update(seq_idx=torch.zeros(b_, L_ + 1, dtype=torch.long)), "(batch, seqlen)"),
    ("seq_idx", lambda a: a.update(seq_idx=torch.zeros(b_, L_)), "integer"),
    ("chunk_size", lambda a: a.update(chunk_size=0), ">= 1"),
    ("chunk_size", lambda a: a.update(chunk_size=2.0), ">= 1"),
    ("dt_limit", lambda a: a.update(dt_limit=(1.0, 0.0)), "dt_min <= dt_max"),
]


@pytest.mark.parametrize("name,mutate,expect", BAD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CASES)])
@pytest.mark.parametrize("fn", [ssd_scan, ssd_scan_chunked, ssd_scan_ref], ids=["scan", "chunked", "ref"])
def test_bad_input_raises(fn, name, mutate, expect):
    a = _good()
    mutate(a)
    x, dt, A, B, C = (a.pop(k) for k in ("x", "dt", "A", "B", "C"))
    with pytest.raises(ValueError) as e:
        fn(x, dt, A, B, C, **a)
    assert f"'{name}'" in str(e.value)
    assert expect in str(e.value)


def test_good_input_is_accepted():
    a = _good()
    x, dt, A, B, C = (a.pop(k) for k in ("x", "dt", "A", "B", "C"))
    assert ssd_scan(x, dt, A, B, C, chunk_size=2, **a).shape == x.shape


# ----------------------------------------------------------------------------- GPU (Triton)

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_scan_available()),
    reason="needs CUDA and mamba-ssm's Triton kernel",
)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
def test_triton_matches_chunked(dtype, tol):
    b, L, h, p, n, g, cs = 2, 300, 4, 32, 32, 2, 64
    si = segments(b, (100, 77, 123)).cuda()
    args, kw = make_inputs(b=b, L=L, h=h, p=p, n=n, g=g, seed=41, dtype=dtype, device="cuda", D="hp", z=True,
                           dt_bias=True, init=True, seq_idx=si)
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(b, L, h, p, generator=gen).cuda()
    ws = torch.randn(b, h, p, n, generator=gen).cuda()
    leaves = list(args.values()) + float_tensors(kw)

    def go(backend, device, compute=None):
        a = {k: v.detach().to(device, compute or v.dtype).requires_grad_(True) for k, v in args.items()}
        k = {kk: (v.detach().to(device, compute or v.dtype).requires_grad_(True)
                  if isinstance(v, torch.Tensor) and v.is_floating_point()
                  else (v.to(device) if isinstance(v, torch.Tensor) else v)) for kk, v in kw.items()}
        y, s = run(ssd_scan, a, k, chunk_size=cs, return_final_states=True, backend=backend)
        loss = (y.float() * wy.to(device)).sum() + (s.float() * ws.to(device)).sum()
        grads = torch.autograd.grad(loss, list(a.values()) + float_tensors(k))
        return y, s, grads

    y_t, s_t, g_t = go("triton", "cuda")
    # reference: the chunked path on CPU, same (rounded) inputs, float32 math
    y_c, s_c, g_c = go("torch", "cpu", torch.float32)
    assert y_t.dtype == dtype
    for got, want in [(y_t, y_c), (s_t, s_c)] + list(zip(g_t, g_c)):
        assert not torch.isnan(got).any()
        assert _rel(got.cpu(), want) < tol
    assert len(leaves) == len(g_t)


# ----------------------------------------------------------------------------- import robustness

_PROBE = textwrap.dedent("""
    import sys, torch
    {setup}
    import m4v_convert
    import m4v_convert.ops as ops
    assert "mamba_ssm" not in sys.modules or {allow_preloaded}, "importing m4v_convert imported mamba_ssm"
    x = torch.randn(1, 5, 2, 3); dt = torch.rand(1, 5, 2); A = -torch.rand(2)
    B = torch.randn(1, 5, 1, 4); C = torch.randn(1, 5, 1, 4)
    y = m4v_convert.ssd_scan(x, dt, A, B, C, chunk_size=2)
    assert y.shape == x.shape and torch.isfinite(y).all()
    print("AVAILABLE", ops.triton_scan_available())
    print("ERROR", ops.triton_scan_error())
    print("FN", ops.get_triton_scan())
    y = ops.ssd_scan(x, dt, A, B, C, chunk_size=2)
    try:
        ops.ssd_scan(x, dt, A, B, C, chunk_size=2, backend="triton")
    except RuntimeError as e:
        print("TRITON_CPU_RAISES", "CUDA" in str(e))
""")


def _probe(tmp_path, setup="", allow_preloaded=False, fake_pkg=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a normal run: Triton on CPU tensors is refused
    path = [str(REPO)]
    if fake_pkg is not None:
        root = tmp_path / "site"
        for rel, text in fake_pkg.items():
            f = root / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(textwrap.dedent(text))
        path.insert(0, str(root))
    env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")])
    code = _PROBE.format(setup=textwrap.dedent(setup), allow_preloaded=allow_preloaded)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


def test_import_without_mamba_ssm(tmp_path):
    # 1) mamba_ssm blocked in sys.modules (import raises ImportError)
    res = _probe(tmp_path, setup="sys.modules['mamba_ssm'] = None", allow_preloaded=True)
    assert res["AVAILABLE"] == "False" and res["FN"] == "None" and res["TRITON_CPU_RAISES"] == "True"
    # 2) a mamba_ssm whose __init__ raises (missing CUDA extension) and has no Triton kernel
    res = _probe(tmp_path, fake_pkg={
        "mamba_ssm/__init__.py": "import selective_scan_cuda_does_not_exist\n",
    })
    assert res["AVAILABLE"] == "False"
    assert "selective_scan_cuda_does_not_exist" in res["ERROR"]


def test_stub_loader_skips_broken_init(tmp_path):
    # mamba_ssm/__init__ fails, but the Triton submodule is importable on its own: the loader
    # must find it without running __init__ (and ssd_scan on CPU still uses the torch path).
    res = _probe(tmp_path, fake_pkg={
        "mamba_ssm/__init__.py": "raise ImportError('selective_scan_cuda missing')\n",
        "mamba_ssm/ops/__init__.py": "",
        "mamba_ssm/ops/triton/__init__.py": "",
        "mamba_ssm/ops/triton/ssd_combined.py": """
            from mamba_ssm.ops.triton import helper  # absolute import through the stub package
            def mamba_chunk_scan_combined(*args, **kwargs):
                raise AssertionError("must not be called for CPU tensors")
        """,
        "mamba_ssm/ops/triton/helper.py": "",
    })
    assert res["AVAILABLE"] == "True", res
    assert "mamba_chunk_scan_combined" in res["FN"]
    assert res["TRITON_CPU_RAISES"] == "True"
