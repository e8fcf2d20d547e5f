"""Argument checks and dt preprocessing shared by every SSD scan backend.

Shapes (mamba-ssm ``mamba_chunk_scan_combined`` convention)::

    x:              (batch, seqlen, nheads, headdim)
    dt:             (batch, seqlen, nheads)
    A:              (nheads,)
    B, C:           (batch, seqlen, ngroups, dstate), nheads % ngroups == 0
    D:              (nheads,) or (nheads, headdim)
    z:              (batch, seqlen, nheads, headdim)
    dt_bias:        (nheads,)
    initial_states: (batch, nheads, headdim, dstate)
    seq_idx:        (batch, seqlen), integer
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_DT_LIMIT = (0.0, float("inf"))


def _fail(name: str, msg: str) -> None:
    raise ValueError(f"ssd_scan: argument '{name}' {msg}")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_ssd_args(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    dt_limit=DEFAULT_DT_LIMIT,
    initial_states=None,
    seq_idx=None,
) -> tuple[int, int, int, int, int, int]:
    """Validate the scan arguments; return ``(batch, seqlen, nheads, headdim, ngroups, dstate)``.

    Raises ``ValueError`` whose message names the offending argument and the expected shape.
    """
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            _fail(name, f"must be a torch.Tensor, got {type(t).__name__}")
    optional = {"D": D, "z": z, "dt_bias": dt_bias, "initial_states": initial_states, "seq_idx": seq_idx}
    for name, t in optional.items():
        if t is not None and not isinstance(t, torch.Tensor):
            _fail(name, f"must be a torch.Tensor or None, got {type(t).__name__}")

    if x.dim() != 4:
        _fail("x", f"must have shape (batch, seqlen, nheads, headdim), got {x.dim()}-d shape {_shape(x)}")
    batch, seqlen, nheads, headdim = x.shape
    if seqlen == 0:
        _fail("x", f"must have seqlen >= 1 in shape (batch, seqlen, nheads, headdim), got {_shape(x)}")
    if batch == 0 or nheads == 0 or headdim == 0:
        _fail("x", f"must have non-empty (batch, seqlen, nheads, headdim), got {_shape(x)}")

    if B.dim() != 4:
        _fail("B", f"must have shape (batch, seqlen, ngroups, dstate), got {B.dim()}-d shape {_shape(B)}")
    ngroups, dstate = B.shape[2], B.shape[3]
    if ngroups == 0 or dstate == 0:
        _fail("B", f"must have non-empty (ngroups, dstate), got shape {_shape(B)}")
    if tuple(B.shape[:2]) != (batch, seqlen):
        _fail("B", f"must have shape (batch, seqlen, ngroups, dstate) = ({batch}, {seqlen}, ngroups, dstate) "
                   f"matching x, got {_shape(B)}")
    if nheads % ngroups != 0:
        _fail("B", f"has ngroups={ngroups}, which must divide nheads={nheads} "
                   f"(shape (batch, seqlen, ngroups, dstate), got {_shape(B)})")
    if _shape(C) != _shape(B):
        _fail("C", f"must have the same shape as B, (batch, seqlen, ngroups, dstate) = "
                   f"{(batch, seqlen, ngroups, dstate)}, got {_shape(C)}")
    if _shape(dt) != (batch, seqlen, nheads):
        _fail("dt", f"must have shape (batch, seqlen, nheads) = {(batch, seqlen, nheads)}, got {_shape(dt)}")
    if _shape(A) != (nheads,):
        _fail("A", f"must have shape (nheads,) = ({nheads},), got {_shape(A)}")
    if D is not None and _shape(D) not in ((nheads,), (nheads, headdim)):
        _fail("D", f"must have shape (nheads,) = ({nheads},) or (nheads, headdim) = {(nheads, headdim)}, "
                   f"got {_shape(D)}")
    if z is not None and _shape(z) != _shape(x):
        _fail("z", f"must have shape (batch, seqlen, nheads, headdim) = {_shape(x)}, got {_shape(z)}")
    if dt_bias is not None and _shape(dt_bias) != (nheads,):
        _fail("dt_bias", f"must have shape (nheads,) = ({nheads},), got {_shape(dt_bias)}")
    if initial_states is not None and _shape(initial_states) != (batch, nheads, headdim, dstate):
        _fail("initial_states", f"must have shape (batch, nheads, headdim, dstate) = "
                                f"{(batch, nheads, headdim, dstate)}, got {_shape(initial_states)}")
    if seq_idx is not None and _shape(seq_idx) != (batch, seqlen):
        _fail("seq_idx", f"must have shape (batch, seqlen) = {(batch, seqlen)}, got {_shape(seq_idx)}")

    floats = dict(named, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states)
    for name, t in floats.items():
        if t is not None and not t.is_floating_point():
            _fail(name, f"must have a floating dtype, got {t.dtype}")
    if seq_idx is not None and (seq_idx.is_floating_point() or seq_idx.is_complex() or seq_idx.dtype == torch.bool):
        _fail("seq_idx", f"must have an integer dtype, got {seq_idx.dtype}")

    devices = {name: t.device for name, t in dict(floats, seq_idx=seq_idx).items() if t is not None}
    for name, dev in devices.items():
        if dev != x.device:
            _fail(name, f"is on {dev} but x is on {x.device}; all tensors must be on one device")

    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        _fail("chunk_size", f"must be an int >= 1, got {chunk_size!r}")
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        _fail("dt_limit", f"must be a pair (dt_min, dt_max), got {dt_limit!r}")
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        _fail("dt_limit", f"must satisfy dt_min <= dt_max, got {dt_limit!r}")
    return batch, seqlen, nheads, headdim, ngroups, dstate


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32 (the Triton kernel's accumulation dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype):
    """dt -> clamp(softplus?(dt + dt_bias), *dt_limit), like mamba-ssm's ``_chunk_cumsum_fwd``.

    The clamp is applied *always*: with the default ``dt_limit=(0, inf)`` a negative dt is
    treated as 0 even without softplus. Softplus is linear above 20 (torch's default threshold
    equals the kernel's ``dt <= 20`` switch); the clamp's gradient is zero strictly outside the
    limits, as in the kernel's backward.
    """
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    return dt.clamp(min=lo, max=None if math.isinf(hi) and hi > 0 else hi)


def apply_D_z(y, x, D, z):
    """y + D * x, then * silu(z); y is in the compute dtype."""
    if D is not None:
        Dc = D.to(y.dtype)
        y = y + x.to(y.dtype) * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y
