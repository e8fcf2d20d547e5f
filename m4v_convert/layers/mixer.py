"""Mamba2 (SSD) mixer with mamba-ssm's ``Mamba2`` parameter names and layout.

Parameters: ``in_proj`` → ``[z | x | B | C | dt]``, depthwise causal ``conv1d`` over
``[x | B | C]``, ``dt_bias``, ``A_log``, ``D``, gated RMSNorm ``norm.weight``, ``out_proj``.
With the default options (silu conv activation, no B/C norm, no rotary, gated RMSNorm) a state
dict of this module loads into ``mamba_ssm.modules.mamba2.Mamba2`` with ``strict=True``.

Options added for the conversion (all off in the Mamba2-compatible setting):
``bc_norm`` carries the teacher's q/k RMSNorm onto C/B, ``rotary`` applies the teacher's RoPE to
B/C, ``conv_activation`` may be ``identity`` so the init from attention is exact, ``seq_idx``
packs independent segments (the conv and the scan both reset at segment boundaries),
``bidirectional`` also runs the conv and the scan over the reversed sequence with the same weights
(one batched call) and sums both outputs before the gate: with the attention init this is
non-causal linear attention, for backbones whose attention reads every frame (no new parameters,
so the state dict keeps the ``Mamba2`` layout), ``text_projections`` gives the rows flagged by
``text_rows`` their own ``text_in_proj`` / ``text_out_proj`` (and B/C norms): for joint
(double-stream) attention blocks, whose text and video tokens have separate Q/K/V/O weights but
attend as one sequence; the conv, the scan and the gated norm stay shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from m4v_convert.ops import select_ssd_backend, ssd_scan
from m4v_convert.ops.gated_rmsnorm import gated_rmsnorm

TORCH_CHUNK = 64


def torch_scan_chunk(chunk_size: int) -> int:
    """The chunk the PyTorch scan runs at for a configured (Triton) ``chunk_size``."""
    return min(chunk_size, TORCH_CHUNK)


@dataclass
class MixerConfig:
    d_model: int
    nheads: int
    headdim: int
    d_state: int
    ngroups: int
    d_conv: int = 4
    conv_activation: str = "silu"  # "silu" | "identity"
    bias: bool = False  # in_proj / out_proj bias (attention layers have biases)
    conv_bias: bool = True
    bc_norm: str = "none"  # "none" | "per_group" | "across_groups"
    norm_eps: float = 1e-6
    out_norm: bool = True  # gated RMSNorm on the scan output (Mamba2 rmsnorm=True)
    norm_before_gate: bool = False
    chunk_size: int = 256
    bidirectional: bool = False  # also scan the reversed sequence (shared weights) and sum both outputs
    text_projections: bool = False  # text rows get their own in/out projections and B/C norms
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    A_init_range: tuple[float, float] = (1.0, 16.0)

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    @property
    def d_bc(self) -> int:
        return self.ngroups * self.d_state

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.d_bc

    def validate(self) -> None:
        if self.nheads % self.ngroups:
            raise ValueError(f"ngroups: nheads ({self.nheads}) must be divisible by ngroups ({self.ngroups})")
        if self.conv_activation not in ("silu", "identity"):
            raise ValueError(f"conv_activation: expected 'silu' or 'identity', got {self.conv_activation!r}")
        if self.bc_norm not in ("none", "per_group", "across_groups"):
            raise ValueError(f"bc_norm: expected 'none', 'per_group' or 'across_groups', got {self.bc_norm!r}")


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of ``group_size`` channels with silu(z) gating (mamba-ssm RMSNormGated)."""

    def __init__(self, hidden: int, group_size: int, eps: float = 1e-6, norm_before_gate: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
        self.group_size = group_size
        self.eps = eps
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """x, z: (..., hidden) → x's dtype. CUDA: mamba-ssm's Triton kernel when it imports."""
        return gated_rmsnorm(x, self.weight, z, eps=self.eps, group_size=self.group_size,
                             norm_before_gate=self.norm_before_gate)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"


def rotary_table(cos: torch.Tensor, sin: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Repeat-interleaved cos/sin (L, n) or (b, L, n) → complex64 (1|b, L, 1, n/2), e^{iθ} per pair.

    groups > 1: cos/sin span all groups, (..., L, groups·n) (a RoPE over heads·head_dim, as in
    LTX-Video) → (1|b, L, groups, n/2), one table per group.
    """
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    table = torch.complex(cos[..., 0::2].float(), sin[..., 1::2].float())
    return table.unflatten(-1, (groups, -1)) if groups > 1 else table.unsqueeze(2)


def apply_rotary_table(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (b, L, g, n) by ``rotary_table`` output.

    One complex multiply in float32 (x1·cos − x2·sin, x1·sin + x2·cos), returned in x's dtype.
    """
    xf = x.float()
    # view_as_complex needs an even storage offset; torch.compile cannot trace storage_offset()
    # (a graph break), so a compiled graph always takes the copy, which it may fuse away
    if torch.compiler.is_compiling() or not xf.is_contiguous() or xf.storage_offset() % 2:
        xf = xf.clone(memory_format=torch.contiguous_format)
    out = torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * table
    return torch.view_as_real(out).flatten(-2).to(x.dtype)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]); cos/sin are repeat-interleaved (..., n).

    x: (b, L, g, n); cos, sin: (L, n) or (b, L, n).
    """
    return apply_rotary_table(x, rotary_table(cos, sin))


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """Depthwise causal conv along L that never reads across ``seq_idx`` segments.

    x: (b, L, c); weight: (c, 1, k) as in ``nn.Conv1d``; seq_idx: (b, L) int or None.
    Tap j (0 = current step) reads x[t - j] with weight[:, 0, k - 1 - j].
    """
    k, length = weight.shape[-1], x.shape[1]
    w = weight[:, 0, :].to(x.dtype)
    # In-place multiply-adds on shifted views: several times faster on CPU than F.conv1d's
    # depthwise kernel here, and the same code masks segment boundaries.
    if bias is None:
        out = x * w[:, k - 1]
    else:
        out = torch.addcmul(bias.to(x.dtype), x, w[:, k - 1])
    for j in range(1, min(k, length)):
        src = x[:, :-j]
        if seq_idx is not None:
            src = src * (seq_idx[:, j:] == seq_idx[:, :-j]).unsqueeze(-1).to(x.dtype)
        out[:, j:].addcmul_(src, w[:, k - 1 - j])
    return out


class Mamba2Mixer(nn.Module):
    def __init__(self, config: MixerConfig, device=None, dtype=None):
        super().__init__()
        config.validate()
        self.config = c = config
        fk = {"device": device, "dtype": dtype}
        d_in_proj = 2 * c.d_inner + 2 * c.d_bc + c.nheads
        self.in_proj = nn.Linear(c.d_model, d_in_proj, bias=c.bias, **fk)
        self.conv1d = nn.Conv1d(
            c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, padding=c.d_conv - 1, bias=c.conv_bias, **fk
        )
        self.dt_bias = nn.Parameter(torch.empty(c.nheads, **fk))
        self.A_log = nn.Parameter(torch.empty(c.nheads, **fk))
        self.D = nn.Parameter(torch.empty(c.nheads, **fk))
        if c.bc_norm != "none":
            size = c.d_state if c.bc_norm == "per_group" else c.d_bc
            self.B_norm = nn.RMSNorm(size, eps=c.norm_eps, **fk)
            self.C_norm = nn.RMSNorm(size, eps=c.norm_eps, **fk)
            if c.text_projections:
                self.text_B_norm = nn.RMSNorm(size, eps=c.norm_eps, **fk)
                self.text_C_norm = nn.RMSNorm(size, eps=c.norm_eps, **fk)
        if c.out_norm:
            self.norm = GatedRMSNorm(c.d_inner, c.d_inner // c.ngroups, eps=c.norm_eps,
                                     norm_before_gate=c.norm_before_gate, **fk)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias, **fk)
        if c.text_projections:
            self.text_in_proj = nn.Linear(c.d_model, d_in_proj, bias=c.bias, **fk)
            self.text_out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias, **fk)
        if self.dt_bias.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba2's default init (used when a mixer is not initialized from attention)."""
        c = self.config
        dt = torch.exp(
            torch.rand(c.nheads) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min)
        ).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.empty(c.nheads).uniform_(*c.A_init_range)))
        self.D.fill_(1.0)

    def _split_bc_norm(self, t: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        # t: (b, L, g * n)
        c = self.config
        if c.bc_norm == "across_groups":
            return norm(t)
        return norm(t.unflatten(-1, (c.ngroups, c.d_state))).flatten(-2)

    def _bc_norm(self, t: torch.Tensor, which: str, row_mask: torch.Tensor | None) -> torch.Tensor:
        """B or C RMSNorm; with ``row_mask`` ((b, L, 1) bool) the text norm on the flagged rows."""
        out = self._split_bc_norm(t, getattr(self, f"{which}_norm"))
        if row_mask is None:
            return out
        return torch.where(row_mask, self._split_bc_norm(t, getattr(self, f"text_{which}_norm")), out)

    @staticmethod
    def _project_rows(x: torch.Tensor, rows, video: nn.Linear, text: nn.Linear) -> torch.Tensor:
        """``video(x)``, except ``text(x)`` on the text positions (``rows`` from :meth:`_text_rows`)."""
        if rows is None:
            return video(x)
        _, t_idx, v_idx = rows
        out = x.new_empty(*x.shape[:-1], video.out_features)
        out.index_copy_(1, v_idx, video(x.index_select(1, v_idx)))
        out.index_copy_(1, t_idx, text(x.index_select(1, t_idx)))
        return out

    def _text_rows(self, text_rows: torch.Tensor | None, length: int, device):
        """(mask on ``device``, text indices, video indices), or None when no row is text.

        The indices are found on the CPU (the mask is static, and this also works on ``meta``).
        """
        if text_rows is None:
            return None
        if not self.config.text_projections:
            raise ValueError("text_rows: given, but the mixer has no text projections (text_projections=False)")
        if text_rows.shape != (length,):
            raise ValueError(f"text_rows: expected shape ({length},), got {tuple(text_rows.shape)}")
        cpu = text_rows.to("cpu", torch.bool)
        if not bool(cpu.any()):
            return None
        t_idx, v_idx = cpu.nonzero().squeeze(1), (~cpu).nonzero().squeeze(1)
        return cpu.to(device), t_idx.to(device), v_idx.to(device)

    def forward(
        self,
        u: torch.Tensor,
        *,
        seq_idx: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        text_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """u: (b, L, d_model) → (b, L, d_model).

        seq_idx: (b, L) int32, packed independent segments. rotary: (cos, sin), each (L, d_state)
        or (b, L, d_state), repeat-interleaved, applied to B and C in sequence order; or
        (..., L, ngroups·d_state): one table per group. text_rows: (L,) bool, the positions that
        use the text projections and norms (``text_projections`` only; None: every row is video).
        """
        c = self.config
        b, L, _ = u.shape
        rows = self._text_rows(text_rows, L, u.device)
        zxbcdt = self._project_rows(u, rows, self.in_proj, getattr(self, "text_in_proj", None))
        z, xbc, dt = torch.split(zxbcdt, [c.d_inner, c.conv_dim, c.nheads], dim=-1)
        if c.bidirectional:
            # The reversed direction is the same causal mixer run on the flipped sequence, stacked on
            # the batch so the conv and the scan run once over 2b sequences.
            xbc = torch.cat([xbc, xbc.flip(1)])
            dt = torch.cat([dt, dt.flip(1)])
            if seq_idx is not None:
                seq_idx = torch.cat([seq_idx, seq_idx.flip(1)])
        xbc = causal_depthwise_conv(xbc, self.conv1d.weight, self.conv1d.bias, seq_idx)
        if c.conv_activation == "silu":
            xbc = F.silu(xbc)
        x, B, C = torch.split(xbc, [c.d_inner, c.d_bc, c.d_bc], dim=-1)
        if c.bc_norm != "none":
            row_mask = None
            if rows is not None:  # the reversed copy's text rows are the flipped mask
                row_mask = rows[0].view(1, L, 1).expand(b, -1, -1)
                if c.bidirectional:
                    row_mask = torch.cat([row_mask, row_mask.flip(1)])
            B = self._bc_norm(B, "B", row_mask)
            C = self._bc_norm(C, "C", row_mask)
        B = B.unflatten(-1, (c.ngroups, c.d_state))
        C = C.unflatten(-1, (c.ngroups, c.d_state))
        if rotary is not None:
            table = rotary_table(*rotary, groups=rotary[0].shape[-1] // c.d_state)  # once for B and C
            if c.bidirectional:  # every token keeps its own rotation in the reversed copy
                table = torch.cat([table.expand(b, -1, -1, -1), table.flip(1).expand(b, -1, -1, -1)])
            B = apply_rotary_table(B, table)
            C = apply_rotary_table(C, table)
        A = -torch.exp(self.A_log.float())
        xh = x.unflatten(-1, (c.nheads, c.headdim))
        y = ssd_scan(
            xh,
            dt,
            A,
            B.to(xh.dtype),  # no-op unless autocast gave the norms another dtype (one dtype for the kernel)
            C.to(xh.dtype),
            chunk_size=self.scan_chunk_size(xh),
            D=self.D,
            z=None if (c.out_norm or c.bidirectional) else z.unflatten(-1, (c.nheads, c.headdim)),
            dt_bias=self.dt_bias,
            dt_softplus=True,
            seq_idx=seq_idx,
        )
        if c.bidirectional:
            y = y[:b] + y[b:].flip(1)
            if not c.out_norm:  # the kernel's z gate applies to the sum
                y = y * F.silu(z.unflatten(-1, (c.nheads, c.headdim)))
        y = y.flatten(-2)
        if c.out_norm:
            y = self.norm(y, z)
        return self._project_rows(y, rows, self.out_proj, getattr(self, "text_out_proj", None))

    def scan_chunk_size(self, x: torch.Tensor) -> int:
        """``config.chunk_size`` for the Triton kernel; at most TORCH_CHUNK for the PyTorch scan.

        The PyTorch path's intra-chunk work per token grows with the chunk, so 64 is several times
        faster on CPU than the kernel's usual 256; the result is the same up to rounding.
        """
        if select_ssd_backend(x, self.config.chunk_size) == "triton":
            return self.config.chunk_size
        return torch_scan_chunk(self.config.chunk_size)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d_model={c.d_model}, nheads={c.nheads}, headdim={c.headdim}, d_state={c.d_state}, "
            f"ngroups={c.ngroups}, conv={c.d_conv}/{c.conv_activation}, bc_norm={c.bc_norm}, out_norm={c.out_norm}"
        )
