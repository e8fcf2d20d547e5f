"""The GPU code path on CPU: mamba-ssm's real Triton kernels under Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py where no CUDA device is visible), against the PyTorch
path (issue 35).

What this proves: the arguments, layouts, strides and dtypes this project hands to
``mamba_chunk_scan_combined`` and ``rmsnorm_fn`` (forward and backward kernels), the MM-DiM block
and a converted Wan model on those kernels, agree with the PyTorch scan to float32 rounding. What
only a GPU shows: speed, bf16 numerics (tensor cores, tf32), memory (tests/test_gpu.py,
benchmarks/gpu_suite.sh).

The interpreter runs each kernel instance in NumPy, so the shapes are tiny. Tolerances: relative
L2 error ``‖triton − torch‖ / ‖torch‖`` below 1e-5 for outputs and gradients of the scan and norm
(both accumulate in float32; the interpreter has no tf32); for a whole block, against the PyTorch
path in float64, at most 4 times what the PyTorch path loses in float32 (at least 2e-5); 1e-4 for
a trained model's weights; NaN or inf never passes.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import m4v_convert.layers.mixer as mixer
import m4v_convert.ops as ops
import m4v_convert.ops.gated_rmsnorm as norm_ops
from m4v_convert.ops.triton_interpreter import interpreter_on

from test_gpu import _block, _block_inputs, _run_block, count_kernel_calls, rel  # noqa: F401 (a fixture)
from test_ssd_scan import float_tensors, make_inputs, run, segments


def _kernels() -> tuple[bool, str]:
    if torch.cuda.is_available():
        return False, "a CUDA device is visible: tests/test_gpu.py runs the compiled kernels"
    if not interpreter_on():
        return False, "TRITON_INTERPRET is not set (conftest.py sets it where no CUDA device is visible)"
    if not (ops.triton_scan_available() and norm_ops.triton_rmsnorm_available()):
        return False, (f"mamba-ssm's Triton modules do not import (scan: {ops.triton_scan_error()}; norm: "
                       f"{norm_ops.triton_rmsnorm_error()}); .ci/run installs triton, einops and the mamba-ssm wheel")
    return True, ""


AVAILABLE, WHY = _kernels()
if not AVAILABLE and os.environ.get("M4V_REQUIRE_INTERPRETED_KERNELS") == "1" and not torch.cuda.is_available():
    raise RuntimeError(f"M4V_REQUIRE_INTERPRETED_KERNELS=1 but {WHY}")  # CI must not skip these silently
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY)

F32 = torch.float32


def close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    err = rel(got, want)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


@pytest.fixture
def triton_backend(monkeypatch):
    """``backend="auto"`` picks Triton (as it does for CUDA tensors); ``"torch"`` stays the PyTorch path.
    ``switch(False)`` turns it back to the PyTorch path for a reference run in the same test."""
    real_scan, real_norm = ops.select_ssd_backend, norm_ops.select_norm_backend
    state = {"on": True}

    def scan(x, chunk_size, backend="auto"):
        return real_scan(x, chunk_size, "triton" if backend == "auto" and state["on"] else backend)

    def norm(x, group_size=None, backend="auto"):
        return real_norm(x, group_size, "triton" if backend == "auto" and state["on"] else backend)

    monkeypatch.setattr(ops, "select_ssd_backend", scan)
    monkeypatch.setattr(mixer, "select_ssd_backend", scan)
    monkeypatch.setattr(norm_ops, "select_norm_backend", norm)
    return lambda on: state.__setitem__("on", on)


def test_auto_never_picks_the_interpreter_by_itself():
    x = torch.randn(1, 8, 2, 4)
    assert ops.select_ssd_backend(x, 16) == "torch"
    assert norm_ops.select_norm_backend(x.flatten(-2), 8) == "torch"
    assert ops.select_ssd_backend(x, 16, "triton") == "triton"  # asked for, on CPU, under the interpreter


def test_without_the_interpreter_triton_on_cpu_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ops.select_ssd_backend(x, 16, "triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        norm_ops.select_norm_backend(x.flatten(-2), 8, "triton")


# ----------------------------------------------------------------------------- the scan

SCAN_CASES = {
    # name: make_inputs options, extra ssd_scan arguments
    "groups-D_per_head-z": (dict(g=2, D="h", z=True), {}),
    "D_per_channel-dt_bias_softplus-dt_limit": (dict(g=1, D="hp", dt_bias=True), {"dt_limit": (0.05, 0.3)}),
    "initial_states-final_states": (dict(g=2, D=None, init=True), {"return_final_states": True}),
    "seq_idx-everything": (dict(g=2, D="hp", z=True, dt_bias=True, init=True, seq="yes"),
                           {"return_final_states": True}),
}


@pytest.mark.parametrize("case", list(SCAN_CASES), ids=list(SCAN_CASES))
def test_ssd_scan_kernel_matches_torch_forward_and_every_gradient(case, count_kernel_calls):
    opts, extra = SCAN_CASES[case]
    opts = dict(opts)
    b, L, cs = 2, 24, 16  # 2 chunks, the last one partial
    seq = segments(b, (9, 15)) if opts.pop("seq", None) else None  # a segment boundary inside a chunk
    args, kw = make_inputs(b=b, L=L, h=4, p=8, n=8, seed=7, dtype=F32, seq_idx=seq, **opts)
    gen = torch.Generator().manual_seed(3)
    wy = torch.randn(b, L, 4, 8, generator=gen)
    ws = torch.randn(b, 4, 8, 8, generator=gen)

    def go(backend):
        a = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}
        k = {n: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                 else v) for n, v in kw.items()}
        out = run(ops.ssd_scan, a, k, chunk_size=cs, backend=backend, **extra)
        y, s = out if extra.get("return_final_states") else (out, None)
        loss = (y * wy).sum() + ((s * ws).sum() if s is not None else 0)
        leaves = {**a, **{n: v for n, v in k.items() if isinstance(v, torch.Tensor) and v.requires_grad}}
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return y, s, dict(zip(leaves, grads))

    y_t, s_t, g_t = go("triton")
    assert count_kernel_calls["scan"] == 1
    y_r, s_r, g_r = go("torch")
    close(y_t, y_r, 1e-5, "output")
    if s_r is not None:
        assert s_t.dtype == F32
        close(s_t, s_r, 1e-5, "final states")
    assert set(g_t) == set(g_r) and len(g_t) == len(args) + len(float_tensors(kw))
    for name in g_r:
        close(g_t[name], g_r[name], 1e-5, f"d{name}")


# ----------------------------------------------------------------------------- the gated norm


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("gate", ["none", "strided"])
def test_gated_rmsnorm_kernel_matches_torch(norm_before_gate, gate, count_kernel_calls):
    gen = torch.Generator().manual_seed(11)
    b, L, groups, gs = 2, 9, 2, 16
    hidden = groups * gs
    x = torch.randn(b, L, hidden, generator=gen)
    z_wide = torch.randn(b, L, hidden + 8, generator=gen)  # z is a slice of in_proj's output
    w = 1 + 0.1 * torch.randn(hidden, generator=gen)
    dy = torch.randn(b, L, hidden, generator=gen)

    def go(backend):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        zs = None if gate == "none" else z_wide.clone()[..., 8:].requires_grad_(True)
        y = norm_ops.gated_rmsnorm(xs, ws, zs, eps=1e-6, group_size=gs, norm_before_gate=norm_before_gate,
                                   backend=backend)
        leaves = [xs, ws] + ([zs] if zs is not None else [])
        return y, torch.autograd.grad((y * dy).sum(), leaves)

    y_t, g_t = go("triton")
    assert count_kernel_calls["norm"] == 1
    y_r, g_r = go("torch")
    close(y_t, y_r, 1e-5, "output")
    for i, (got, want) in enumerate(zip(g_t, g_r)):
        close(got, want, 1e-5, ["dx", "dweight", "dz"][i])


# ----------------------------------------------------------------------------- an MM-DiM block


@pytest.mark.parametrize("layout_name,bidirectional", [("one stage", False), ("one stage", True),
                                                       ("PyramidFlow stages", False)])
def test_mmdim_block_on_the_kernels_matches_torch(layout_name, bidirectional, count_kernel_calls, triton_backend):
    """The whole block (text sandwich, registers, zigzag, RoPE, B/C norms, temporal branch), forward
    and every parameter's gradient, on the Triton kernels and on the PyTorch path."""
    from m4v_convert.layers.recompose import FrameBlock, VideoLayout

    # small enough for the interpreter: with the text sandwich and registers, one or two scan chunks
    layout = VideoLayout.single(2, 3, 4) if layout_name == "one stage" else \
        VideoLayout((FrameBlock(1, 2, 3, 0), FrameBlock(1, 4, 6, 1)))  # two resolution stages
    torch.manual_seed(0)  # the block's own initialisation draws from the global generator
    block = _block(layout_registers=2, bidirectional=bidirectional)
    inp = _block_inputs(layout)
    got = _run_block(block, layout, inp, "cpu", F32)
    assert count_kernel_calls["scan"] == 1 and count_kernel_calls["norm"] == 1
    triton_backend(False)
    want = _run_block(block, layout, inp, "cpu", F32)
    exact = _run_block(block, layout, inp, "cpu", torch.float64)  # the PyTorch path in float64
    assert count_kernel_calls["scan"] == 1  # the references did not run the kernels
    assert set(got) == set(want) == set(exact)
    for key in want:
        # a gradient summed over every token (D, A_log, the norm weights) loses more than an output:
        # the kernels are held to what the PyTorch path itself loses in float32, times 4
        floor = rel(want[key], exact[key])
        close(got[key], exact[key], max(2e-5, 4 * floor), f"{key} (PyTorch float32 path: {floor:.1e})")


# ----------------------------------------------------------------------------- a converted model


def test_converted_wan_trains_the_same_on_the_kernels(count_kernel_calls, triton_backend):
    """A tiny converted Wan, 3 AdamW steps on each backend from the same weights: the losses and
    the final weights agree."""
    from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
    from m4v_convert.backbones.wan.testing import make_tiny_wan, tiny_wan_inputs
    from m4v_convert.recipes import load_recipe

    teacher = make_tiny_wan(seed=0)
    mmdim = {**load_recipe("wan2.1").mmdim, "temporal_dim": 8, "temporal_heads": 2, "chunk_size": 32}
    torch.manual_seed(0)
    start = M4VWanTransformer3DModel.from_teacher(teacher)
    start.convert_([0, 1], mmdim)
    batch = tiny_wan_inputs(teacher, batch=1, frames=2, height=4, width=4)
    target = torch.randn(batch["hidden_states"].shape, generator=torch.Generator().manual_seed(5))

    def train(on: bool):
        triton_backend(on)
        model = copy.deepcopy(start).train()
        params = [p for n, p in model.named_parameters() if ".mmdim." in n]
        opt = torch.optim.AdamW(params, lr=1e-3)
        losses = []
        for _ in range(3):
            loss = (model(**batch, return_dict=False)[0] - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, {n: p.detach() for n, p in model.named_parameters() if ".mmdim." in n}

    losses_t, weights_t = train(True)
    assert count_kernel_calls["scan"] == 6 and count_kernel_calls["norm"] == 6  # 2 layers × 3 steps
    losses_r, weights_r = train(False)
    assert all(torch.isfinite(torch.tensor(losses_t)))
    torch.testing.assert_close(torch.tensor(losses_t), torch.tensor(losses_r), rtol=1e-4, atol=0)
    for name in weights_r:
        close(weights_t[name], weights_r[name], 1e-4, name)
