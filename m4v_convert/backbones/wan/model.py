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

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel

from m4v_convert.convert import register_handler
from m4v_convert.distill.records import LayerRecord  # noqa: F401  (re-exported: public name of this module)
from m4v_convert.layers.init_from_attention import AttentionWeights, mmdim_from_attention
from m4v_convert.layers.mmdim import MMDiM, MMDiMConfig
from m4v_convert.layers.recompose import VideoLayout
from m4v_convert.models.converted import ConvertedModelMixin, converted_init

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


class M4VWanTransformer3DModel(ConvertedModelMixin, WanTransformer3DModel):
    """``WanTransformer3DModel`` with some ``attn1`` replaced by MM-DiM; same forward arguments.

    ``m4v`` (saved in ``config.json``) records the conversion: toolkit version, recipe, source and
    one ``MMDiMConfig`` dict per converted layer, which is all that is needed to rebuild it.
    """

    __init__ = converted_init(WanTransformer3DModel)
    teacher_class = WanTransformer3DModel
    converted_types = (WanMMDiMAttention,)

    def _init_m4v(self, m4v: dict) -> None:
        self._m4v_context = WanCallContext()
        self.condition_embedder.register_forward_hook(self._capture_text)

    def _capture_text(self, module, args, output):
        _, _, text, image = output
        self._m4v_context.text = text if image is None else torch.cat([image, text], dim=1)

    def _build_converted(self, m4v: dict) -> None:
        for index, cfg in sorted(m4v.get("layers", {}).items(), key=lambda kv: int(kv[0])):
            self.blocks[int(index)].attn1 = WanMMDiMAttention(MMDiM(MMDiMConfig.from_dict(cfg)))

    def _swaps(self, layers: list[int], mmdim: dict):
        """``blocks[i].attn1`` for ``i in layers``, each initialized from its attention."""
        return [(WanSelfAttentionToMMDiM(mmdim=mmdim), {f"blocks.{i}.attn1" for i in layers})]

    def converted_modules(self) -> dict[int, nn.Module]:
        return {i: blk.attn1 for i, blk in enumerate(self.blocks) if isinstance(blk.attn1, WanMMDiMAttention)}

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
    """The class that rebuilds a saved Wan conversion (registry entry ``wan``), or None.

    A generic-recipe conversion of a WanTransformer3DModel (wan2.2-ti2v.yaml) carries the same class
    name, ``M4VWanTransformer3DModel``; its ``m4v.generic`` flag sends it to the generic family."""
    if (cfg.get("m4v") or {}).get("generic"):
        return None
    return M4VWanTransformer3DModel if cfg.get("_class_name") == M4VWanTransformer3DModel.__name__ else None
