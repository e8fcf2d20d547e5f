"""Scan math: the SSD (Mamba2) scan with a Triton (CUDA) backend and a plain-PyTorch backend.

``ssd_scan`` has the shapes and semantics of mamba-ssm's ``mamba_chunk_scan_combined``.
Importing this package never imports mamba-ssm; the kernel is looked up on first CUDA use.
"""

from __future__ import annotations

import torch

from m4v_convert.ops._ssd_common import DEFAULT_DT_LIMIT, check_ssd_args
from m4v_convert.ops.ssd_chunked import _ssd_chunked, ssd_scan_chunked
from m4v_convert.ops.ssd_ref import ssd_scan_ref
from m4v_convert.ops.ssd_triton import get_triton_scan, triton_scan_available, triton_scan_error
from m4v_convert.ops.triton_interpreter import interpreter_on

__all__ = [
    "ssd_scan",
    "ssd_scan_chunked",
    "ssd_scan_ref",
    "triton_scan_available",
    "triton_scan_error",
    "get_triton_scan",
    "select_ssd_backend",
]

_BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _is_pow2(k: int) -> bool:
    return k > 0 and (k & (k - 1)) == 0


def select_ssd_backend(x: torch.Tensor, chunk_size: int, backend: str = "auto") -> str:
    """The backend ``ssd_scan`` would use: ``"triton"`` or ``"torch"``.

    ``"auto"`` picks Triton when x is a CUDA tensor in fp16/bf16/fp32, chunk_size is a power of
    two and mamba-ssm's kernel imports; otherwise the chunked PyTorch scan (which also runs on
    CUDA). ``"triton"`` raises ``RuntimeError`` when the kernel is unavailable or x is not on
    CUDA, and ``ValueError`` for a chunk_size that is not a power of two.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"ssd_scan: argument 'backend' must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not x.is_cuda and not interpreter_on():
            raise RuntimeError(f"ssd_scan: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for "
                               f"Triton's interpreter on CPU), got x on {x.device}")
        if not _is_pow2(chunk_size):
            raise ValueError(f"ssd_scan: argument 'chunk_size' must be a power of two for backend='triton', "
                             f"got {chunk_size}")
        if not triton_scan_available():
            raise RuntimeError("ssd_scan: backend='triton' requested but mamba-ssm's Triton kernel "
                               f"mamba_chunk_scan_combined cannot be imported ({triton_scan_error()}). "
                               "Install mamba-ssm (see DESIGN.md §7) or use backend='torch'.")
        return "triton"
    if x.is_cuda and x.dtype in _TRITON_DTYPES and _is_pow2(chunk_size) and triton_scan_available():
        return "triton"
    return "torch"


def ssd_scan(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size=256,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=DEFAULT_DT_LIMIT,
    initial_states=None,
    seq_idx=None,
    return_final_states=False,
    backend: str = "auto",
):
    """SSD (Mamba2) scan; same contract as mamba-ssm's ``mamba_chunk_scan_combined``.

    Arguments:
        x: (batch, seqlen, nheads, headdim)
        dt: (batch, seqlen, nheads)
        A: (nheads,)
        B: (batch, seqlen, ngroups, dstate), nheads % ngroups == 0; head i reads group
            i // (nheads // ngroups)
        C: (batch, seqlen, ngroups, dstate)
        chunk_size: int >= 1 (a power of two for the Triton backend)
        D: (nheads,) or (nheads, headdim): skip connection y += D * x
        z: (batch, seqlen, nheads, headdim): gate, y *= silu(z) (after D)
        dt_bias: (nheads,), added to dt before softplus
        dt_softplus: apply softplus to dt + dt_bias
        dt_limit: (dt_min, dt_max); dt is *always* clamped to it, as in the kernel, so with the
            default (0, inf) a negative dt counts as 0
        initial_states: (batch, nheads, headdim, dstate)
        seq_idx: (batch, seqlen) integer, non-decreasing per row; the state resets where it
            changes. ``initial_states`` only feeds segment id 0 (ignored if seq_idx[:, 0] != 0)
        return_final_states: also return the state after the last step
        backend: "auto" | "torch" | "triton" (see :func:`select_ssd_backend`)
    Return:
        out: (batch, seqlen, nheads, headdim), dtype of x
        or (out, final_states) if return_final_states; final_states
        (batch, nheads, headdim, dstate) in float32 (float64 for float64 inputs on "torch")

    Per head and step::

        dt_t = clamp(softplus?(dt_t + dt_bias), *dt_limit)
        S_t  = exp(dt_t * A) S_{t-1} + dt_t x_t ⊗ B_t ;   y_t = (S_t C_t + D x_t) * silu(z_t)
    """
    check_ssd_args(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_limit=dt_limit,
        initial_states=initial_states, seq_idx=seq_idx,
    )
    if select_ssd_backend(x, chunk_size, backend) == "triton":
        fn = get_triton_scan()

        def c(t):
            return t.contiguous() if t is not None else None

        return fn(
            c(x), c(dt), c(A), c(B), c(C), chunk_size,
            D=c(D), z=c(z), dt_bias=c(dt_bias), initial_states=c(initial_states), seq_idx=c(seq_idx),
            dt_softplus=dt_softplus, dt_limit=(float(dt_limit[0]), float(dt_limit[1])),
            return_final_states=return_final_states,
        )
    return _ssd_chunked(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        dt_limit=dt_limit, initial_states=initial_states, seq_idx=seq_idx,
        return_final_states=return_final_states,
    )
