"""Gated RMSNorm op on CPU: the PyTorch reference, backend selection, argument errors, and that
importing or probing the Triton kernel never breaks the CPU path (the GPU parity is test_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from m4v_convert.layers.mixer import GatedRMSNorm
from m4v_convert.ops.gated_rmsnorm import gated_rmsnorm, gated_rmsnorm_ref, select_norm_backend

REPO = Path(__file__).resolve().parents[1]


def _by_hand(x, w, z, eps, gs, norm_before_gate):
    x, w = x.double(), w.double()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.double())
    out = torch.empty_like(x)
    for g in range(x.shape[-1] // gs):
        part = x[..., g * gs:(g + 1) * gs]
        out[..., g * gs:(g + 1) * gs] = part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + eps)
    out = out * w
    if z is not None and norm_before_gate:
        out = out * F.silu(z.double())
    return out


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("with_z", [False, True])
@pytest.mark.parametrize("gs", [4, 12])
def test_reference_matches_the_formula(norm_before_gate, with_z, gs):
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 5, 12, generator=gen), torch.randn(2, 5, 12, generator=gen)
    w = torch.randn(12, generator=gen)
    z = z if with_z else None
    got = gated_rmsnorm_ref(x, w, z, eps=1e-5, group_size=gs, norm_before_gate=norm_before_gate)
    torch.testing.assert_close(got.double(), _by_hand(x, w, z, 1e-5, gs, norm_before_gate), rtol=1e-5, atol=1e-6)
    assert torch.equal(gated_rmsnorm(x, w, z, eps=1e-5, group_size=gs, norm_before_gate=norm_before_gate), got)


def test_module_returns_input_dtype_and_uses_torch_on_cpu():
    m = GatedRMSNorm(16, 8)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert m(x, torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert select_norm_backend(x, 8) == "torch"


def test_backend_selection_and_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton's interpreter off: CPU tensors are refused
    x = torch.randn(2, 8)
    assert select_norm_backend(x, 4, "torch") == "torch"
    with pytest.raises(RuntimeError, match="CUDA"):
        select_norm_backend(x, 4, "triton")
    with pytest.raises(ValueError, match="backend"):
        select_norm_backend(x, 4, "cuda")
    with pytest.raises(ValueError, match="'z'"):
        gated_rmsnorm(x, torch.ones(8), torch.randn(2, 4))
    with pytest.raises(ValueError, match="group_size"):
        gated_rmsnorm(x, torch.ones(8), group_size=3)


_PROBE = textwrap.dedent("""
    import sys, torch
    {setup}
    from m4v_convert.ops import gated_rmsnorm as g
    x = torch.randn(2, 8); z = torch.randn(2, 8)
    y = g.gated_rmsnorm(x, torch.ones(8), z, group_size=4)
    assert torch.isfinite(y).all()
    print("AVAILABLE", g.triton_rmsnorm_available())
    print("ERROR", g.triton_rmsnorm_error())
    print("BACKEND", g.select_norm_backend(x, 4))
""")


def _probe(tmp_path, setup="", fake_pkg=None):
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
    out = subprocess.run([sys.executable, "-c", _PROBE.format(setup=setup)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


def test_without_mamba_ssm_the_torch_path_runs(tmp_path):
    res = _probe(tmp_path, setup="sys.modules['mamba_ssm'] = None")
    assert res["AVAILABLE"] == "False" and res["BACKEND"] == "torch" and res["ERROR"] != "None"


def test_kernel_found_past_a_broken_init_but_never_used_on_cpu(tmp_path):
    res = _probe(tmp_path, fake_pkg={
        "mamba_ssm/__init__.py": "raise ImportError('selective_scan_cuda missing')\\n",
        "mamba_ssm/ops/__init__.py": "",
        "mamba_ssm/ops/triton/__init__.py": "",
        "mamba_ssm/ops/triton/layernorm_gated.py": """
            def rmsnorm_fn(*args, **kwargs):
                raise AssertionError("must not be called for CPU tensors")
        """,
    })
    assert res["AVAILABLE"] == "True" and res["BACKEND"] == "torch" and res["ERROR"] == "None"
