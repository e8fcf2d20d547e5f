"""Token re-composition for MM-DiM (DESIGN §2): text sandwich, per-frame registers, zigzag paths.

The video part of a sequence is described by a :class:`VideoLayout`: a tuple of frame blocks in
sequence order, each ``(num_frames, height, width, register)`` and stored raster-ordered
(frame, row, column), which is how every seed backbone lays out its patch tokens. A block of
lower-resolution history frames followed by a block of full-resolution frames is two blocks.

The re-composed (mixer) sequence of one batch item is::

    [ Z_l (Lz) | r_k, frame_0 (zigzag), r_k, frame_1, ..., r_k(last) | Z_r (Lz) ]

where ``Z_l`` holds the valid text tokens pushed to its right end, ``Z_r`` the same tokens
pushed to its left end (pads are zero vectors), and ``r_k`` is the learnable register of the
frame's block (one register per resolution stage). The inverse drops the registers, undoes the
zigzag and sums both text copies at the valid positions. Time-major (``MMDiMConfig.scan``) reads
each frame block position by position instead, every frame of a position in turn, after the
block's registers (:func:`time_major_order`): a token's previous-frame neighbour is one step back
instead of a frame's length; the sequence has the same length.

All index tensors depend only on (layout, path, time-major) and are cached per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

NUM_PATHS = 8


@dataclass(frozen=True)
class FrameBlock:
    """``num_frames`` consecutive frames of ``height`` × ``width`` tokens sharing one register."""

    num_frames: int
    height: int
    width: int
    register: int = 0

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.height * self.width


@dataclass(frozen=True)
class VideoLayout:
    blocks: tuple[FrameBlock, ...]

    @classmethod
    def single(cls, num_frames: int, height: int, width: int, register: int = 0) -> "VideoLayout":
        return cls((FrameBlock(num_frames, height, width, register),))

    @property
    def num_tokens(self) -> int:
        return sum(b.num_tokens for b in self.blocks)

    @property
    def num_frames(self) -> int:
        return sum(b.num_frames for b in self.blocks)

    @property
    def max_register(self) -> int:
        return max(b.register for b in self.blocks)

    def validate(self) -> None:
        if not self.blocks:
            raise ValueError("layout: expected at least one frame block, got none")
        for i, b in enumerate(self.blocks):
            if min(b.num_frames, b.height, b.width) < 1 or b.register < 0:
                raise ValueError(
                    f"layout: block {i} must have num_frames, height, width >= 1 and register >= 0, got {b}"
                )

    def frame_slices(self) -> list[tuple[int, int, int, int, int]]:
        """Per frame, in sequence order: (start token, height, width, register, block index)."""
        out, start = [], 0
        for bi, b in enumerate(self.blocks):
            for _ in range(b.num_frames):
                out.append((start, b.height, b.width, b.register, bi))
                start += b.frame_tokens
        return out


def zigzag_order(height: int, width: int, path: int) -> torch.Tensor:
    """Raster indices of a ``height × width`` grid in the order zigzag path ``path`` visits them.

    Paths 0-3 snake row by row, 4-7 column by column; ``path % 4`` picks the start corner
    (top-left, top-right, bottom-left, bottom-right). Consecutive cells are always grid
    neighbours (a boustrophedon never jumps).
    """
    if not 0 <= path < NUM_PATHS:
        raise ValueError(f"path: expected 0..{NUM_PATHS - 1}, got {path}")
    grid = torch.arange(height * width).view(height, width)
    corner = path % 4
    if corner & 1:
        grid = grid.flip(1)
    if corner & 2:
        grid = grid.flip(0)
    if path >= 4:
        grid = grid.t()
    grid = grid.clone()
    grid[1::2] = grid[1::2].flip(1)
    return grid.reshape(-1)


def time_major_order(num_frames: int, order: torch.Tensor) -> torch.Tensor:
    """Indices into a block of ``num_frames`` raster-ordered frames that visit the spatial positions
    in ``order`` (one frame's cell indices) and, at each, every frame: forwards in time at even
    positions, backwards at odd ones, so consecutive tokens are always neighbours (the same cell in
    adjacent frames, or adjacent cells of one frame)."""
    cells = order.numel()
    grid = (torch.arange(num_frames)[:, None] * cells + order[None, :]).t().clone()  # (cells, frames)
    grid[1::2] = grid[1::2].flip(1)
    return grid.reshape(-1)


@lru_cache(maxsize=256)
def _video_indices_cpu(layout: VideoLayout, path: int | None, registers: bool,
                       time_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather, inverse) for the video part.

    ``path=None`` keeps raster order inside frames (the zigzag ablation). ``time_major``: each frame
    block is scanned position by position (:func:`time_major_order`) instead of frame by frame, its
    registers (one per frame, as frame by frame) placed before it.
    ``gather[j]`` indexes into ``cat([video tokens (N), registers (R)])``: values < N are video
    tokens, ``N + k`` is register k. ``inverse[i]`` is the position of video token i in the
    re-composed video part.
    """
    n = layout.num_tokens
    pieces = []

    def cells(h: int, w: int) -> torch.Tensor:  # one frame's cells in scan order
        return torch.arange(h * w) if path is None else zigzag_order(h, w, path)

    if time_major:
        start = 0
        for b in layout.blocks:
            if registers:
                pieces.append(torch.full((b.num_frames,), n + b.register))
            pieces.append(start + time_major_order(b.num_frames, cells(b.height, b.width)))
            start += b.num_tokens
    else:
        orders: dict[tuple[int, int], torch.Tensor] = {}
        for start, h, w, reg, _ in layout.frame_slices():
            if registers:
                pieces.append(torch.tensor([n + reg]))
            if (h, w) not in orders:
                orders[(h, w)] = cells(h, w)
            pieces.append(start + orders[(h, w)])
    if registers:
        pieces.append(torch.tensor([n + layout.blocks[-1].register]))
    gather = torch.cat(pieces)
    is_video = gather < n
    inverse = torch.empty(n, dtype=torch.long)
    inverse[gather[is_video]] = torch.nonzero(is_video).squeeze(1)
    return gather, inverse


_DEVICE_CACHE: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _device_indices(layout: VideoLayout, path: int, registers: bool, device,
                    time_major: bool = False) -> tuple[torch.Tensor, ...]:
    """(gather, inverse, register_slots, register_ids) on ``device``, cached.

    ``register_slots`` are the positions of the registers in the re-composed video part and
    ``register_ids`` which register sits there (both empty without registers).
    """
    key = (layout, path, registers, str(device), time_major)
    hit = _DEVICE_CACHE.get(key)
    if hit is None:
        if len(_DEVICE_CACHE) > 256:
            _DEVICE_CACHE.clear()
        gather, inverse = _video_indices_cpu(layout, path, registers, time_major)
        is_register = gather >= layout.num_tokens
        slots = torch.nonzero(is_register).squeeze(1)
        ids = gather[is_register] - layout.num_tokens
        hit = tuple(t.to(device) for t in (gather, inverse, slots, ids))
        _DEVICE_CACHE[key] = hit
    return hit


def video_indices(layout: VideoLayout, path: int, registers: bool, device,
                  time_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return _device_indices(layout, path, registers, device, time_major)[:2]


def text_sandwich_indices(text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices for the left and right text copies.

    text_mask: (b, Lz) bool, True = valid token (valid tokens may sit anywhere).
    Returns (left, right), each (b, Lz) indexing into ``cat([text, zero_row])`` (index Lz = zero).
    ``left`` holds the valid tokens in order, right-aligned; ``right`` the same, left-aligned.
    """
    b, lz = text_mask.shape
    mask = text_mask.bool()
    n_valid = mask.sum(1, keepdim=True)  # (b, 1)
    # Stable order of valid positions: sort by (not valid, position).
    pos = torch.arange(lz, device=mask.device).expand(b, lz)
    key = (~mask).long() * lz + pos
    valid_sorted = key.argsort(dim=1)  # first n_valid entries are valid positions in order
    slot = torch.arange(lz, device=mask.device).expand(b, lz)
    right = torch.where(slot < n_valid, valid_sorted, torch.full_like(slot, lz))
    shift = (slot - (lz - n_valid)).clamp(min=0)
    left = torch.where(slot >= lz - n_valid, valid_sorted.gather(1, shift), torch.full_like(slot, lz))
    return left, right


class Recomposer:
    """Builds the mixer sequence from (video, text) and maps the mixer output back.

    Stateless apart from the cached indices; the learnable registers are passed in.
    """

    def __init__(self, layout: VideoLayout, path: int, *, registers: bool, text_sandwich: bool,
                 time_major: bool = False):
        layout.validate()
        self.layout = layout
        self.path = path
        self.use_registers = registers
        self.use_text = text_sandwich
        self.time_major = time_major

    def _indices(self, device) -> tuple[torch.Tensor, ...]:
        return _device_indices(self.layout, self.path, self.use_registers, device, self.time_major)

    def num_text_tokens(self, text: torch.Tensor | None) -> int:
        return text.shape[1] if (self.use_text and text is not None) else 0

    def forward(
        self,
        video: torch.Tensor,
        register_tokens: torch.Tensor | None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """video: (b, N, d); register_tokens: (R, d); text: (b, Lz, d); text_mask: (b, Lz) bool.

        Every slot of the output is written exactly once, straight from its source: video tokens
        by one ``index_copy_`` (one pass over the video, no concatenated staging copy), registers
        and the two text copies into their slots.
        """
        b, n, d = video.shape
        gather, inverse, reg_slots, reg_ids = self._indices(video.device)
        lz = self.num_text_tokens(text)
        n_video = gather.numel()
        seq = video.new_empty(b, n_video + 2 * lz, d)
        seq.index_copy_(1, inverse + lz if lz else inverse, video)
        if self.use_registers:
            regs = register_tokens.to(video.dtype).index_select(0, reg_ids)
            seq.index_copy_(1, reg_slots + lz if lz else reg_slots, regs.unsqueeze(0).expand(b, -1, -1))
        if lz == 0:
            return seq
        left, right = self._text_indices(text, text_mask)
        text_ext = torch.cat([text.to(video.dtype), text.new_zeros(b, 1, d, dtype=video.dtype)], dim=1)
        seq[:, :lz] = text_ext.gather(1, left.unsqueeze(-1).expand(-1, -1, d))
        seq[:, lz + n_video:] = text_ext.gather(1, right.unsqueeze(-1).expand(-1, -1, d))
        return seq

    def _text_indices(self, text, text_mask):
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        return text_sandwich_indices(text_mask)

    def inverse(
        self, seq: torch.Tensor, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """seq: (b, L', d) mixer output → (video (b, N, d), text (b, Lz, d) or None)."""
        b, _, d = seq.shape
        inverse = self._indices(seq.device)[1]
        lz = self.num_text_tokens(text)
        video = seq.index_select(1, lz + inverse if lz else inverse)  # index_select: one gather pass
        if lz == 0:
            return video, None
        left, right = self._text_indices(text, text_mask)
        n_video = seq.shape[1] - 2 * lz
        text_out = seq.new_zeros(b, lz + 1, d)
        text_out.scatter_add_(1, left.unsqueeze(-1).expand(-1, -1, d), seq[:, :lz])
        text_out.scatter_add_(1, right.unsqueeze(-1).expand(-1, -1, d), seq[:, lz + n_video :])
        return video, text_out[:, :lz]

    def text_rows(self, text: torch.Tensor | None, device) -> torch.Tensor:
        """(L',) bool: the positions of both text copies (padding slots included) in the sequence."""
        lz = self.num_text_tokens(text)
        n_video = self.sequence_length(0)
        rows = torch.zeros(n_video + 2 * lz, dtype=torch.bool, device=device)
        rows[:lz] = True
        rows[lz + n_video:] = True
        return rows

    def sequence_length(self, text_len: int) -> int:
        regs = self.layout.num_frames + 1 if self.use_registers else 0
        return self.layout.num_tokens + regs + (2 * text_len if self.use_text else 0)

    def permute_rows(self, rows: torch.Tensor, fill: torch.Tensor, text_len: int) -> torch.Tensor:
        """Re-compose a per-video-token table (e.g. RoPE cos/sin), filling non-video slots.

        rows: (..., N, k) in video raster order; fill: (k,) used for registers and text.
        Returns (..., L', k) aligned with the mixer sequence.
        """
        n = self.layout.num_tokens
        gather = self._indices(rows.device)[0]
        lead = rows.shape[:-2]
        ext = torch.cat([rows, fill.to(rows).expand(*lead, 1, -1)], dim=-2)
        idx = gather.clamp(max=n)  # registers → fill row
        out = ext.index_select(-2, idx)
        if self.use_text and text_len:
            pad = fill.to(rows).expand(*lead, text_len, -1)
            out = torch.cat([pad, out, pad], dim=-2)
        return out
