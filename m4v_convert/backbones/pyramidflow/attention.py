"""Masked attention for PyramidFlow blocks: one processor for both variants, plus the SD3 module.

The processor works on diffusers' ``FluxAttention`` (miniFLUX double and single blocks) and on
:class:`PyramidJointAttention` (SD3 joint blocks, whose context q/k norms are named
``norm_add_q`` / ``norm_add_k`` in the release checkpoint). It receives, per call:

* ``attention_mask``: ``(B, 1, L, L)`` bool (see :func:`layout.attention_mask`),
* ``image_rotary_emb``: ``(cos, sin)`` tables ``(L, head_dim)`` for the whole ``[text ; video]``
  sequence, or None,
* ``token_layout``: the stage's :class:`layout.StageLayout`. The dense path does not need it; it
  is forwarded so that a replacement processor or module (e.g. MM-DiM) gets the frame grid.

This is the dense CPU/reference path: SDPA with an explicit boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layout import apply_rope


def _context_norms(attn: nn.Module):
    if hasattr(attn, "norm_added_q"):
        return attn.norm_added_q, attn.norm_added_k
    return getattr(attn, "norm_add_q", None), getattr(attn, "norm_add_k", None)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # (B, L, heads, head_dim)


class PyramidFlowAttnProcessor:
    """Joint (text + video) or single-stream attention with the PyramidFlow mask and RoPE."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_layout=None,
    ):
        head_dim = attn.head_dim
        query = _heads(attn.to_q(hidden_states), head_dim)
        key = _heads(attn.to_k(hidden_states), head_dim)
        value = _heads(attn.to_v(hidden_states), head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        text_len = 0
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            norm_cq, norm_ck = _context_norms(attn)
            c_query = _heads(attn.add_q_proj(encoder_hidden_states), head_dim)
            c_key = _heads(attn.add_k_proj(encoder_hidden_states), head_dim)
            c_value = _heads(attn.add_v_proj(encoder_hidden_states), head_dim)
            if norm_cq is not None:
                c_query = norm_cq(c_query)
            if norm_ck is not None:
                c_key = norm_ck(c_key)
            query = torch.cat([c_query, query], dim=1)
            key = torch.cat([c_key, key], dim=1)
            value = torch.cat([c_value, value], dim=1)

        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            query = apply_rope(query, cos, sin)
            key = apply_rope(key, cos, sin)

        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out
        context_out, out = out[:, :text_len], out[:, text_len:]
        out = attn.to_out[0](out.contiguous())
        out = attn.to_out[1](out)
        to_add_out = getattr(attn, "to_add_out", None)
        context_out = to_add_out(context_out.contiguous()) if to_add_out is not None else None
        return out, context_out


def _rms_norm(dim: int, kind: str | None, eps: float) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "rms_norm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"qk_norm: expected None, 'rms_norm' or 'layer_norm', got {kind!r}")


class PyramidJointAttention(nn.Module):
    """SD3-style joint attention with the release's parameter names.

    ``to_q/k/v``, ``add_q/k/v_proj``, ``norm_q/k``, ``norm_add_q/k`` (head-wise q/k norm, eps
    1e-5 as in the release), ``to_out.0``, and ``to_add_out`` unless ``context_pre_only``.
    Returns ``(video_out, text_out)``; ``text_out`` is None for a context-pre-only block.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None, context_pre_only: bool, eps: float = 1e-5):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.context_pre_only = context_pre_only
        self.norm_q = _rms_norm(head_dim, qk_norm, eps)
        self.norm_k = _rms_norm(head_dim, qk_norm, eps)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, inner)
        self.norm_add_q = _rms_norm(head_dim, qk_norm, eps)
        self.norm_add_k = _rms_norm(head_dim, qk_norm, eps)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        if not context_pre_only:
            self.to_add_out = nn.Linear(inner, dim)
        self.processor = PyramidFlowAttnProcessor()

    def set_processor(self, processor) -> None:
        self.processor = processor

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_layout=None,
    ):
        return self.processor(
            self,
            hidden_states,
            encoder_hidden_states,
            attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb,
            token_layout=token_layout,
        )
