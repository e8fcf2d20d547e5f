"""Analytic FLOP counts of the layers every backbone shares: attention, MM-DiM (as implemented).

Whole-model counts are the backbone's own (``backbones/<family>/flops.py``).

Conventions (DESIGN §5): a multiply-add is 2 FLOPs; counts are for one forward pass of one
batch item (everything here is linear in the batch size); ``nn.Linear`` biases are not
counted (FlopCounterMode does not count them either).

Each count is split the way ``torch.utils.flop_counter.FlopCounterMode`` can check it:

* **matmul** terms (linear layers, convolutions done with ``aten.convolution``, bmm/einsum,
  SDPA) are exact and are what :mod:`m4v_convert.flops.measured` compares against;
* **other multiply-adds** of the algorithm that the code performs with elementwise ops (the
  depthwise causal conv of :func:`m4v_convert.layers.mixer.causal_depthwise_conv`, the state
  passing loop of the chunked scan) are exact too and are part of ``total``, but
  FlopCounterMode does not see them;
* **elementwise** work (norms, gates, softplus, ``exp`` of decays, masks, pooling, residual
  adds, softmax) is only estimated at 1 FLOP per element and operation, listed apart under
  ``"elementwise"`` and *not* included in ``total`` — the attention counts of DESIGN §5 do not
  include softmax either, so both sides of a comparison are counted the same way.
"""

from __future__ import annotations

from m4v_convert.layers.mmdim import MMDiMConfig
from m4v_convert.layers.recompose import VideoLayout

MAC = 2  # FLOPs per multiply-add



def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """``tokens`` rows through a ``d_in → d_out`` linear layer."""
    return MAC * tokens * d_in * d_out


# ----------------------------------------------------------------------------- attention

def attention_flops(n_tokens: int, d_model: int, heads: int, head_dim: int, kv_tokens: int | None = None,
                    kv_dim: int | None = None) -> dict:
    """Multi-head attention over ``n_tokens`` queries (self-attention unless ``kv_tokens``).

    Returns ``{"projections", "scores", "total"}`` with, for inner width ``i = heads·head_dim``:
    ``projections = 2·N·d·i (Q) + 2·2·Nk·d_kv·i (K, V) + 2·N·i·d (O)`` — ``8·N·d·i`` for
    self-attention, ``8·N·d²`` when ``i = d`` — and ``scores = 4·N·Nk·i`` (QKᵀ and the weighted
    sum of V, 2 FLOPs per multiply-add each). Softmax, q/k norms and RoPE are not counted.
    """
    nk = n_tokens if kv_tokens is None else kv_tokens
    dk = d_model if kv_dim is None else kv_dim
    inner = heads * head_dim
    projections = (linear_flops(n_tokens, d_model, inner) + 2 * linear_flops(nk, dk, inner)
                   + linear_flops(n_tokens, inner, d_model))
    scores = 2 * MAC * n_tokens * nk * inner
    return {"projections": projections, "scores": scores, "total": projections + scores}


# ----------------------------------------------------------------------------- MM-DiM

def ssd_chunked_flops(seqlen: int, nheads: int, headdim: int, ngroups: int, d_state: int,
                      chunk_size: int) -> dict:
    """Multiply-adds of :func:`m4v_convert.ops.ssd_chunked._ssd_chunked` for one batch item.

    The implementation uses ``Q = min(chunk_size, L)`` and pads L up to ``nc·Q`` (nc chunks);
    with ``h`` heads of ``p`` channels, ``g`` groups and state size ``n``:

    * ``intra_cb``: ``C·Bᵀ`` per chunk and group, ``2·nc·g·Q²·n`` (einsum → bmm);
    * ``intra_x``: masked decayed scores times x per head, ``2·nc·h·Q²·p`` (bmm);
    * ``chunk_states``: ``Σ_s w_s x_s ⊗ B_s`` per chunk, ``2·nc·Q·h·p·n`` (bmm);
    * ``state_passing``: ``H ← decay·H + S_c``, ``2·nc·h·p·n`` (elementwise, not a matmul);
    * ``state_output``: ``C_l · H_c`` per position, ``2·nc·Q·h·p·n`` (bmm).
    """
    q = min(chunk_size, seqlen)
    nc = -(-seqlen // q)
    out = {
        "intra_cb": MAC * nc * ngroups * q * q * d_state,
        "intra_x": MAC * nc * nheads * q * q * headdim,
        "chunk_states": MAC * nc * q * nheads * headdim * d_state,
        "state_passing": MAC * nc * nheads * headdim * d_state,
        "state_output": MAC * nc * q * nheads * headdim * d_state,
    }
    elementwise = {
        # dt: bias + softplus + clamp; cumsum of dt·A; exp of the Q×Q segment sums, mask, ·CB, ·dt
        "dt_and_decay": nc * q * nheads * 4 + nc * nheads * q * q * 4,
        # chunk-state weights, the output decay and the add of the two output parts
        "state_weights": nc * q * nheads * headdim * 3,
    }
    shape = {"chunk_size": q, "num_chunks": nc, "padded_length": nc * q, "padding": nc * q - seqlen}
    return {"parts": out, "elementwise": elementwise, "shape": shape}


def mmdim_sequence_length(config: MMDiMConfig, layout: VideoLayout, text_len: int) -> int:
    """N' = N + 2·Lz (text sandwich) + T + 1 (registers): the length the SSM reads."""
    n = layout.num_tokens
    if config.text_sandwich and text_len:
        n += 2 * text_len
    if config.registers:
        n += layout.num_frames + 1
    return n


def temporal_flops(config: MMDiMConfig, layout: VideoLayout) -> dict:
    """The temporal branch as :class:`m4v_convert.layers.temporal.TemporalBranch` computes it.

    ``down_proj`` over the N video tokens; attention over the T frame tokens of width
    ``td = g²·dim`` (qkv, scores against T + 1 keys because of the zero "null" slot, out);
    ``up_proj`` over the T·g² region slices (the result is then gathered to the N tokens, which
    costs no FLOPs).
    """
    d, dim, g2 = config.d_model, config.temporal_dim, config.temporal_grid ** 2
    n, t = layout.num_tokens, layout.num_frames
    if config.temporal_queries == "tokens":
        return _token_query_flops(config, n, t)
    td = g2 * dim
    parts = {
        "temporal_down_proj": linear_flops(n, d, dim),
        "temporal_qkv": linear_flops(t, td, 3 * td),
        "temporal_attention": 2 * MAC * t * (t + 1) * td,
        "temporal_attn_out": linear_flops(t, td, td),
        "temporal_up_proj": linear_flops(t * g2, dim, d),
    }
    elementwise = {
        "temporal_pool": n * dim,
        "temporal_softmax": 5 * config.temporal_heads * t * (t + 1),
        "temporal_residual_add": n * d,
    }
    return {"parts": parts, "elementwise": elementwise}


def _token_query_flops(config: MMDiMConfig, n: int, t: int) -> dict:
    """``temporal_queries: tokens``: ``down_proj`` and ``q_proj`` over the N tokens, ``kv_proj`` over the
    T·g² region slots, every token's scores and weighted sum over T·g² + 1 slots (the null slot),
    ``attn_out`` and ``up_proj`` over the N tokens."""
    d, dim, g2 = config.d_model, config.temporal_dim, config.temporal_grid ** 2
    slots = t * g2
    parts = {
        "temporal_down_proj": linear_flops(n, d, dim),
        "temporal_q_proj": linear_flops(n, dim, dim),
        "temporal_kv_proj": linear_flops(slots, dim, 2 * dim),
        "temporal_attention": 2 * MAC * n * (slots + 1) * dim,
        "temporal_attn_out": linear_flops(n, dim, dim),
        "temporal_up_proj": linear_flops(n, dim, d),
    }
    elementwise = {
        "temporal_pool": n * dim,
        "temporal_region_embed": n * dim + slots * dim,
        "temporal_softmax": 5 * config.temporal_heads * n * (slots + 1),
        "temporal_residual_add": n * d,
    }
    return {"parts": parts, "elementwise": elementwise}


def mmdim_flops(config: MMDiMConfig, layout: VideoLayout, text_len: int) -> dict:
    """FLOPs of one :class:`~m4v_convert.layers.mmdim.MMDiM` forward (batch 1), as implemented.

    ``text_len`` is the number of text tokens handed to the block (padding included: the
    sandwich always holds ``Lz`` slots on each side). Returns::

        {"parts": {name: FLOPs},        # exact multiply-add counts, summed in "total"
         "matmul": int,                 # the parts FlopCounterMode counts (in_proj, scan bmm's,
                                        #   out_proj, temporal linears and SDPA)
         "total": int,                  # matmul + conv1d + ssd_state_passing
         "elementwise": {name: FLOPs},  # estimates, excluded from total and from the cross-check
         "elementwise_total": int,
         "not_measured": [names],       # parts FlopCounterMode cannot see
         "shape": {...}}                # tokens, sequence_length, chunking

    Parts: ``in_proj`` ``2·N'·d·(2·d_inner + 2·g·n + h)``; ``conv1d`` ``2·N'·conv_dim·d_conv``
    (done with elementwise shifted multiply-adds in the code); the chunked SSD scan (see
    :func:`ssd_chunked_flops`, prefixed ``ssd_``); ``out_proj`` ``2·N'·d_inner·d``; the temporal
    branch (:func:`temporal_flops`). With ``bidirectional`` the conv and the scan count twice; with
    ``text_projections`` the text rows go through ``text_in_proj`` / ``text_out_proj`` of the same
    sizes instead, so the projection counts do not change.
    Elementwise estimates: D skip, gated RMSNorm, B/C RMSNorm,
    rotary on B/C, the text inverse (scatter-add), the scan's decays and the temporal branch's
    pooling, softmax and residual add.
    """
    mc = config.mixer_config()
    mc.validate()
    d, h, p, g, n = mc.d_model, mc.nheads, mc.headdim, mc.ngroups, mc.d_state
    layout.validate()
    lz = text_len if config.text_sandwich else 0
    seq = mmdim_sequence_length(config, layout, text_len)
    scan = ssd_chunked_flops(seq, h, p, g, n, mc.chunk_size)
    # bidirectional: conv, B/C norm and rotary, and the scan run on both directions (a batch of 2);
    # in_proj, the gate, the norm and out_proj once, on the summed output
    dirs = 2 if mc.bidirectional else 1

    parts = {"in_proj": linear_flops(seq, d, 2 * mc.d_inner + 2 * mc.d_bc + h),
             "conv1d": dirs * MAC * seq * mc.conv_dim * mc.d_conv}
    parts.update({f"ssd_{k}": dirs * v for k, v in scan["parts"].items()})
    parts["out_proj"] = linear_flops(seq, mc.d_inner, d)
    elementwise = {f"ssd_{k}": dirs * v for k, v in scan["elementwise"].items()}
    elementwise["conv_bias"] = dirs * seq * mc.conv_dim
    if mc.conv_activation == "silu":
        elementwise["conv_silu"] = dirs * 4 * seq * mc.conv_dim
    elementwise["d_skip"] = dirs * MAC * seq * mc.d_inner
    if mc.bidirectional:
        elementwise["direction_sum"] = seq * mc.d_inner
    if mc.bc_norm != "none":
        # with text projections both norms run on every row and a select picks one
        elementwise["bc_norm"] = dirs * 2 * 4 * seq * mc.d_bc * (2 if mc.text_projections else 1)
    if config.rotary:
        elementwise["bc_rotary"] = dirs * 2 * 3 * seq * mc.d_bc
    if mc.out_norm:  # silu(z) gate (4), multiply, square, mean, rsqrt-scale, weight
        elementwise["gated_rmsnorm"] = 9 * seq * mc.d_inner
    else:
        elementwise["z_gate"] = 5 * seq * mc.d_inner
    if lz:
        elementwise["text_inverse"] = 2 * lz * d
    if config.temporal:
        tb = temporal_flops(config, layout)
        parts.update(tb["parts"])
        elementwise.update(tb["elementwise"])

    not_measured = ["conv1d", "ssd_state_passing"]
    matmul = sum(v for k, v in parts.items() if k not in not_measured)
    shape = {"tokens": layout.num_tokens, "frames": layout.num_frames, "text_len": lz,
             "registers": layout.num_frames + 1 if config.registers else 0, "sequence_length": seq,
             "directions": dirs,
             **scan["shape"]}
    return {
        "parts": parts,
        "matmul": matmul,
        "total": sum(parts.values()),
        "elementwise": elementwise,
        "elementwise_total": sum(elementwise.values()),
        "not_measured": not_measured,
        "shape": shape,
    }


def resolve_layers(layers, num_layers: int) -> list[int]:
    """``"all"``, an int, or an iterable of ints → sorted unique indices in range."""
    if layers is None:
        return []
    if isinstance(layers, str):
        if layers == "all":
            return list(range(num_layers))
        from m4v_convert.convert import parse_layers  # noqa: PLC0415 (optional dependency)

        return parse_layers(layers, num_layers)
    if isinstance(layers, int):
        layers = [layers]
    out = sorted({int(i) for i in layers})
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"converted_layers: indices {bad} out of range 0..{num_layers - 1}")
    return out


__all__ = [
    "MAC", "attention_flops", "linear_flops", "mmdim_flops", "mmdim_sequence_length", "resolve_layers",
    "ssd_chunked_flops", "temporal_flops",
]
