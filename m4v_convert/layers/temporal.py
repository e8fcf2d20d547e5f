"""Lightweight temporal branch of MM-DiM (DESIGN §2).

Each frame is projected to ``dim`` channels, average-pooled to a ``grid × grid`` raster and
folded into one token of ``grid² · dim`` channels; multi-head attention runs over the frames
(causal or bidirectional, optionally only to "source" frames such as PyramidFlow's history);
the result is unfolded back into ``grid²`` region slices, projected to the model width and
added to every token of its region. ``up_proj`` starts at zero, so the branch starts as a no-op.
Cost is O(T²) in the number of frames, independent of the frame size.

``queries="tokens"`` keeps position (issue 28: on a teacher whose attention carries motion, a frame
pooled to one query loses where things are): every token queries, with its own ``dim``-channel
projection, the ``grid²`` region slots of every frame (each slot that region's pooled mean, plus a learned
embedding of the region, which the token's query also gets for its own region), heads over ``dim``;
one output per token. Cost O(N·T·grid²·dim): linear in the tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from m4v_convert.layers.recompose import VideoLayout

QUERIES = ("frames", "tokens")


class TemporalBranch(nn.Module):
    def __init__(self, d_model: int, *, grid: int = 2, dim: int = 64, heads: int = 4, causal: bool = True,
                 queries: str = "frames", device=None, dtype=None):
        super().__init__()
        if queries not in QUERIES:
            raise ValueError(f"temporal queries: expected one of {', '.join(QUERIES)}, got {queries!r}")
        token_dim = grid * grid * dim if queries == "frames" else dim
        if token_dim % heads:
            what = "grid²·dim" if queries == "frames" else "dim"
            raise ValueError(f"temporal heads: {what} ({token_dim}) must be divisible by heads ({heads})")
        fk = {"device": device, "dtype": dtype}
        self.grid, self.dim, self.heads, self.causal, self.queries = grid, dim, heads, causal, queries
        self.down_proj = nn.Linear(d_model, dim, **fk)
        if queries == "frames":
            self.qkv = nn.Linear(token_dim, 3 * token_dim, **fk)
        else:
            self.region_embed = nn.Parameter(torch.zeros(grid * grid, dim, **fk))
            self.q_proj = nn.Linear(dim, dim, **fk)
            self.kv_proj = nn.Linear(dim, 2 * dim, **fk)
        self.attn_out = nn.Linear(token_dim, token_dim, **fk)
        self.up_proj = nn.Linear(dim, d_model, **fk)
        if self.up_proj.weight.device.type != "meta":
            nn.init.zeros_(self.up_proj.weight)
            nn.init.zeros_(self.up_proj.bias)
            if queries == "tokens":
                nn.init.normal_(self.region_embed, std=0.02)

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
        if self.queries == "tokens":
            return self._token_queries(h_small, frames, layout, regions, sources)

        q, k, v = self.qkv(frames).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (b, H, T, hd)
        every_frame = torch.arange(t, device=video.device)
        out = self._attend(q, k, v, every_frame, every_frame, t, sources)
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

    def _attend(self, q, k, v, query_frame, key_frame, t: int, sources) -> torch.Tensor:
        """SDPA of (b, H, ·, hd) queries over keys plus a zero "null" slot every query sees; a query reads a
        key only if the key's frame is a source (and, causal, not after the query's frame)."""
        b = q.shape[0]
        null = k.new_zeros(b, self.heads, 1, k.shape[-1])
        k, v = torch.cat([null, k], dim=2), torch.cat([null, v], dim=2)
        allowed = torch.ones(len(query_frame), len(key_frame), dtype=torch.bool, device=q.device)
        if self.causal:
            allowed = key_frame[None, :] <= query_frame[:, None]
        allowed = allowed.expand(b, -1, -1)
        if sources is not None:
            src = sources.to(device=q.device, dtype=torch.bool)
            src = src.expand(b, t) if src.dim() == 1 else src
            allowed = allowed & src.index_select(1, key_frame)[:, None, :]
        allowed = torch.cat([allowed.new_ones(b, len(query_frame), 1), allowed], dim=2)  # null slot always visible
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])

    def _token_queries(self, h_small, frames, layout: VideoLayout, regions, sources) -> torch.Tensor:
        """Every token attends to every frame's region slots (and a zero null slot) → (b, N, d)."""
        b, n, _ = h_small.shape
        t, g2, dev = frames.shape[1], self.grid * self.grid, h_small.device
        token_region = torch.cat([r.repeat(blk.num_frames) for r, blk in zip(regions, layout.blocks)])  # (N,)
        token_frame, f0 = [], 0  # each token's frame in sequence order
        for blk in layout.blocks:
            token_frame.append(torch.arange(f0, f0 + blk.num_frames, device=dev).repeat_interleave(blk.height * blk.width))
            f0 += blk.num_frames
        token_frame = torch.cat(token_frame)
        slots = frames.reshape(b, t, g2, self.dim) + self.region_embed  # (b, T, g², dim)
        k, v = self.kv_proj(slots.reshape(b, t * g2, self.dim)).chunk(2, dim=-1)
        q = self.q_proj(h_small + self.region_embed.index_select(0, token_region))
        heads = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  (b, H, ·, hd)
        slot_frame = torch.arange(t, device=dev).repeat_interleave(g2)  # (T·g²,)
        out = self._attend(heads(q), heads(k), heads(v), token_frame, slot_frame, t, sources)  # (b, H, N, hd)
        return self.up_proj(self.attn_out(out.transpose(1, 2).reshape(b, n, self.dim)))

    def extra_repr(self) -> str:
        return f"grid={self.grid}, dim={self.dim}, heads={self.heads}, causal={self.causal}, queries={self.queries}"
