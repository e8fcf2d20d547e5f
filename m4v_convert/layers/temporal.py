"""Lightweight temporal branch of MM-DiM (DESIGN §2).

Each frame is projected to ``dim`` channels, average-pooled to a ``grid × grid`` raster and
folded into one token of ``grid² · dim`` channels; multi-head attention runs over the frames
(causal or bidirectional, optionally only to "source" frames such as PyramidFlow's history);
the result is unfolded back into ``grid²`` region slices, projected to the model width and
added to every token of its region. ``up_proj`` starts at zero, so the branch starts as a no-op.
Cost is O(T²) in the number of frames, independent of the frame size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from m4v_convert.layers.recompose import VideoLayout


class TemporalBranch(nn.Module):
    def __init__(self, d_model: int, *, grid: int = 2, dim: int = 64, heads: int = 4, causal: bool = True,
                 device=None, dtype=None):
        super().__init__()
        token_dim = grid * grid * dim
        if token_dim % heads:
            raise ValueError(f"temporal heads: grid²·dim ({token_dim}) must be divisible by heads ({heads})")
        fk = {"device": device, "dtype": dtype}
        self.grid, self.dim, self.heads, self.causal = grid, dim, heads, causal
        self.down_proj = nn.Linear(d_model, dim, **fk)
        self.qkv = nn.Linear(token_dim, 3 * token_dim, **fk)
        self.attn_out = nn.Linear(token_dim, token_dim, **fk)
        self.up_proj = nn.Linear(dim, d_model, **fk)
        if self.up_proj.weight.device.type != "meta":
            nn.init.zeros_(self.up_proj.weight)
            nn.init.zeros_(self.up_proj.bias)

    def _region_index(self, h: int, w: int, device) -> torch.Tensor:
        g = self.grid
        rows = torch.arange(h, device=device) * g // h
        cols = torch.arange(w, device=device) * g // w
        return (rows[:, None] * g + cols[None, :]).reshape(-1)  # (h*w,) region id per token

    def forward(self, video: torch.Tensor, layout: VideoLayout, sources: torch.Tensor | None = None) -> torch.Tensor:
        """video: (b, N, d) raster tokens of ``layout`` → (b, N, d) additive update.

        sources: optional (T,) or (b, T) bool over frames in sequence order; a frame attends only
        to source frames (and, when causal, not later ones). Every frame also sees a zero
        "null" slot, so a frame with no visible source gets a zero update.
        """
        b, n, _ = video.shape
        g2 = self.grid * self.grid
        h_small = self.down_proj(video)  # (b, N, dim)
        tokens, regions = [], []
        start = 0
        for blk in layout.blocks:
            x = h_small[:, start : start + blk.num_tokens].reshape(b, blk.num_frames, blk.height, blk.width, self.dim)
            x = x.permute(0, 1, 4, 2, 3).reshape(b * blk.num_frames, self.dim, blk.height, blk.width)
            pooled = F.adaptive_avg_pool2d(x, self.grid)  # (b*T, dim, g, g)
            pooled = pooled.reshape(b, blk.num_frames, self.dim, g2).transpose(2, 3)  # (b, T, g², dim)
            tokens.append(pooled.reshape(b, blk.num_frames, g2 * self.dim))
            regions.append(self._region_index(blk.height, blk.width, video.device))
            start += blk.num_tokens
        frames = torch.cat(tokens, dim=1)  # (b, T, g²·dim)
        t = frames.shape[1]

        q, k, v = self.qkv(frames).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (b, H, T, hd)
        null = q.new_zeros(b, self.heads, 1, q.shape[-1])
        k = torch.cat([null, k], dim=2)
        v = torch.cat([null, v], dim=2)
        allowed = torch.ones(t, t, dtype=torch.bool, device=video.device)
        if self.causal:
            allowed = torch.tril(allowed)
        allowed = allowed.expand(b, t, t)
        if sources is not None:
            src = sources.to(device=video.device, dtype=torch.bool)
            src = src.expand(b, t) if src.dim() == 1 else src
            allowed = allowed & src[:, None, :]
        allowed = torch.cat([allowed.new_ones(b, t, 1), allowed], dim=2)  # null slot always visible
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        out = self.attn_out(out.transpose(1, 2).reshape(b, t, -1))  # (b, T, g²·dim)
        out = self.up_proj(out.unflatten(-1, (g2, self.dim)))  # (b, T, g², d)

        updates = []
        frame = 0
        for blk, region in zip(layout.blocks, regions):
            o = out[:, frame : frame + blk.num_frames]  # (b, Tb, g², d)
            # index_select: one gather pass (advanced indexing is several times slower on CPU)
            updates.append(o.index_select(2, region).reshape(b, blk.num_tokens, -1))
            frame += blk.num_frames
        return updates[0] if len(updates) == 1 else torch.cat(updates, dim=1)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, dim={self.dim}, heads={self.heads}, causal={self.causal}"
