"""Pure-PyTorch chunked SSD scan (Mamba2 "segment-sum" / state-space-duality form).

Matches mamba-ssm's Triton ``mamba_chunk_scan_combined`` including its ``seq_idx`` and
``initial_states`` conventions, runs on any device, and is differentiable through autograd.

The sequence is cut into chunks of ``chunk_size`` steps (padded at the end with dt = 0 steps,
which leave the state unchanged, stripped afterwards). Per chunk and head, with
``a_t = dt_t * A`` and ``cs`` its cumulative sum inside the chunk:

1. intra-chunk (quadratic, like masked attention):
   ``y_l += sum_{s<=l} (C_l . B_s) exp(cs_l - cs_s) dt_s x_s``
2. chunk states: ``S_c = sum_s exp(cs_last - cs_s) dt_s x_s ⊗ B_s``
3. state passing across chunks: ``H_{c+1} = exp(cs_last of c) H_c + S_c`` (``H_0`` = initial)
4. output from states: ``y_l += exp(cs_l) H_c C_l``

With ``seq_idx``, position pairs of different segments are masked in 1 and 2, and the carried
state is dropped in 3 and 4 where the segment changes. The rules are the kernel's: a chunk
state only collects positions whose id equals the id at the chunk's last position, the carried
state survives a chunk only if the id at its last position equals the id at the previous
chunk's last position, and the carried state reaches position l only if seq_idx[l] equals the
id at the previous chunk's last position; "previous" of the first chunk is id 0, so
``initial_states`` belongs to segment 0. For non-decreasing ``seq_idx`` (packed sequences,
the only layout mamba-ssm produces) this is exactly "reset wherever seq_idx changes".

With ``seq_idx`` the decays of steps 1 and 2 are sums over exactly the steps between the two
positions (not differences of a running sum), so one segment's inputs cannot change another
segment's outputs even by a rounding error.

Intermediates are O(batch * seqlen * chunk_size * nheads); the arithmetic runs in float32
(float64 if any input is float64) and the output has x's dtype. On CPU the intra-chunk part
dominates, so a smaller chunk (e.g. 64) is several times faster than the kernel's usual 256;
the result does not depend on the chunk size beyond rounding (for non-decreasing seq_idx).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m4v_convert.ops._ssd_common import DEFAULT_DT_LIMIT, apply_D_z, check_ssd_args, compute_dtype, process_dt


def ssd_scan_chunked(
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
):
    """Chunked SSD scan in plain PyTorch; same contract as ``mamba_chunk_scan_combined``.

    Arguments:
        x: (batch, seqlen, nheads, headdim)
        dt: (batch, seqlen, nheads)
        A: (nheads,)
        B: (batch, seqlen, ngroups, dstate)
        C: (batch, seqlen, ngroups, dstate)
        chunk_size: int >= 1 (any value; seqlen need not be a multiple of it)
        D: (nheads,) or (nheads, headdim)
        z: (batch, seqlen, nheads, headdim); output is multiplied by silu(z)
        dt_bias: (nheads,)
        dt_softplus: apply softplus to dt + dt_bias
        dt_limit: (dt_min, dt_max); dt is always clamped to it (default (0, inf))
        initial_states: (batch, nheads, headdim, dstate)
        seq_idx: (batch, seqlen) int, non-decreasing per row (see the module docstring)
        return_final_states: also return the state after the last step
    Return:
        out: (batch, seqlen, nheads, headdim), dtype of x
        or (out, final_states) if return_final_states; final_states (batch, nheads, headdim,
        dstate) in float32 (float64 if any input is float64), like the Triton kernel
    """
    check_ssd_args(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_limit=dt_limit,
        initial_states=initial_states, seq_idx=seq_idx,
    )
    return _ssd_chunked(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        dt_limit=dt_limit, initial_states=initial_states, seq_idx=seq_idx,
        return_final_states=return_final_states,
    )


def _segsum_exact(a: torch.Tensor) -> torch.Tensor:
    """out[..., l, s] = sum_{s < k <= l} a[..., k] for l >= s (junk above the diagonal).

    Sums only the steps in (s, l] instead of differencing one cumulative sum, so the decay
    between two positions does not depend, even by rounding, on any step outside them: steps of
    another ``seq_idx`` segment in the same chunk then leave a segment's output bit-identical.
    """
    T = a.shape[-1]
    strict_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)  # [k, s]: k > s
    terms = torch.where(strict_lower, a[..., :, None], 0.0)  # [..., k, s] = a_k for k > s
    return torch.cumsum(terms, dim=-2)  # [..., l, s]


def _ssd_chunked(x, dt, A, B, C, *, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
                 seq_idx, return_final_states):
    """The math of :func:`ssd_scan_chunked`, arguments already validated."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    cdt = compute_dtype(x, dt, A, B, C)
    cs = min(chunk_size, L)  # one chunk covers short sequences; no point padding past L
    nc = -(-L // cs)
    pad = nc * cs - L

    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)  # (b, L, h)
    xdt = x.to(cdt) * dtp[..., None]  # dt_s x_s: every path below uses x only through it
    Bc, Cc = B.to(cdt), C.to(cdt)
    si = seq_idx
    if pad:
        # Padded steps: dt = 0 (state unchanged), x = B = C = 0, seq_idx repeats its last value.
        dtp = F.pad(dtp, (0, 0, 0, pad))
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        Bc = F.pad(Bc, (0, 0, 0, 0, 0, pad))
        Cc = F.pad(Cc, (0, 0, 0, 0, 0, pad))
        if si is not None:
            si = torch.cat([si, si[:, -1:].expand(b, pad)], dim=1)

    # heads-major chunked layouts: (b, nc, g, r, cs, ...) so the big products are plain bmm's
    xdt = xdt.reshape(b, nc, cs, g, r, p).permute(0, 1, 3, 4, 2, 5)  # (b, nc, g, r, cs, p)
    Bc = Bc.reshape(b, nc, cs, g, n).transpose(2, 3)  # (b, nc, g, cs, n)
    Cc = Cc.reshape(b, nc, cs, g, n).transpose(2, 3)
    dA = (dtp * A.to(cdt)).reshape(b, nc, cs, g, r).permute(0, 1, 3, 4, 2)  # (b, nc, g, r, cs)
    dA_cs = torch.cumsum(dA, dim=-1)

    if si is not None:
        si = si.reshape(b, nc, cs)
        si_last = si[:, :, -1]  # (b, nc): id at each chunk's last position
        si_prev = torch.cat([torch.zeros_like(si_last[:, :1]), si_last[:, :-1]], dim=1)  # 0 before chunk 0

    # 1. intra-chunk: y_l = sum_{s<=l} (C_l . B_s) exp(sum_{s<k<=l} a_k) dt_s x_s
    causal = torch.ones(cs, cs, dtype=torch.bool, device=x.device).tril()
    if si is not None:
        mask = (causal & (si[:, :, :, None] == si[:, :, None, :]))[:, :, None, None]  # (b, nc, 1, 1, cs, cs)
        seg = _segsum_exact(dA)
    else:
        mask = causal
        seg = dA_cs[..., :, None] - dA_cs[..., None, :]  # as the kernel does
    decay = torch.exp(torch.where(mask, seg, float("-inf")))  # (b, nc, g, r, cs, cs)
    CB = Cc @ Bc.transpose(-1, -2)  # (b, nc, g, cs, cs)
    y = (decay * CB[:, :, :, None]) @ xdt  # (b, nc, g, r, cs, p)
    del seg, decay

    # 2. state of each chunk on its own: sum_s exp(sum_{s<k<=last} a_k) dt_s x_s ⊗ B_s
    # (a suffix sum taken from the chunk's end, so no earlier step enters it)
    suffix = torch.flip(torch.cumsum(torch.flip(dA, dims=(-1,)), dim=-1), dims=(-1,))
    w = torch.exp(F.pad(suffix[..., 1:], (0, 1)))  # (b, nc, g, r, cs)
    if si is not None:
        w = torch.where((si == si_last[..., None])[:, :, None, None], w, 0.0)
    states = (xdt * w[..., None]).transpose(-1, -2) @ Bc[:, :, :, None]  # (b, nc, g, r, p, n)

    # 3. pass states across chunks (a short python loop over chunks, not over time)
    chunk_decay = torch.exp(dA_cs[..., -1])  # (b, nc, g, r)
    if si is not None:
        keep = (si_last == si_prev)[:, :, None, None]
        chunk_decay = torch.where(keep, chunk_decay, 0.0)
    if initial_states is not None:
        H = initial_states.to(cdt).reshape(b, g, r, p, n)
    else:
        H = torch.zeros(b, g, r, p, n, dtype=cdt, device=x.device)
    carried = []
    for c in range(nc):
        carried.append(H)
        H = chunk_decay[:, c, :, :, None, None] * H + states[:, c]
    carried = torch.stack(carried, dim=1)  # (b, nc, g, r, p, n): state entering each chunk

    # 4. contribution of the carried state: exp(sum_{k<=l} a_k) * H_c C_l
    out_decay = torch.exp(dA_cs)  # (b, nc, g, r, cs)
    if si is not None:
        out_decay = torch.where((si == si_prev[..., None])[:, :, None, None], out_decay, 0.0)
    y = y + (Cc[:, :, :, None] @ carried.transpose(-1, -2)) * out_decay[..., None]  # (b, nc, g, r, cs, p)

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, nc * cs, h, p)[:, :L]
    y = apply_D_z(y, x, D, z).to(x.dtype)
    if return_final_states:
        return y, H.reshape(b, h, p, n)
    return y
