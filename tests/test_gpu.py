"""GPU parity (issue #6): the CUDA path of the gated RMSNorm, of a whole MM-DiM block and of a
converted Wan model, against the CPU (pure-PyTorch) path. Scan parity is in test_ssd_scan.py.

Everything here is skipped without a CUDA device; the kernel tests also without mamba-ssm's
Triton modules (``mamba_ssm.ops.triton.ssd_combined`` and ``layernorm_gated``).

Tolerances (relative L2 error ``‖got − ref‖ / ‖ref‖``, the reference in float32 on the CPU from the
same rounded inputs and weights; NaN or inf never passes):

* float32: 1e-3 (the Triton scan's dots run in tf32).
* bfloat16: 1e-2, or twice the error of the pure-PyTorch path run in bfloat16 on the same GPU
  when that is larger: some gradients (A_log, D, the B/C norm weights) are sums over every token
  and lose more than 1e-2 to bf16 rounding in *any* implementation (measured on CPU with the
  PyTorch path: up to 2.3e-2), so the kernels are held to the reference's own precision, not to
  a fixed number (STYLE.md: mamba-ssm's practice).
"""

from __future__ import annotations

import copy

import pytest
import torch

import m4v_convert.ops as ops
import m4v_convert.ops.gated_rmsnorm as norm_ops
from m4v_convert.layers.mixer import GatedRMSNorm
from m4v_convert.layers.mmdim import MMDiM, MMDiMConfig
from m4v_convert.layers.recompose import FrameBlock, VideoLayout

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none is visible)")]


def _kernels_available() -> bool:
    return HAS_CUDA and ops.triton_scan_available() and norm_ops.triton_rmsnorm_available()


def _kernels_missing_reason() -> str:
    if not HAS_CUDA:
        return "needs a CUDA device (none is visible)"
    return ("needs mamba-ssm's Triton kernels (mamba_ssm.ops.triton.ssd_combined, layernorm_gated): "
            f"scan: {ops.triton_scan_error()}; norm: {norm_ops.triton_rmsnorm_error()}; install mamba-ssm as "
            "DESIGN.md §7 says (shared/gpu/make-wheels.sh builds the wheel)")


needs_kernels = pytest.mark.skipif(not _kernels_available(), reason=_kernels_missing_reason())

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), "non-finite values in the result"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def bound(dtype, baseline: float | None = None) -> float:
    return max(TOL[dtype], 2 * baseline) if baseline is not None else TOL[dtype]


@pytest.fixture
def count_kernel_calls(monkeypatch):
    """Counts calls into mamba-ssm's Triton scan and gated RMSNorm (the dispatch really happens)."""
    calls = {"scan": 0, "norm": 0}

    def counting(getter, key):
        def get():
            fn = getter()

            def wrapped(*a, **k):
                calls[key] += 1
                return fn(*a, **k)

            return wrapped if fn is not None else None

        return get

    monkeypatch.setattr(ops, "get_triton_scan", counting(ops.get_triton_scan, "scan"))
    monkeypatch.setattr(norm_ops, "get_triton_rmsnorm", counting(norm_ops.get_triton_rmsnorm, "norm"))
    return calls


def torch_kernels_only(monkeypatch) -> None:
    """Make every dispatcher pick the pure-PyTorch path (also on CUDA)."""
    monkeypatch.setattr(ops, "triton_scan_available", lambda: False)
    monkeypatch.setattr(norm_ops, "triton_rmsnorm_available", lambda: False)


# ----------------------------------------------------------------------------- gated RMSNorm


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("gate", ["none", "contiguous", "strided"])
def test_gated_rmsnorm_triton_matches_torch(dtype, tol, norm_before_gate, gate):
    gen = torch.Generator().manual_seed(11)
    b, L, groups, gs = 2, 37, 4, 128
    hidden = groups * gs
    x = torch.randn(b, L, hidden, generator=gen).to(dtype)
    z_wide = torch.randn(b, L, hidden + 40, generator=gen).to(dtype)  # z is a slice of in_proj's output
    w = 1 + 0.1 * torch.randn(hidden, generator=gen)
    dy = torch.randn(b, L, hidden, generator=gen)

    def run(device, compute, backend):
        xs = x.to(device, compute).requires_grad_(True)
        zw = z_wide.to(device, compute)
        zs = {"none": None, "contiguous": zw[..., :hidden].contiguous(), "strided": zw[..., 40:]}[gate]
        if zs is not None:
            zs.requires_grad_(True)
        ws = w.to(device).requires_grad_(True)
        y = norm_ops.gated_rmsnorm(xs, ws, zs, eps=1e-6, group_size=gs, norm_before_gate=norm_before_gate,
                                   backend=backend)
        leaves = [xs, ws] + ([zs] if zs is not None else [])
        return y, torch.autograd.grad((y.float() * dy.to(device)).sum(), leaves)

    assert norm_ops.select_norm_backend(x.cuda(), gs) == "triton"
    y_t, g_t = run("cuda", dtype, "triton")
    y_r, g_r = run("cpu", torch.float32, "torch")
    assert y_t.dtype == dtype
    assert rel(y_t, y_r) < tol
    grad_tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]  # dw sums over rows
    for got, want in zip(g_t, g_r):
        assert rel(got, want) < grad_tol


@needs_kernels
def test_gated_rmsnorm_module_uses_the_kernel_on_cuda(count_kernel_calls):
    m = GatedRMSNorm(256, 64).cuda()
    x, z = torch.randn(3, 5, 256, device="cuda"), torch.randn(3, 5, 256, device="cuda")
    out = m(x, z)
    assert count_kernel_calls["norm"] == 1
    torch.testing.assert_close(out.cpu(), GatedRMSNorm(256, 64)(x.cpu(), z.cpu()), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- MM-DiM block

LAYOUT = VideoLayout.single(3, 6, 10)  # 180 tokens; L' = 24 text + 180 + 4 registers > 3 chunks of 64
MULTI = VideoLayout((FrameBlock(2, 3, 5, 0), FrameBlock(2, 6, 10, 1)))  # two resolution stages


def _block(layout_registers: int = 1, seed: int = 0, bidirectional: bool = False) -> MMDiM:
    """A Wan-recipe-like block (text sandwich, registers, zigzag, RoPE, B/C norms, temporal branch)
    whose every parameter is perturbed, so that no path is a no-op."""
    cfg = MMDiMConfig(d_model=128, nheads=2, headdim=64, layer_index=3, bc_norm="across_groups", rotary=True,
                      chunk_size=64, num_registers=layout_registers, temporal_causal=False, temporal_dim=16,
                      temporal_heads=2, bidirectional=bidirectional)
    block = MMDiM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return block


def _block_inputs(layout: VideoLayout, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    b, lz, n = 2, 12, layout.num_tokens
    mask = torch.ones(b, lz, dtype=torch.bool)
    mask[0, ::3] = False  # padding in the middle and at the ends
    mask[0, -2:] = False
    ang = (torch.rand(n, 32, generator=gen) * 6.0).repeat_interleave(2, -1)
    return {
        "video": torch.randn(b, n, 128, generator=gen),
        "text": torch.randn(b, lz, 128, generator=gen),
        "text_mask": mask,
        "rotary": (ang.cos(), ang.sin()),  # fp32 tables, as Wan keeps its RoPE in fp32
        "w_video": torch.randn(b, n, 128, generator=gen),
        "w_text": torch.randn(b, lz, 128, generator=gen),
    }


def _run_block(block, layout, inp, device, dtype):
    """Forward + gradients of a fixed random projection of both outputs."""
    block = copy.deepcopy(block).to(device, dtype)
    video = inp["video"].to(device, dtype).requires_grad_(True)
    text = inp["text"].to(device, dtype).requires_grad_(True)
    rotary = tuple(r.to(device) for r in inp["rotary"])
    v_out, t_out = block(video, layout, text, inp["text_mask"].to(device), rotary)
    loss = (v_out.float() * inp["w_video"].to(device)).sum() + (t_out.float() * inp["w_text"].to(device)).sum()
    names = ["video", "text"] + [n for n, _ in block.named_parameters()]
    grads = torch.autograd.grad(loss, [video, text] + list(block.parameters()))
    return {"video_out": v_out, "text_out": t_out, **{f"grad {n}": g for n, g in zip(names, grads)}}


def _reference(block, layout, inp, dtype):
    """CPU float32 from the same dtype-rounded weights and inputs."""
    rounded = copy.deepcopy(block).to(dtype).float()
    inp = dict(inp, video=inp["video"].to(dtype).float(), text=inp["text"].to(dtype).float())
    return _run_block(rounded, layout, inp, "cpu", torch.float32)


def _compare(got: dict, want: dict, dtype, baseline: dict | None = None) -> None:
    assert got["video_out"].dtype == got["text_out"].dtype == dtype
    failures = []
    for key, ref in want.items():
        err = rel(got[key], ref)
        limit = bound(dtype, None if baseline is None else rel(baseline[key], ref))
        if not err < limit:
            failures.append(f"{key}: rel err {err:.2e} >= {limit:.2e}")
    assert not failures, "; ".join(failures)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [LAYOUT, MULTI], ids=["one-stage", "two-stage"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_mmdim_block_cuda_matches_cpu(dtype, layout, bidirectional, count_kernel_calls, monkeypatch):
    block = _block(layout_registers=layout.max_register + 1, bidirectional=bidirectional)
    inp = _block_inputs(layout)
    probe = torch.empty(1, 1, 2, 64, device="cuda", dtype=dtype)
    assert ops.select_ssd_backend(probe, block.config.chunk_size) == "triton"
    assert norm_ops.select_norm_backend(probe, 64) == "triton"

    got = _run_block(block, layout, inp, "cuda", dtype)
    assert count_kernel_calls["scan"] >= 1 and count_kernel_calls["norm"] >= 1
    want = _reference(block, layout, inp, dtype)
    baseline = None
    if dtype != torch.float32:
        torch_kernels_only(monkeypatch)
        baseline = _run_block(block, layout, inp, "cuda", dtype)
    _compare(got, want, dtype, baseline)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mmdim_block_pytorch_path_on_cuda_matches_cpu(dtype, monkeypatch):
    """Without the kernels (or without mamba-ssm) the block still runs on CUDA, same numbers."""
    torch_kernels_only(monkeypatch)
    block, inp = _block(), _block_inputs(LAYOUT)
    got = _run_block(block, LAYOUT, inp, "cuda", dtype)
    want = _reference(block, LAYOUT, inp, dtype)
    baseline = None
    if dtype != torch.float32:  # bf16: the same path in bf16 on the CPU is the yardstick
        rounded = copy.deepcopy(block).to(dtype)
        baseline = _run_block(rounded, LAYOUT, dict(inp, video=inp["video"].to(dtype).float(),
                                                     text=inp["text"].to(dtype).float()), "cpu", dtype)
    _compare(got, want, dtype, baseline)


@needs_kernels
def test_mmdim_block_autocast_bf16_runs_the_kernels(count_kernel_calls):
    """bf16 autocast over fp32 weights (how distillation trains): one dtype reaches the kernels."""
    block, inp = _block().cuda(), _block_inputs(LAYOUT)
    video = inp["video"].cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        v_out, t_out = block(video, LAYOUT, inp["text"].cuda(), inp["text_mask"].cuda(),
                             tuple(r.cuda() for r in inp["rotary"]))
    (v_out.float().square().mean() + t_out.float().square().mean()).backward()
    assert count_kernel_calls["scan"] >= 1 and count_kernel_calls["norm"] >= 1
    assert torch.isfinite(v_out).all() and torch.isfinite(video.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())
    want = _reference(block, LAYOUT, inp, torch.float32)["video_out"]
    assert rel(v_out.float(), want) < 3e-2  # bf16 matmuls under autocast, fp32 weights


# ----------------------------------------------------------------------------- converted Wan


def _tiny_converted(seed: int = 1):
    from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
    from m4v_convert.backbones.wan.testing import make_tiny_wan

    teacher = make_tiny_wan(seed=seed)
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    student.convert_([0, 1], {"bc_norm": "across_groups", "rotary": True, "temporal_causal": False,
                              "temporal_dim": 8, "temporal_heads": 2, "chunk_size": 64})
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move the MM-DiM parameters off their (partly constant) init
        for name, p in student.named_parameters():
            if ".attn1.mmdim." in name:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return student.eval()


def _wan_inputs(model):
    from m4v_convert.backbones.wan.testing import tiny_wan_inputs

    kw = tiny_wan_inputs(model, batch=2, frames=5, height=16, width=16, text_len=7)  # 320 tokens
    kw["encoder_hidden_states"][0, 4:] = 0  # pipeline padding in item 0
    return kw


def _wan_forward(model, kw, device, dtype):
    model = copy.deepcopy(model).to(device, dtype)
    kw = {k: (v.to(device, dtype) if k != "timestep" else v.to(device)) for k, v in kw.items()}
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_wan_cuda_matches_cpu(dtype, count_kernel_calls, monkeypatch):
    student = _tiny_converted()
    kw = _wan_inputs(student)
    got = _wan_forward(student, kw, "cuda", dtype)
    assert count_kernel_calls["scan"] == 2 and count_kernel_calls["norm"] == 2  # one per converted layer
    want = _wan_forward(copy.deepcopy(student).to(dtype).float(),
                        {k: (v.to(dtype).float() if k != "timestep" else v) for k, v in kw.items()}, "cpu",
                        torch.float32)
    baseline = None
    if dtype != torch.float32:
        torch_kernels_only(monkeypatch)
        baseline = rel(_wan_forward(student, kw, "cuda", dtype), want)
    assert got.dtype == dtype
    assert rel(got, want) < bound(dtype, baseline)


@needs_kernels
def test_converted_wan_trains_on_cuda_in_bf16(count_kernel_calls):
    """One backward through both converted layers with the kernels: finite gradients everywhere."""
    student = _tiny_converted().cuda().train()
    kw = {k: v.cuda() for k, v in _wan_inputs(student).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = student(**kw, return_dict=False)[0]
    out.float().square().mean().backward()
    assert count_kernel_calls["scan"] == 2
    grads = [p.grad for n, p in student.named_parameters() if ".attn1.mmdim." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
