"""PyramidFlow SD3 variant (``PyramidDiffusionMMDiT``), loading the release checkpoint unchanged.

24 joint (double-stream) blocks, 24 heads × 64, the last one context-pre-only. Parameter names
as in the release: ``pos_embed.proj`` (2×2 patch conv) and the persistent sincos table
``pos_embed.pos_embed`` ``(1, 192², 1536)``, ``time_text_embed``, ``context_embedder``,
``transformer_blocks.{i}`` (diffusers' ``JointTransformerBlock`` with the attention replaced by
:class:`.attention.PyramidJointAttention`, whose context q/k norms are ``norm_add_q/k``),
``norm_out``, ``proj_out``.

Positions: the additive 2D sincos table, cropped at the centre for the stage grid and bilinearly
resized to lower-resolution history clips (``interp_condition_pos``), plus a temporal RoPE over
the full head dim (text at t = 0). Sequence and mask rules are those of :mod:`.layout`. Stages
run one after another (the release packs them; nothing crosses stages).

Config defaults are the released ``config.json`` values, plus the values the release pipeline
passes when it loads the model (``use_t5_mask=True``, ``add_temp_pos_embed=True``,
``temp_pos_embed_type='rope'``, ``interp_condition_pos=True``) since those fields are not in the
released file.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from torch.utils.checkpoint import checkpoint

from .attention import PyramidJointAttention
from .layout import (
    StageLayout,
    attention_mask,
    build_stage_layouts,
    frame_index,
    rope_tables,
    unpatchify,
)
from .miniflux import PyramidStagesForward


class PyramidDiffusionMMDiT(PyramidStagesForward, ModelMixin, ConfigMixin):
    """The PyramidFlow SD3-medium based DiT (release class name kept for ``config.json``).

    Forward as :meth:`PyramidStagesForward.forward`; here ``encoder_hidden_states`` are
    ``(B·S, Lz, 4096)`` T5 states and ``pooled_projections`` ``(B·S, 2048)`` CLIP-L + CLIP-G pooled.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["JointTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 24,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        pos_embed_max_size: int = 192,
        max_num_frames: int = 200,
        qk_norm: str | None = "rms_norm",
        pos_embed_type: str = "sincos",
        temp_pos_embed_type: str = "rope",
        joint_attention_dim: int = 4096,
        use_gradient_checkpointing: bool = False,
        use_flash_attn: bool = False,
        use_temporal_causal: bool = True,
        use_t5_mask: bool = True,
        add_temp_pos_embed: bool = True,
        interp_condition_pos: bool = True,
        gradient_checkpointing_ratio: float = 0.6,
    ):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        if pos_embed_type != "sincos":
            raise ValueError(f"pos_embed_type {pos_embed_type!r}: only 'sincos' is supported for video (as in the release)")
        if not (add_temp_pos_embed and temp_pos_embed_type == "rope"):
            raise ValueError("only the temporal RoPE setting (add_temp_pos_embed=True, temp_pos_embed_type='rope') is supported")
        if caption_projection_dim != inner:
            raise ValueError(f"caption_projection_dim {caption_projection_dim} must equal heads × head_dim = {inner}")
        self.inner_dim = inner
        self.out_channels = in_channels

        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=inner,
            pos_embed_max_size=pos_embed_max_size,
        )
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=inner, pooled_projection_dim=pooled_projection_dim
        )
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        blocks = []
        for i in range(num_layers):
            last = i == num_layers - 1
            block = JointTransformerBlock(inner, num_attention_heads, attention_head_dim, context_pre_only=last)
            block.attn = PyramidJointAttention(inner, num_attention_heads, attention_head_dim, qk_norm, last)
            blocks.append(block)
        self.transformer_blocks = nn.ModuleList(blocks)
        self.norm_out = AdaLayerNormContinuous(inner, inner, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(inner, patch_size * patch_size * in_channels)
        self.gradient_checkpointing = use_gradient_checkpointing

    # ------------------------------------------------------------------ sequence helpers
    def token_layouts(self, sample, encoder_attention_mask, *, full_grid=None) -> list[StageLayout]:
        return build_stage_layouts(sample, encoder_attention_mask, full_grid=full_grid, patch=self.config.patch_size)

    def _spatial_pos_embed(self, height: int, width: int, grid: tuple[int, int]) -> torch.Tensor:
        """``(1, height·width, D)`` additive positions for a clip of ``height × width`` tokens."""
        size = self.config.pos_embed_max_size
        ref_h, ref_w = grid if self.config.interp_condition_pos else (height, width)
        if max(ref_h, ref_w, height, width) > size:
            raise ValueError(f"token grid {max(ref_h, height)}×{max(ref_w, width)} exceeds pos_embed_max_size {size}")
        table = self.pos_embed.pos_embed.reshape(1, size, size, -1)
        top, left = (size - ref_h) // 2, (size - ref_w) // 2
        crop = table[:, top : top + ref_h, left : left + ref_w, :]
        if (ref_h, ref_w) != (height, width):
            crop = F.interpolate(crop.permute(0, 3, 1, 2), size=(height, width), mode="bilinear")
            crop = crop.permute(0, 2, 3, 1)
        return crop.reshape(1, height * width, -1)

    def _embed_clip(self, clip: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, c, t, h, w = clip.shape
        p = self.config.patch_size
        x = self.pos_embed.proj(clip.transpose(1, 2).reshape(b * t, c, h, w))
        x = x.flatten(2).transpose(1, 2)  # (B·T, h/p · w/p, D)
        x = (x + self._spatial_pos_embed(h // p, w // p, grid)).to(x.dtype)
        return x.reshape(b, t * x.shape[1], -1)

    def _forward_stage(self, clips, text, temb, layout: StageLayout) -> torch.Tensor:
        video = torch.cat([self._embed_clip(c, layout.grid) for c in clips], dim=1)
        device = video.device
        cos, sin = rope_tables(frame_index(layout)[:, None].double(), [self.config.attention_head_dim])
        kwargs = {
            "attention_mask": attention_mask(layout, causal=self.config.use_temporal_causal, device=device),
            "image_rotary_emb": (cos.to(device), sin.to(device)),
            "token_layout": layout,
        }
        total, ratio = len(self.transformer_blocks), self.config.gradient_checkpointing_ratio
        for i, block in enumerate(self.transformer_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled() and i <= int(total * ratio):
                text, video = checkpoint(block, video, text, temb, kwargs, use_reentrant=False)
            else:
                text, video = block(video, text, temb, joint_attention_kwargs=kwargs)
        noisy = layout.noisy
        video = video[:, video.shape[1] - noisy.num_tokens :]
        video = self.proj_out(self.norm_out(video, temb))
        return unpatchify(video, noisy.num_frames, noisy.height, noisy.width, self.config.patch_size)
