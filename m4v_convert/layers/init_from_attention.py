"""Initialize an MM-DiM mixer from a softmax-attention layer (DESIGN §3).

With A → 0 and an identity conv, the SSD recurrence ``S_t = e^{dt·A} S_{t-1} + dt·x_t B_tᵀ``,
``y_t = S_t C_t`` is causal linear attention with C = Q, B = K, x = V (the MambaInLlama mapping).

Free choices, made here once:

* **x / B / C rows of ``in_proj``** = W_V / W_K / W_Q (+ biases); one SSM head per attention head
  (nheads = ngroups = heads, headdim = d_state = head_dim).
* **z rows**: weight 0, bias 1. A constant gate is a no-op under the gated RMSNorm
  (``rmsnorm(y · silu(1))`` = ``rmsnorm(y)``), so the block starts as normalized linear
  attention and the gate is free to learn.
* **dt rows**: weight 0 and ``dt_bias = softplus⁻¹(dt_init)``: a constant, input-independent
  step at start (attention has no notion of dt).
* **A**: ``|A| = A_init`` so the per-token decay ``e^{-A_init·dt_init}`` is slow (≈ 0.995 with the
  defaults): a memory of a few hundred tokens, the A → 0 end of the duality, while still letting
  the state forget across a long video.
* **conv**: identity (last tap 1, bias 0), so the mixer initially sees exactly Q/K/V.
* **D** = 0: attention has no skip connection from V.
* **q/k RMSNorm weights** become the ``C_norm`` / ``B_norm`` weights when the recipe keeps them.
* **out_proj** = W_O (+ b_O); for fused outputs (PyramidFlow single blocks) the caller passes the
  attention slice of the fused projection.
* **Joint (double-stream) attention** (``text_projections``): the text stream's Q/K/V/O fill
  ``text_in_proj`` / ``text_out_proj`` and its q/k norms the text B/C norms by the same rules.
* **norm.weight** = 1; :func:`calibrate_output_norm` can rescale it per head so that the
  normalized output matches the teacher's per-head output RMS on calibration data.
* **RoPE** is carried onto B/C when ``MMDiMConfig.rotary`` is set (the adapter supplies the
  tables), else dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from m4v_convert.layers.mmdim import MMDiM, MMDiMConfig


@dataclass
class AttentionWeights:
    """Q/K/V/O of one attention layer, as plain tensors (out_features, in_features)."""

    heads: int
    head_dim: int
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    v_weight: torch.Tensor
    out_weight: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    out_bias: torch.Tensor | None = None
    q_norm_weight: torch.Tensor | None = None
    k_norm_weight: torch.Tensor | None = None

    def validate(self, d_model: int) -> None:
        inner = self.heads * self.head_dim
        for name in ("q_weight", "k_weight", "v_weight"):
            t = getattr(self, name)
            if tuple(t.shape) != (inner, d_model):
                raise ValueError(f"{name}: expected shape ({inner}, {d_model}), got {tuple(t.shape)}")
        if tuple(self.out_weight.shape) != (d_model, inner):
            raise ValueError(f"out_weight: expected shape ({d_model}, {inner}), got {tuple(self.out_weight.shape)}")
        for name, size in (("q_bias", inner), ("k_bias", inner), ("v_bias", inner), ("out_bias", d_model)):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (size,):
                raise ValueError(f"{name}: expected shape ({size},), got {tuple(t.shape)}")


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


@torch.no_grad()
def _fill_projections(in_proj, out_proj, weights: AttentionWeights, nheads: int) -> None:
    """``in_proj`` rows ``[z | x | B | C | dt]`` and ``out_proj`` from one set of Q/K/V/O."""
    inner = weights.heads * weights.head_dim
    dev, dt = in_proj.weight.device, in_proj.weight.dtype

    def cvt(t):
        return t.to(device=dev, dtype=dt)

    w, b = in_proj.weight, in_proj.bias
    zeros_b = torch.zeros(inner, device=dev, dtype=dt)
    sl = {"z": slice(0, inner), "x": slice(inner, 2 * inner), "B": slice(2 * inner, 3 * inner),
          "C": slice(3 * inner, 4 * inner), "dt": slice(4 * inner, 4 * inner + nheads)}
    w[sl["z"]] = 0
    b[sl["z"]] = 1
    for part, wt, bs in (("x", weights.v_weight, weights.v_bias), ("B", weights.k_weight, weights.k_bias),
                         ("C", weights.q_weight, weights.q_bias)):
        w[sl[part]] = cvt(wt)
        b[sl[part]] = cvt(bs) if bs is not None else zeros_b
    w[sl["dt"]] = 0
    b[sl["dt"]] = 0
    out_proj.weight.copy_(cvt(weights.out_weight))
    if out_proj.bias is not None:
        if weights.out_bias is not None:
            out_proj.bias.copy_(cvt(weights.out_bias))
        else:
            out_proj.bias.zero_()


@torch.no_grad()
def _fill_bc_norms(b_norm, c_norm, weights: AttentionWeights, bc_norm: str) -> None:
    for norm, src, name in ((c_norm, weights.q_norm_weight, "q_norm_weight"),
                            (b_norm, weights.k_norm_weight, "k_norm_weight")):
        if src is None:
            norm.weight.fill_(1)
        elif src.numel() != norm.weight.numel():
            raise ValueError(f"{name}: expected {norm.weight.numel()} values for bc_norm={bc_norm!r}, got {src.numel()}")
        else:
            norm.weight.copy_(src.to(norm.weight).reshape(norm.weight.shape))


@torch.no_grad()
def init_mixer_from_attention(block: MMDiM, weights: AttentionWeights,
                              text_weights: AttentionWeights | None = None) -> None:
    """Overwrite ``block.mixer`` in place from ``weights`` (see the module docstring).

    ``text_weights``: the text stream's Q/K/V/O of a joint (double-stream) attention, for a block
    with ``text_projections`` (they fill ``text_in_proj`` / ``text_out_proj`` / the text B/C norms
    the same way); required exactly when the block has them.
    """
    c = block.config
    mixer = block.mixer
    if c.text_projections != (text_weights is not None):
        raise ValueError("text_weights: required for a block with text_projections, and only for one")
    for wts in (weights, text_weights):
        if wts is None:
            continue
        wts.validate(c.d_model)
        if (c.nheads, c.headdim, c.d_state, c.ngroups) != (wts.heads, wts.head_dim, wts.head_dim, wts.heads):
            raise ValueError(
                f"config: attention has {wts.heads} heads × {wts.head_dim}; the mixer needs "
                f"nheads = ngroups = {wts.heads} and headdim = d_state = {wts.head_dim}"
            )
    if not c.bias:
        raise ValueError("config: init from attention needs bias=True (the z gate is a constant bias)")
    _fill_projections(mixer.in_proj, mixer.out_proj, weights, c.nheads)
    if text_weights is not None:
        _fill_projections(mixer.text_in_proj, mixer.text_out_proj, text_weights, c.nheads)
    mixer.dt_bias.fill_(_inv_softplus(c.dt_init))
    mixer.A_log.fill_(math.log(c.A_init))
    mixer.D.zero_()

    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias.zero_()

    if c.bc_norm != "none":
        _fill_bc_norms(mixer.B_norm, mixer.C_norm, weights, c.bc_norm)
        if text_weights is not None:
            _fill_bc_norms(mixer.text_B_norm, mixer.text_C_norm, text_weights, c.bc_norm)
    if c.out_norm:
        mixer.norm.weight.fill_(1)


def mmdim_from_attention(config: MMDiMConfig, weights: AttentionWeights, device=None, dtype=None,
                         text_weights: AttentionWeights | None = None) -> MMDiM:
    """Build an :class:`MMDiM` whose mixer is initialized from ``weights`` (and ``text_weights``)."""
    block = MMDiM(config, device=device, dtype=dtype)
    init_mixer_from_attention(block, weights, text_weights)
    return block


@torch.no_grad()
def calibrate_output_norm(block: MMDiM, student_pre_out: torch.Tensor, teacher_pre_out: torch.Tensor) -> None:
    """Scale ``norm.weight`` per head so the student's pre-``out_proj`` RMS matches the teacher's.

    student_pre_out / teacher_pre_out: (..., nheads * headdim) activations right before the
    output projection (student: after the gated RMSNorm with the current weight).
    """
    c = block.config
    if not c.out_norm:
        return
    s = student_pre_out.float().reshape(-1, c.nheads, c.headdim).pow(2).mean((0, 2)).sqrt()
    t = teacher_pre_out.float().reshape(-1, c.nheads, c.headdim).pow(2).mean((0, 2)).sqrt()
    scale = (t / s.clamp(min=1e-8)).repeat_interleave(c.headdim)
    weight = block.mixer.norm.weight
    scale = scale.to(device=weight.device, dtype=weight.dtype)
    if hasattr(weight, "device_mesh"):  # sharded by FSDP2 (--fsdp): every process scales its own rows
        from torch.distributed.tensor import distribute_tensor

        scale = distribute_tensor(scale, weight.device_mesh, weight.placements, src_data_rank=None)
    weight.mul_(scale)
