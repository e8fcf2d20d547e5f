"""Gated RMSNorm (mamba-ssm ``RMSNormGated``): PyTorch reference and mamba-ssm's Triton kernel.

``gated_rmsnorm`` normalizes each group of ``group_size`` channels by its RMS, scales by
``weight`` and gates with ``silu(z)`` (before the norm unless ``norm_before_gate``). On CUDA it
runs mamba-ssm's ``mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn`` (one fused pass, its own
backward) when that module imports; everywhere else the PyTorch path below, which computes in
float32 and returns x's dtype, like the kernel. The kernel is looked up on first CUDA use through
:func:`m4v_convert.ops.ssd_triton.load_mamba_module` (mamba-ssm's ``__init__`` and its compiled
CUDA extension are never needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m4v_convert.ops.ssd_triton import load_mamba_module, mamba_module_error
from m4v_convert.ops.triton_interpreter import interpreter_on

_NORM_MODULE = "mamba_ssm.ops.triton.layernorm_gated"
_NORM_NAME = "rmsnorm_fn"
_BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_GROUP_BYTES = 65536  # the kernel keeps one group in one block of <= 64 KB


def gated_rmsnorm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """PyTorch gated RMSNorm.

    x: (..., hidden); weight: (hidden,); z: like x or None; group_size divides hidden (None:
    one group). Computes in float32, returns x's dtype::

        norm_before_gate=False:  rmsnorm(x * silu(z)) * weight
        norm_before_gate=True:   rmsnorm(x) * weight * silu(z)
    """
    dtype = x.dtype
    group_size = group_size or x.shape[-1]
    x = x.float()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.float())
    xg = x.unflatten(-1, (-1, group_size))
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    out = xg.flatten(-2) * weight.float()
    if z is not None and norm_before_gate:
        out = out * F.silu(z.float())
    return out.to(dtype)


def get_triton_rmsnorm():
    """mamba-ssm's Triton ``rmsnorm_fn``, or None when it cannot be imported."""
    module = load_mamba_module(_NORM_MODULE)
    fn = getattr(module, _NORM_NAME, None) if module is not None else None
    return fn if callable(fn) else None


def triton_rmsnorm_available() -> bool:
    """True when mamba-ssm's Triton gated RMSNorm imports (CUDA is checked per call)."""
    try:
        return get_triton_rmsnorm() is not None
    except Exception:  # noqa: BLE001 - never raise from an availability probe
        return False


def triton_rmsnorm_error() -> str | None:
    """Why the Triton gated RMSNorm is unavailable (None when available or not yet looked up)."""
    if load_mamba_module(_NORM_MODULE) is not None and get_triton_rmsnorm() is None:
        return f"{_NORM_MODULE} has no {_NORM_NAME}"
    return mamba_module_error(_NORM_MODULE)


def select_norm_backend(x: torch.Tensor, group_size: int | None = None, backend: str = "auto") -> str:
    """The backend :func:`gated_rmsnorm` would use: ``"triton"`` or ``"torch"``.

    ``"auto"`` picks Triton when x is a CUDA tensor in fp16/bf16/fp32, one group fits the
    kernel's 64 KB block and mamba-ssm's module imports. ``"triton"`` raises ``RuntimeError``
    when that is impossible.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"gated_rmsnorm: argument 'backend' must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    group = group_size or x.shape[-1]
    fits = x.dtype in _TRITON_DTYPES and group * x.element_size() <= _TRITON_MAX_GROUP_BYTES
    if backend == "triton":
        if not x.is_cuda and not interpreter_on():
            raise RuntimeError(f"gated_rmsnorm: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for "
                               f"Triton's interpreter on CPU), got x on {x.device}")
        if not fits:
            raise RuntimeError(f"gated_rmsnorm: backend='triton' needs fp16/bf16/fp32 and groups of at most "
                               f"64 KB, got {x.dtype} with group_size={group}")
        if not triton_rmsnorm_available():
            raise RuntimeError("gated_rmsnorm: backend='triton' requested but mamba-ssm's Triton "
                               f"{_NORM_NAME} cannot be imported ({triton_rmsnorm_error()}). Install mamba-ssm "
                               "(see DESIGN.md §7) or use backend='torch'.")
        return "triton"
    if x.is_cuda and fits and triton_rmsnorm_available():
        return "triton"
    return "torch"


def gated_rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated RMSNorm; see :func:`gated_rmsnorm_ref` for shapes and math.

    backend: "auto" | "torch" | "triton" (see :func:`select_norm_backend`). Both backends
    accumulate in float32 and return x's dtype; they agree to float32 rounding.
    """
    if z is not None and z.shape != x.shape:
        raise ValueError(f"gated_rmsnorm: argument 'z' must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if group_size is not None and x.shape[-1] % group_size:
        raise ValueError(f"gated_rmsnorm: group_size {group_size} must divide the last dim {x.shape[-1]}")
    if select_norm_backend(x, group_size, backend) == "triton":
        return get_triton_rmsnorm()(x, weight, None, z=z, eps=eps, group_size=group_size,
                                    norm_before_gate=norm_before_gate)
    return gated_rmsnorm_ref(x, weight, z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)
