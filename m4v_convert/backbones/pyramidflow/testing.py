"""Tiny PyramidFlow models and inputs in the real formats (same key names, small sizes), for tests."""

from __future__ import annotations

import torch

from .layout import LATENT_PATCH, history_clips
from .miniflux import PyramidFluxTransformer
from .sd3 import PyramidDiffusionMMDiT


def tiny_miniflux_config() -> dict:
    """1 double + 2 single blocks, 2 heads × 16 (RoPE axes 4/6/6), 4 latent channels."""
    return {
        "_class_name": "PyramidFluxTransformer",
        "attention_head_dim": 16,
        "axes_dims_rope": [4, 6, 6],
        "in_channels": 16,
        "interp_condition_pos": True,
        "joint_attention_dim": 24,
        "num_attention_heads": 2,
        "num_layers": 1,
        "num_single_layers": 2,
        "patch_size": 1,
        "pooled_projection_dim": 20,
        "use_flash_attn": False,
        "use_gradient_checkpointing": False,
        "use_temporal_causal": True,
    }


def tiny_sd3_config() -> dict:
    """2 joint blocks (the last context-pre-only), 2 heads × 8, 4 latent channels."""
    return {
        "_class_name": "PyramidDiffusionMMDiT",
        "attention_head_dim": 8,
        "caption_projection_dim": 16,
        "in_channels": 4,
        "joint_attention_dim": 24,
        "max_num_frames": 200,
        "num_attention_heads": 2,
        "num_layers": 2,
        "patch_size": 2,
        "pooled_projection_dim": 20,
        "pos_embed_max_size": 16,
        "pos_embed_type": "sincos",
        "qk_norm": "rms_norm",
        "sample_size": 16,
        "use_flash_attn": False,
        "use_gradient_checkpointing": False,
        "use_temporal_causal": True,
    }


def _randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give the q/k norm weights non-trivial values (they start at 1), so swaps are caught."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm_" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))


def _make(cls, config: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls.from_config(config)
    _randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def make_tiny_miniflux(seed: int = 0, **overrides) -> PyramidFluxTransformer:
    return _make(PyramidFluxTransformer, {**tiny_miniflux_config(), **overrides}, seed)


def make_tiny_sd3(seed: int = 0, **overrides) -> PyramidDiffusionMMDiT:
    return _make(PyramidDiffusionMMDiT, {**tiny_sd3_config(), **overrides}, seed)


def tiny_pyramid_inputs(
    config: dict,
    *,
    batch: int = 2,
    num_stages: int = 2,
    num_history: int = 3,
    text_len: int = 6,
    base_grid: tuple[int, int] = (2, 3),
    seed: int = 0,
) -> dict:
    """Keyword arguments for a model call with ``num_stages`` stages (levels 0..S-1).

    Stage ``s`` has a ``base_grid · 2**s`` token grid and ``num_history`` history frames laid out
    by the release rule (:func:`history_clips`: the newest at the stage's level, older ones
    lower, the oldest together at level 0), then one noisy frame. Text rows have different
    amounts of padding. Text/time rows are ``batch × num_stages``, stage index fastest.
    """
    g = torch.Generator().manual_seed(seed)
    channels = config["in_channels"]
    if config.get("_class_name") == "PyramidFluxTransformer":
        channels //= LATENT_PATCH * LATENT_PATCH
    sample = []
    for s in range(num_stages):
        clips = []
        for frames, level in [*history_clips(s, num_history), (1, s)]:
            h = base_grid[0] * 2**level * LATENT_PATCH
            w = base_grid[1] * 2**level * LATENT_PATCH
            clips.append(torch.randn(batch, channels, frames, h, w, generator=g))
        sample.append(clips)
    rows = batch * num_stages
    mask = torch.zeros(rows, text_len, dtype=torch.long)
    for r in range(rows):
        mask[r, : max(1, text_len - 1 - r % 3)] = 1
    return {
        "sample": sample,
        "encoder_hidden_states": torch.randn(rows, text_len, config["joint_attention_dim"], generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(rows, config["pooled_projection_dim"], generator=g),
        "timestep_ratio": torch.rand(rows, generator=g) * 1000,
    }
