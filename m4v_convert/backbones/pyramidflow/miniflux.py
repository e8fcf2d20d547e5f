"""PyramidFlow miniFLUX transformer, loading ``diffusion_transformer_{384p,768p}`` unchanged.

Parameter names follow diffusers' Flux naming without the guidance embedder, exactly as in the
release checkpoint: ``x_embedder``, ``context_embedder``, ``time_text_embed.{timestep_embedder,
text_embedder}``, ``transformer_blocks.{i}`` (double stream), ``single_transformer_blocks.{j}``,
``norm_out``, ``proj_out``. The blocks and embedders are diffusers' own; what is PyramidFlow's
is the sequence (see :mod:`.layout`): per stage ``[text ; clips oldest → newest]`` with 3D RoPE
over (t, h, w), fractional h/w positions for lower-resolution history, and the block-causal /
T5-padding mask, applied by :class:`.attention.PyramidFlowAttnProcessor`.

The release packs several stages along the sequence axis of one call and keeps them apart with
the mask and per-stage modulation; nothing crosses stages, so this implementation runs the
stages one after another (same numbers, simpler code).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch.utils.checkpoint import checkpoint

from .attention import PyramidFlowAttnProcessor
from .layout import (
    LATENT_PATCH,
    StageLayout,
    as_clip_list,
    attention_mask,
    build_stage_layouts,
    patchify,
    rope_tables,
    sequence_position_ids,
    unpatchify,
)


def _check_conditioning(n_stages: int, batch: int, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t is None:
            raise ValueError(f"{name} is required")
        if t.shape[0] != batch * n_stages:
            raise ValueError(
                f"{name} has {t.shape[0]} rows; expected batch × stages = {batch} × {n_stages} "
                "(one row per (sample, stage), stage index fastest)"
            )


class PyramidStagesForward:
    """The forward both PyramidFlow variants share: embed time and text once for all stages, then
    run each pyramid stage as its own sequence (no attention across stages). The model supplies
    ``time_text_embed``, ``context_embedder``, ``token_layouts`` and ``_forward_stage``."""

    def forward(
        self,
        sample: Sequence,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep_ratio: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Predict the flow of every stage's last clip.

        Args:
            sample: list over pyramid stages (S of them, low → high resolution). Each stage is a
                tensor ``(B, 16, T, H, W)`` or a list of such clips, oldest first: history
                (older clips may be at lower resolution), the last conditional frame, and last
                the noisy clip. ``H, W`` are VAE latent sizes (even).
            encoder_hidden_states: T5 embeddings ``(B·S, Lz, joint_attention_dim)``.
            encoder_attention_mask: ``(B·S, Lz)``, 1 for valid text tokens.
            pooled_projections: CLIP pooled embeddings ``(B·S, pooled_projection_dim)``.
            timestep_ratio: ``(B·S,)`` timesteps, fed to the sinusoidal embedding as given.
            Rows of the text/time inputs are ordered (sample, stage) with the stage fastest
            (row ``b·S + s``), as in the release.

        Returns:
            list over stages of ``(B, 16, T_noisy, H, W)`` predictions for the noisy clip.
        """
        stages = [as_clip_list(s) for s in sample]
        n, batch = len(stages), stages[0][-1].shape[0]
        _check_conditioning(
            n,
            batch,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            pooled_projections=pooled_projections,
            timestep_ratio=timestep_ratio,
        )
        temb = self.time_text_embed(timestep_ratio, pooled_projections)
        text = self.context_embedder(encoder_hidden_states)
        layouts = self.token_layouts(stages, encoder_attention_mask)
        return [
            self._forward_stage(clips, text[s::n], temb[s::n], layouts[s]) for s, clips in enumerate(stages)
        ]


class PyramidFluxTransformer(PyramidStagesForward, ModelMixin, ConfigMixin):
    """The PyramidFlow miniFLUX DiT (8 double-stream + 16 single-stream blocks, 30 heads × 64).

    Config fields are the release's ``config.json`` fields. ``patch_size`` is recorded but, as in
    the release, the latents are always patchified 2×2 (``in_channels`` = 4 × latent channels).
    ``use_flash_attn`` and ``interp_condition_pos`` are accepted for compatibility and have no
    effect (the release's miniFLUX always uses fractional positions for history). Defaults are
    the released model's values.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 8,
        num_single_layers: int = 16,
        attention_head_dim: int = 64,
        num_attention_heads: int = 30,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        axes_dims_rope: Sequence[int] = (16, 24, 24),
        use_flash_attn: bool = False,
        use_temporal_causal: bool = True,
        interp_condition_pos: bool = True,
        use_gradient_checkpointing: bool = False,
        gradient_checkpointing_ratio: float = 0.6,
    ):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {list(axes_dims_rope)} must sum to attention_head_dim {attention_head_dim}"
            )
        if in_channels % (LATENT_PATCH * LATENT_PATCH):
            raise ValueError(f"in_channels {in_channels} must be 4 × latent channels (2×2 patches)")
        self.inner_dim = inner = num_attention_heads * attention_head_dim
        self.out_channels = in_channels

        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=inner, pooled_projection_dim=pooled_projection_dim
        )
        self.context_embedder = nn.Linear(joint_attention_dim, inner)
        self.x_embedder = nn.Linear(in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(inner, num_attention_heads, attention_head_dim) for _ in range(num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(inner, num_attention_heads, attention_head_dim)
            for _ in range(num_single_layers)
        )
        self.norm_out = AdaLayerNormContinuous(inner, inner, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(inner, patch_size * patch_size * self.out_channels)

        processor = PyramidFlowAttnProcessor()
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            block.attn.set_processor(processor)
        self.gradient_checkpointing = use_gradient_checkpointing

    # ------------------------------------------------------------------ sequence helpers
    def token_layouts(self, sample, encoder_attention_mask, *, full_grid=None) -> list[StageLayout]:
        """Per-stage token layout of a call with these inputs (see :mod:`.layout`)."""
        return build_stage_layouts(sample, encoder_attention_mask, full_grid=full_grid)

    def _stage_context(self, layout: StageLayout, device) -> dict:
        cos, sin = rope_tables(sequence_position_ids(layout), self.config.axes_dims_rope)
        mask = attention_mask(layout, causal=self.config.use_temporal_causal, device=device)
        return {
            "image_rotary_emb": (cos.to(device), sin.to(device)),
            "joint_attention_kwargs": {"attention_mask": mask, "token_layout": layout},
        }

    def _run_block(self, index: int, total: int, block: nn.Module, *args, **kwargs):
        ratio = self.config.gradient_checkpointing_ratio
        if self.gradient_checkpointing and torch.is_grad_enabled() and index <= int(total * ratio):
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def _forward_stage(self, clips, text, temb, layout: StageLayout) -> torch.Tensor:
        video = self.x_embedder(torch.cat([patchify(c) for c in clips], dim=1))
        ctx = self._stage_context(layout, video.device)
        n_double, n_single = len(self.transformer_blocks), len(self.single_transformer_blocks)
        for i, block in enumerate(self.transformer_blocks):
            text, video = self._run_block(i, n_double, block, video, text, temb, **ctx)
        for i, block in enumerate(self.single_transformer_blocks):
            text, video = self._run_block(i, n_single, block, video, text, temb, **ctx)
        noisy = layout.noisy
        video = video[:, video.shape[1] - noisy.num_tokens :]
        video = self.proj_out(self.norm_out(video, temb))
        return unpatchify(video, noisy.num_frames, noisy.height, noisy.width)
