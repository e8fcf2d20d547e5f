"""PyramidFlow teachers (miniFLUX and SD3 variants) that load the released checkpoints unchanged.

* :class:`PyramidFluxTransformer` — miniFLUX: 8 double-stream + 16 single-stream blocks.
* :class:`PyramidDiffusionMMDiT` — SD3: 24 joint blocks.
* :func:`load_pyramidflow` / :func:`save_pyramidflow` — the release folder layout.
* :func:`token_layout` — where text and each video clip sit in a stage's single-stream sequence,
  for re-composing tokens (MM-DiM) without re-deriving PyramidFlow's rules.

Sequence, position and mask rules: :mod:`.layout`.
"""

from __future__ import annotations

import torch

from .attention import PyramidFlowAttnProcessor, PyramidJointAttention
from .layout import (
    PyramidFrameBlock,
    StageLayout,
    attention_mask,
    build_stage_layouts,
    history_clips,
    sequence_position_ids,
)
from .loader import build_pyramidflow, load_pyramidflow, save_pyramidflow
from .miniflux import PyramidFluxTransformer
from .sd3 import PyramidDiffusionMMDiT


def token_layout(
    sample,
    encoder_attention_mask: torch.Tensor,
    *,
    full_grid: tuple[int, int] | None = None,
    num_levels: int = 3,
) -> list[StageLayout]:
    """Token layout of each stage's single-stream sequence for a model call with these inputs.

    Args:
        sample: the models' ``sample`` argument (list over stages of clips, oldest first).
        encoder_attention_mask: ``(B·S, Lz)``, stage index fastest.
        full_grid: token grid ``(H, W)`` of the top pyramid level (e.g. ``(48, 80)`` at 768p);
            needed to name levels in a single-stage call (the release's inference calls the
            model once per stage). Without it, levels are known only when the call holds all
            ``num_levels`` stages.

    Returns:
        one :class:`StageLayout` per stage: ``text_len``, ``text_mask`` ``(B, Lz)`` bool, and
        ``blocks`` in sequence order, each a :class:`PyramidFrameBlock` with ``num_frames``,
        ``height``, ``width`` (tokens), ``level``, ``start`` offset, temporal ``t_start`` and
        ``role`` (``"history"`` for conditional frames, ``"noisy"`` for the last clip).
        ``layout.frame_blocks()`` gives the plain ``(num_frames, H, W, level)`` tuples.
    """
    return build_stage_layouts(sample, encoder_attention_mask, full_grid=full_grid, num_levels=num_levels)


__all__ = [
    "PyramidFluxTransformer",
    "PyramidDiffusionMMDiT",
    "PyramidFlowAttnProcessor",
    "PyramidJointAttention",
    "PyramidFrameBlock",
    "StageLayout",
    "attention_mask",
    "build_pyramidflow",
    "history_clips",
    "load_pyramidflow",
    "save_pyramidflow",
    "sequence_position_ids",
    "token_layout",
]
