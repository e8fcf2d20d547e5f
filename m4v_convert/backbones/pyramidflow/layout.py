"""The PyramidFlow token sequence: layout, positions, attention mask, RoPE tables.

Both PyramidFlow variants (miniFLUX and SD3) build one sequence per pyramid stage::

    [ text (Lz, padded T5) ; clip_0 ; clip_1 ; ... ; clip_{n-1} ]

where the clips are the stage's input list, oldest first: history clips (older ones at a lower
pyramid resolution), the last conditional frame at the stage's own resolution, and last the
clip being denoised. Tokens inside a clip are raster ordered (frame, row, column) after a 2×2
spatial patchify. Rules (release ``pyramid_dit/flux_modules/modeling_pyramid_flux.py``,
``merge_input`` / ``_prepare_pyramid_image_ids``):

* **Temporal index** ``t``: frames are numbered 0, 1, ... across all clips of the stage; text
  tokens have ``t = 0``.
* **Spatial positions** of a clip whose grid ``h × w`` differs from the stage grid ``H × W`` (the
  last clip's) are the linear resampling of ``0..H-1`` onto ``h`` points (``align_corners=False``):
  ``p_i = clamp((i + 0.5)·H/h − 0.5, 0, H−1)``, i.e. fractional positions on the stage grid
  (``2i + 0.5`` for a half-resolution clip). Text sits at ``(0, 0, 0)``.
* **Attention mask**: a query sees a key iff both are "valid" (video, or unpadded text) or both
  are padded text, and (``use_temporal_causal``) ``t_key <= t_query``. So frames are
  block-causal and bidirectional inside a frame; padded T5 tokens see only each other; valid
  text (``t = 0``) sees valid text and the frames with ``t = 0``; nothing sees padding except
  padding. Stages never see each other (each stage is its own sequence).

Shapes: ``B`` batch (per stage), ``Lz`` text length, ``Lv`` video tokens, ``L = Lz + Lv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

#: Spatial patch of the latent grid (both variants patchify 2×2; miniFLUX hard-codes it).
LATENT_PATCH = 2
#: RoPE base frequency used by both variants.
ROPE_THETA = 10000


@dataclass(frozen=True)
class PyramidFrameBlock:
    """One clip of the stage sequence: ``num_frames`` frames of ``height × width`` tokens.

    ``start`` is the token offset in the single-stream sequence (text included), ``t_start`` the
    temporal index of its first frame, ``level`` its pyramid resolution level (0 = lowest; None
    when it cannot be known, see :func:`stage_layout`), ``scale_down`` how many halvings below
    the stage grid it is (0 = same resolution), ``role`` ``"history"`` or ``"noisy"``.
    """

    start: int
    num_frames: int
    height: int
    width: int
    t_start: int
    scale_down: int
    level: int | None
    role: str

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.height * self.width

    @property
    def is_history(self) -> bool:
        return self.role == "history"


@dataclass(frozen=True)
class StageLayout:
    """Token layout of one stage's single-stream sequence ``[text ; clips...]``.

    ``text_mask``: ``(B, Lz)`` bool, True for valid (unpadded) text tokens.
    ``blocks``: the clips in sequence order; the last one is the noisy clip.
    ``grid``: the stage's token grid ``(H, W)`` (the noisy clip's).
    ``stage_index``: position of the stage in the model call's ``sample`` list.
    """

    text_len: int
    text_mask: torch.Tensor
    blocks: tuple[PyramidFrameBlock, ...]
    grid: tuple[int, int]
    stage_index: int

    @property
    def video_len(self) -> int:
        return sum(b.num_tokens for b in self.blocks)

    @property
    def seq_len(self) -> int:
        return self.text_len + self.video_len

    @property
    def num_frames(self) -> int:
        return sum(b.num_frames for b in self.blocks)

    @property
    def noisy(self) -> PyramidFrameBlock:
        return self.blocks[-1]

    @property
    def history(self) -> tuple[PyramidFrameBlock, ...]:
        return self.blocks[:-1]

    def frame_blocks(self) -> list[tuple[int, int, int, int | None]]:
        """``(num_frames, H, W, level)`` per clip, in sequence order."""
        return [(b.num_frames, b.height, b.width, b.level) for b in self.blocks]


def _halvings(big: int, small: int) -> int | None:
    """``k`` with ``big == small · 2**k``, or None when the ratio is not a power of two."""
    if small <= 0 or big % small:
        return None
    ratio = big // small
    k = int(round(math.log2(ratio)))
    return k if 2**k == ratio else None


def stage_layout(
    clip_shapes: Sequence[tuple[int, int, int]],
    text_mask: torch.Tensor,
    *,
    stage_index: int = 0,
    stage_level: int | None = None,
) -> StageLayout:
    """Layout of one stage from its clips' token shapes ``(frames, H, W)``, oldest first.

    ``stage_level`` is the pyramid level of the stage (of its noisy clip); when given, each
    clip's ``level`` is ``stage_level - scale_down``, else None.
    """
    if not clip_shapes:
        raise ValueError("stage_layout: a stage needs at least one clip (the noisy one)")
    if text_mask.dim() != 2:
        raise ValueError(f"stage_layout: text_mask must be (B, Lz), got {tuple(text_mask.shape)}")
    grid_h, grid_w = clip_shapes[-1][1], clip_shapes[-1][2]
    text_len = text_mask.shape[1]
    start, t = text_len, 0
    blocks = []
    for i, (f, h, w) in enumerate(clip_shapes):
        down = _halvings(grid_h, h)
        if down is None or _halvings(grid_w, w) != down:
            down = -1  # not a pyramid resolution of this stage: positions still work, level unknown
        level = None if (stage_level is None or down < 0) else stage_level - down
        role = "noisy" if i == len(clip_shapes) - 1 else "history"
        blocks.append(PyramidFrameBlock(start, f, h, w, t, down, level, role))
        start += f * h * w
        t += f
    return StageLayout(text_len, text_mask.bool(), tuple(blocks), (grid_h, grid_w), stage_index)


def history_clips(stage_level: int, num_history: int) -> list[tuple[int, int]]:
    """Release inference rule for a stage's history clips: ``(num_frames, level)``, oldest first.

    With one latent frame per unit, the newest history frame is at the stage's own level, the
    one before it a level lower, and so on down to level 1; all older frames form one clip at
    level 0 (``generate`` in ``pyramid_dit_for_video_gen_pipeline.py``).
    """
    if num_history <= 0:
        return []
    clips, level, used = [(1, stage_level)], stage_level, 1
    while used < num_history:
        level = max(level - 1, 0)
        if level == 0:
            break
        used += 1
        clips.append((1, level))
    if level == 0 and used < num_history:
        clips.append((num_history - used, 0))
    return clips[::-1]


def resample_positions(size: int, target: int) -> torch.Tensor:
    """Positions of ``size`` points resampled onto a ``target``-point grid (float64, ``(size,)``).

    Same numbers as ``F.interpolate(arange(target), size, mode="linear")`` (align_corners=False).
    """
    i = torch.arange(size, dtype=torch.float64)
    if size == target:
        return i
    pos = (i + 0.5) * (target / size) - 0.5
    return pos.clamp(0.0, float(target - 1))


def video_position_ids(layout: StageLayout) -> torch.Tensor:
    """``(Lv, 3)`` float64 (t, h, w) positions of the video tokens, raster order per clip."""
    grid_h, grid_w = layout.grid
    out = []
    for b in layout.blocks:
        t = torch.arange(b.t_start, b.t_start + b.num_frames, dtype=torch.float64)
        h = resample_positions(b.height, grid_h)
        w = resample_positions(b.width, grid_w)
        tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
        out.append(torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3))
    return torch.cat(out, dim=0)


def sequence_position_ids(layout: StageLayout) -> torch.Tensor:
    """``(L, 3)`` float64 positions of the whole sequence: text at (0, 0, 0), then video."""
    text = torch.zeros(layout.text_len, 3, dtype=torch.float64)
    return torch.cat([text, video_position_ids(layout)], dim=0)


def frame_index(layout: StageLayout) -> torch.Tensor:
    """``(L,)`` long: temporal index of each token (text 0)."""
    parts = [torch.zeros(layout.text_len, dtype=torch.long)]
    for b in layout.blocks:
        t = torch.arange(b.t_start, b.t_start + b.num_frames, dtype=torch.long)
        parts.append(t.repeat_interleave(b.frame_tokens))
    return torch.cat(parts)


def attention_mask(layout: StageLayout, causal: bool = True, device=None) -> torch.Tensor:
    """``(B, 1, L, L)`` bool, True where the query (row) may attend to the key (column)."""
    text_mask = layout.text_mask.to(device)
    batch = text_mask.shape[0]
    video_valid = torch.ones(batch, layout.video_len, dtype=torch.bool, device=device)
    valid = torch.cat([text_mask, video_valid], dim=1)  # (B, L)
    mask = valid[:, :, None] == valid[:, None, :]
    if causal:
        t = frame_index(layout).to(device)
        mask = mask & (t[:, None] >= t[None, :])
    return mask[:, None]


def rope_tables(
    positions: torch.Tensor, axes_dims: Sequence[int], theta: float = ROPE_THETA
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables ``(L, sum(axes_dims))`` float32 for interleaved-pair RoPE.

    ``positions``: ``(L, len(axes_dims))``. Axis ``a`` owns ``axes_dims[a]`` channels, i.e.
    ``axes_dims[a] / 2`` consecutive (even, odd) pairs; pair ``j`` turns by
    ``pos_a · theta^(-2j / axes_dims[a])``. Each angle is repeated for both channels of its pair.
    """
    if positions.shape[-1] != len(axes_dims):
        raise ValueError(f"rope_tables: {positions.shape[-1]} position axes for {len(axes_dims)} dims")
    angles = []
    for a, dim in enumerate(axes_dims):
        if dim % 2:
            raise ValueError(f"rope_tables: axis dims must be even, got {list(axes_dims)}")
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(positions[:, a].double()[:, None] * inv_freq[None, :])
    angle = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``(B, L, heads, head_dim)`` by tables ``(L, head_dim)``.

    ``(x0, x1) → (x0·cos − x1·sin, x1·cos + x0·sin)``, computed in float32.
    """
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    cos = cos[None, :, None, :].to(xf.device)
    sin = sin[None, :, None, :].to(xf.device)
    return (xf * cos + rotated * sin).to(x.dtype)


def patchify(latent: torch.Tensor, patch: int = LATENT_PATCH) -> torch.Tensor:
    """``(B, C, T, H, W)`` → ``(B, T·(H/p)·(W/p), p·p·C)``; channels ordered (p_row, p_col, c)."""
    b, c, t, h, w = latent.shape
    if h % patch or w % patch:
        raise ValueError(f"latent height/width must be divisible by {patch}, got {h}×{w}")
    x = latent.reshape(b, c, t, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 3, 5, 4, 6, 1)  # b t h w p1 p2 c
    return x.reshape(b, t * (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, frames: int, height: int, width: int, patch: int = LATENT_PATCH) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, T·h·w, p·p·C)`` → ``(B, C, T, h·p, w·p)``."""
    b = tokens.shape[0]
    c = tokens.shape[-1] // (patch * patch)
    x = tokens.reshape(b, frames, height, width, patch, patch, c)
    x = x.permute(0, 6, 1, 2, 4, 3, 5)  # b c t h p1 w p2
    return x.reshape(b, c, frames, height * patch, width * patch)


def as_clip_list(stage) -> list[torch.Tensor]:
    """A stage given as one tensor or a list of clips → list of ``(B, C, T, H, W)`` clips."""
    clips = list(stage) if isinstance(stage, (list, tuple)) else [stage]
    if not clips:
        raise ValueError("sample: every stage needs at least one clip")
    for c in clips:
        if not torch.is_tensor(c) or c.dim() != 5:
            got = tuple(c.shape) if torch.is_tensor(c) else type(c).__name__
            raise ValueError(f"sample: clips must be (B, C, T, H, W) tensors, got {got}")
    return clips


def stage_levels(
    stages: Sequence[Sequence[torch.Tensor]],
    full_grid: tuple[int, int] | None,
    num_levels: int,
    patch: int = LATENT_PATCH,
) -> list[int | None]:
    """Pyramid level of each stage of a call (of its noisy clip).

    When the call holds all ``num_levels`` stages (release training packs them low → high), the
    list index is the level, whatever the video size; else, with ``full_grid`` (token grid of the
    top level), the level follows from the grid size (None when the grid is not that many halvings
    of ``full_grid``, or more than ``num_levels − 1``: a smaller video than the one it names); else
    unknown (None): a single-stage inference call cannot tell.
    """
    levels: list[int | None] = []
    for i, clips in enumerate(stages):
        h, w = clips[-1].shape[-2] // patch, clips[-1].shape[-1] // patch
        if len(stages) == num_levels:
            levels.append(i)
        elif full_grid is not None:
            down = _halvings(full_grid[0], h)
            ok = down is not None and down == _halvings(full_grid[1], w) and down < num_levels
            levels.append(num_levels - 1 - down if ok else None)
        else:
            levels.append(None)
    return levels


def build_stage_layouts(
    sample,
    encoder_attention_mask: torch.Tensor,
    *,
    full_grid: tuple[int, int] | None = None,
    num_levels: int = 3,
    patch: int = LATENT_PATCH,
) -> list[StageLayout]:
    """Layouts of every stage of a model call (same inputs as the models' ``forward``).

    ``encoder_attention_mask``: ``(B·S, Lz)`` with the stage index fastest (row ``b·S + s``), as
    in the release.
    """
    stages = [as_clip_list(s) for s in sample]
    n = len(stages)
    if encoder_attention_mask.shape[0] % n:
        raise ValueError(
            f"encoder_attention_mask has {encoder_attention_mask.shape[0]} rows, not a multiple of "
            f"the {n} stages (expected B·S rows, stage index fastest)"
        )
    levels = stage_levels(stages, full_grid, num_levels, patch)
    layouts = []
    for s, clips in enumerate(stages):
        shapes = [(c.shape[2], c.shape[3] // patch, c.shape[4] // patch) for c in clips]
        layouts.append(
            stage_layout(shapes, encoder_attention_mask[s::n], stage_index=s, stage_level=levels[s])
        )
    return layouts
