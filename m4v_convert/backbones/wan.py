"""Wan2.1 adapter: where the attention is, how MM-DiM gets its context, the converted model class.

Diffusers' ``WanTransformerBlock`` calls ``attn1(norm_hidden_states, None, None, rotary_emb)``:
the self-attention is never told the frame grid or the text. :class:`M4VWanTransformer3DModel`
supplies both: its ``forward`` (same arguments as the original) records the latent grid and the
text padding mask, a hook on ``condition_embedder`` records the projected text, and every
converted ``attn1`` (a :class:`WanMMDiMAttention`) reads them from the shared call context.

Text padding: Wan pipelines pad the T5 embeddings to ``max_sequence_length`` with zero vectors,
so rows of ``encoder_hidden_states`` that are exactly zero are the padding mask.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import register_to_config

from m4v_convert.convert import mambafy_, record_conversion, register_handler
from m4v_convert.distill.records import LayerRecord  # noqa: F401  (re-exported: public name of this module)
from m4v_convert.layers.init_from_attention import AttentionWeights, mmdim_from_attention
from m4v_convert.layers.mmdim import MMDiM, MMDiMConfig
from m4v_convert.layers.recompose import VideoLayout

SELF_ATTN_PATTERN = re.compile(r"^blocks\.(\d+)\.attn1$")


@dataclass
class WanCallContext:
    """What a converted ``attn1`` needs and diffusers' block does not pass it (one forward call)."""

    layout: VideoLayout | None = None
    text: torch.Tensor | None = None  # (b, Lz, d) projected text embeddings
    text_mask: torch.Tensor | None = None  # (b, Lz) bool

    def clear(self) -> None:
        self.layout = self.text = self.text_mask = None


def wan_layout(hidden_states_shape, patch_size) -> VideoLayout:
    """Token grid of Wan's patchified latents (b, C, F, H, W) → one frame block."""
    _, _, f, h, w = hidden_states_shape
    pt, ph, pw = patch_size
    return VideoLayout.single(f // pt, h // ph, w // pw)


def text_padding_mask(encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """(b, Lz, text_dim) raw text embeddings → (b, Lz) bool, False where the row is all zero."""
    return encoder_hidden_states.ne(0).any(-1)


def wan_rotary_to_mmdim(rotary_emb):
    """Wan's (cos, sin), each (1, N, 1, head_dim) repeat-interleaved → (N, head_dim) each."""
    if rotary_emb is None:
        return None
    cos, sin = rotary_emb
    return cos[0, :, 0], sin[0, :, 0]


class WanMMDiMAttention(nn.Module):
    """Drop-in for ``WanTransformerBlock.attn1``: same call signature, MM-DiM inside."""

    def __init__(self, mmdim: MMDiM):
        super().__init__()
        self.mmdim = mmdim
        self.context: WanCallContext | None = None

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        ctx = self.context
        if ctx is None or ctx.layout is None:
            raise RuntimeError(
                "WanMMDiMAttention needs the frame grid and text of the current call; run it inside "
                "M4VWanTransformer3DModel.forward (or load the model with m4v_convert.load_converted)"
            )
        out, _ = self.mmdim(hidden_states, ctx.layout, ctx.text, ctx.text_mask, wan_rotary_to_mmdim(rotary_emb))
        return out


def attention_weights(attn: nn.Module) -> AttentionWeights:
    """Q/K/V/O (+ biases, q/k RMSNorm across heads) of a diffusers ``WanAttention``."""
    if getattr(attn, "fused_projections", False):
        raise ValueError("attn1 has fused projections; call unfuse_projections() before converting")
    head_dim = attn.inner_dim // attn.heads

    def norm_weight(norm):
        w = getattr(norm, "weight", None)
        return None if w is None else w.detach()

    return AttentionWeights(
        heads=attn.heads, head_dim=head_dim,
        q_weight=attn.to_q.weight.detach(), k_weight=attn.to_k.weight.detach(),
        v_weight=attn.to_v.weight.detach(), out_weight=attn.to_out[0].weight.detach(),
        q_bias=attn.to_q.bias.detach(), k_bias=attn.to_k.bias.detach(), v_bias=attn.to_v.bias.detach(),
        out_bias=attn.to_out[0].bias.detach(),
        q_norm_weight=norm_weight(attn.norm_q), k_norm_weight=norm_weight(attn.norm_k),
    )


def layer_index(fqn: str) -> int:
    m = SELF_ATTN_PATTERN.match(fqn)
    if m is None:
        raise ValueError(f"{fqn!r} is not a Wan self-attention (expected blocks.N.attn1)")
    return int(m.group(1))


@dataclass
class WanSelfAttentionToMMDiM:
    """Swap config: MM-DiM hyper-parameters shared by every converted Wan layer (recipe ``mmdim``)."""

    mmdim: dict = field(default_factory=dict)

    def block_config(self, attn: nn.Module, index: int) -> MMDiMConfig:
        head_dim = attn.inner_dim // attn.heads
        d_model = attn.to_q.in_features
        return MMDiMConfig(d_model=d_model, nheads=attn.heads, headdim=head_dim, layer_index=index, **self.mmdim)


@register_handler(WanSelfAttentionToMMDiM)
def _wan_attn_to_mmdim(attn: nn.Module, fqn: str, config: WanSelfAttentionToMMDiM) -> nn.Module:
    cfg = config.block_config(attn, layer_index(fqn))
    w = attn.to_q.weight
    block = mmdim_from_attention(cfg, attention_weights(attn), device=w.device, dtype=w.dtype)
    return WanMMDiMAttention(block)


class M4VWanTransformer3DModel(WanTransformer3DModel):
    """``WanTransformer3DModel`` with some ``attn1`` replaced by MM-DiM; same forward arguments.

    ``m4v`` (saved in ``config.json``) records the conversion: toolkit version, recipe, source and
    one ``MMDiMConfig`` dict per converted layer, which is all that is needed to rebuild it.
    """

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        m4v: dict | None = None,
    ) -> None:
        super().__init__(
            patch_size=patch_size, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, freq_dim=freq_dim,
            ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps,
            image_dim=image_dim, added_kv_proj_dim=added_kv_proj_dim, rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        self._init_m4v()
        for index, cfg in sorted((m4v or {}).get("layers", {}).items(), key=lambda kv: int(kv[0])):
            self.blocks[int(index)].attn1 = WanMMDiMAttention(MMDiM(MMDiMConfig.from_dict(cfg)))
        self._bind_context()

    def _init_m4v(self) -> None:
        self._m4v_context = WanCallContext()
        self.condition_embedder.register_forward_hook(self._capture_text)

    def _bind_context(self) -> None:
        for module in self.modules():
            if isinstance(module, WanMMDiMAttention):
                module.context = self._m4v_context

    def _capture_text(self, module, args, output):
        _, _, text, image = output
        self._m4v_context.text = text if image is None else torch.cat([image, text], dim=1)

    @classmethod
    def from_teacher(cls, teacher: WanTransformer3DModel) -> "M4VWanTransformer3DModel":
        """An independent copy of ``teacher`` with this class (no layer converted yet)."""
        if not isinstance(teacher, WanTransformer3DModel):
            raise TypeError(f"expected a WanTransformer3DModel, got {type(teacher).__name__}")
        student = copy.deepcopy(teacher)
        student.__class__ = cls
        student._init_m4v()
        student.register_to_config(m4v={"layers": {}})
        return student

    def convert_(self, layers: list[int], mmdim: dict, meta: dict | None = None) -> list[str]:
        """Replace ``blocks[i].attn1`` for ``i in layers`` by MM-DiM initialized from it."""
        wanted = {f"blocks.{i}.attn1" for i in layers}
        replaced = mambafy_(
            self, WanSelfAttentionToMMDiM(mmdim=dict(mmdim)),
            lambda m, fqn: fqn in wanted and not isinstance(m, WanMMDiMAttention),
        )
        self._bind_context()
        self._record_conversion(meta or {})
        return replaced

    def _record_conversion(self, meta: dict) -> None:
        record_conversion(self, {str(i): blk.attn1.mmdim.config.to_dict() for i, blk in enumerate(self.blocks)
                                 if isinstance(blk.attn1, WanMMDiMAttention)}, meta)

    @property
    def converted_layers(self) -> list[int]:
        return [i for i, blk in enumerate(self.blocks) if isinstance(blk.attn1, WanMMDiMAttention)]

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                return_dict=True, attention_kwargs=None):
        ctx = self._m4v_context
        ctx.layout = wan_layout(hidden_states.shape, self.config.patch_size)
        mask = text_padding_mask(encoder_hidden_states)
        if encoder_hidden_states_image is not None:
            image_valid = mask.new_ones(encoder_hidden_states_image.shape[:2])
            mask = torch.cat([image_valid, mask], dim=1)
        ctx.text_mask = mask
        try:
            return super().forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                                   return_dict=return_dict, attention_kwargs=attention_kwargs)
        finally:
            ctx.clear()


@torch.no_grad()
def record_teacher_layers(teacher: WanTransformer3DModel, batch: dict, layers: list[int]) -> dict[int, LayerRecord]:
    """Run ``teacher`` once on ``batch`` and return, per selected layer, its attn1 input/output
    with the context an MM-DiM in its place needs (layout, projected text, mask, RoPE)."""
    records: dict[int, LayerRecord] = {}
    seen: dict = {}
    handles = [teacher.condition_embedder.register_forward_hook(
        lambda m, a, o: seen.__setitem__("text", o[2] if o[3] is None else torch.cat([o[3], o[2]], 1)))]

    def tap(index):
        def hook(module, args, kwargs, output):
            rotary = args[3] if len(args) > 3 else kwargs.get("rotary_emb")
            records[index] = LayerRecord(args[0].detach(), output.detach(), {"rotary": wan_rotary_to_mmdim(rotary)})
        return hook

    pre_out: dict[int, torch.Tensor] = {}

    def tap_pre_out(index):
        return lambda module, args, output: pre_out.__setitem__(index, args[0].detach())

    for i in layers:
        handles.append(teacher.blocks[i].attn1.register_forward_hook(tap(i), with_kwargs=True))
        handles.append(teacher.blocks[i].attn1.to_out[0].register_forward_hook(tap_pre_out(i)))
    try:
        teacher(**batch, return_dict=False)
    finally:
        for h in handles:
            h.remove()
    layout = wan_layout(batch["hidden_states"].shape, teacher.config.patch_size)
    mask = text_padding_mask(batch["encoder_hidden_states"])
    for i, rec in records.items():
        rec.context.update(layout=layout, text=seen["text"], text_mask=mask)
        rec.pre_out = pre_out.get(i)
    return records


def converted_class_for_config(cfg: dict) -> type | None:
    """The class that rebuilds a saved Wan conversion (registry entry ``wan``), or None."""
    return M4VWanTransformer3DModel if cfg.get("_class_name") == M4VWanTransformer3DModel.__name__ else None
