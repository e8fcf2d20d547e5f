"""Step-by-step SSD (Mamba2) recurrence: slow, obviously correct, the test oracle only."""

from __future__ import annotations

import torch

from m4v_convert.ops._ssd_common import DEFAULT_DT_LIMIT, check_ssd_args, compute_dtype

# The oracle deliberately shares no math with the chunked path (only argument checking).


def ssd_scan_ref(
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
    compute_dtype_override: torch.dtype | None = torch.float64,
):
    """Sequential reference of ``mamba_chunk_scan_combined``: a python loop over time.

    Arguments:
        x: (batch, seqlen, nheads, headdim)
        dt: (batch, seqlen, nheads)
        A: (nheads,)
        B: (batch, seqlen, ngroups, dstate)
        C: (batch, seqlen, ngroups, dstate)
        chunk_size: ignored (accepted so every backend has one signature)
        D: (nheads,) or (nheads, headdim)
        z: (batch, seqlen, nheads, headdim)
        dt_bias: (nheads,)
        dt_softplus: apply softplus to dt + dt_bias
        dt_limit: (dt_min, dt_max); dt is always clamped to it (default (0, inf))
        initial_states: (batch, nheads, headdim, dstate)
        seq_idx: (batch, seqlen) int; the state resets at t where seq_idx[t] != seq_idx[t-1],
            with seq_idx[-1] taken as 0 (so ``initial_states`` only feeds segment id 0)
        compute_dtype_override: dtype of the arithmetic (float64 by default); None picks
            float32 / float64 like the chunked path
    Return:
        out: (batch, seqlen, nheads, headdim), dtype of x
        or (out, final_states) if return_final_states; final_states (batch, nheads, headdim,
        dstate) in float32 (float64 if any input is float64)

    Per head i (group i // (nheads // ngroups)) and step t::

        dt_t = clamp(softplus?(dt_t + dt_bias), *dt_limit)
        S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t ⊗ B_t       (S: headdim x dstate)
        y_t  = S_t C_t + D * x_t ;   y_t *= silu(z_t)
    """
    b, L, h, p, g, n = check_ssd_args(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_limit=dt_limit,
        initial_states=initial_states, seq_idx=seq_idx,
    )
    state_dtype = compute_dtype(x, dt, A, B, C)
    cdt = compute_dtype_override or state_dtype
    r = h // g
    dtp = dt.to(cdt)
    if dt_bias is not None:
        dtp = dtp + dt_bias.to(cdt)
    if dt_softplus:  # the kernel's softplus: log(1 + e^v) for v <= 20, identity above
        dtp = torch.where(dtp <= 20.0, torch.log1p(torch.exp(torch.clamp(dtp, max=20.0))), dtp)
    dtp = torch.maximum(dtp, torch.tensor(float(dt_limit[0]), dtype=cdt, device=x.device))
    dtp = torch.minimum(dtp, torch.tensor(float(dt_limit[1]), dtype=cdt, device=x.device))
    Ac = A.to(cdt)
    xc = x.to(cdt)
    Bh = B.to(cdt).repeat_interleave(r, dim=2)  # (b, L, h, n): head j reads group j // r
    Ch = C.to(cdt).repeat_interleave(r, dim=2)
    Dh = None
    if D is not None:
        Dh = D.to(cdt) if D.dim() == 2 else D.to(cdt)[:, None].expand(h, p)
    S = initial_states.to(cdt) if initial_states is not None else x.new_zeros(b, h, p, n, dtype=cdt)
    prev_idx = torch.zeros(b, dtype=torch.long, device=x.device)  # the id "before" step 0 is 0
    ys = []
    for t in range(L):
        decay = torch.exp(dtp[:, t] * Ac)  # (b, h)
        if seq_idx is not None:
            cur = seq_idx[:, t].long()
            decay = torch.where((cur != prev_idx)[:, None], torch.zeros_like(decay), decay)
            prev_idx = cur
        S = decay[:, :, None, None] * S + (dtp[:, t, :, None] * xc[:, t])[..., None] * Bh[:, t, :, None, :]
        out = (S * Ch[:, t, :, None, :]).sum(-1)  # S_t C_t: (b, h, p)
        if Dh is not None:
            out = out + Dh * xc[:, t]
        if z is not None:
            zt = z[:, t].to(cdt)
            out = out * zt * torch.sigmoid(zt)
        ys.append(out)
    y = torch.stack(ys, dim=1).to(x.dtype)  # (b, L, h, p)
    if return_final_states:
        return y, S.to(state_dtype)
    return y
