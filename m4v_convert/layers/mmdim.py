"""The MM-DiM block: re-composition → Mamba2 mixer → inverse, plus the temporal branch.

Backbone-agnostic: it sees video tokens with their :class:`VideoLayout`, optional text tokens
with a padding mask, optional RoPE tables; what those are for a given model is the adapter's
business (``m4v_convert.backbones``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from m4v_convert.layers.mixer import Mamba2Mixer, MixerConfig
from m4v_convert.layers.recompose import NUM_PATHS, Recomposer, VideoLayout
from m4v_convert.layers.temporal import TemporalBranch

CONFIG_VERSION = 1
SCANS = ("space", "time", "alternate")


@dataclass
class MMDiMConfig:
    """Everything needed to rebuild an MM-DiM block (saved next to converted weights)."""

    d_model: int
    nheads: int
    headdim: int
    d_state: int | None = None  # default: headdim (one SSM head per attention head)
    ngroups: int | None = None  # default: nheads
    layer_index: int = 0  # selects the zigzag path (layer_index mod 8)
    # re-composition (each can be switched off for ablations)
    text_sandwich: bool = True
    registers: bool = True
    num_registers: int = 1  # one per resolution stage
    zigzag: bool = True  # False: raster order inside each frame
    # the video's scan across time: "space" frame by frame; "time" position by position, every frame
    # of a position in turn (recompose.time_major_order); "alternate": time at odd layers, space at even
    scan: str = "space"
    # also scan the re-composed sequence backwards (shared weights, outputs summed): for backbones
    # whose attention is bidirectional over frames; off for autoregressive ones (PyramidFlow)
    bidirectional: bool = False
    # text tokens (sandwich rows) get their own in/out projections and B/C norms: for joint
    # (double-stream) blocks, whose attention has separate text and video Q/K/V/O weights
    text_projections: bool = False
    # mixer
    d_conv: int = 4
    conv_activation: str = "identity"
    bias: bool = True
    bc_norm: str = "none"
    norm_eps: float = 1e-6
    out_norm: bool = True
    rotary: bool = False  # apply the backbone's RoPE to B/C
    chunk_size: int = 256
    A_init: float = 0.5  # initial decay rate |A| (see init_from_attention)
    dt_init: float = 0.01
    # temporal branch
    temporal: bool = True
    temporal_grid: int = 2
    temporal_dim: int = 32
    temporal_heads: int = 4
    temporal_causal: bool = True
    # "frames": one query per frame (its pooled raster); "tokens": every token queries every frame's
    # regions, so what it reads depends on where it is (layers/temporal.py)
    temporal_queries: str = "frames"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.d_state = self.d_state or self.headdim
        self.ngroups = self.ngroups or self.nheads
        for name in ("d_model", "nheads", "headdim", "d_state", "ngroups", "num_registers", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.scan not in SCANS:
            raise ValueError(f"scan: expected one of {', '.join(SCANS)}, got {self.scan!r}")

    @property
    def path(self) -> int | None:
        return self.layer_index % NUM_PATHS if self.zigzag else None

    @property
    def time_major(self) -> bool:
        return self.scan == "time" or (self.scan == "alternate" and self.layer_index % 2 == 1)

    def mixer_config(self) -> MixerConfig:
        return MixerConfig(
            d_model=self.d_model, nheads=self.nheads, headdim=self.headdim, d_state=self.d_state,
            ngroups=self.ngroups, d_conv=self.d_conv, conv_activation=self.conv_activation, bias=self.bias,
            bc_norm=self.bc_norm, norm_eps=self.norm_eps, out_norm=self.out_norm, chunk_size=self.chunk_size,
            bidirectional=self.bidirectional, text_projections=self.text_projections,
        )

    def to_dict(self) -> dict:
        return {"_type": "MMDiMConfig", "_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MMDiMConfig":
        d = dict(d)
        if d.pop("_type", "MMDiMConfig") != "MMDiMConfig":
            raise ValueError("config: not an MMDiMConfig")
        version = d.pop("_version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ValueError(f"config: MMDiMConfig version {version} is newer than this toolkit ({CONFIG_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config: unknown MMDiMConfig fields {sorted(unknown)}")
        return cls(**d)


class MMDiM(nn.Module):
    def __init__(self, config: MMDiMConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        fk = {"device": device, "dtype": dtype}
        self.mixer = Mamba2Mixer(config.mixer_config(), **fk)
        if config.registers:
            self.register_tokens = nn.Parameter(torch.zeros(config.num_registers, config.d_model, **fk))
            if self.register_tokens.device.type != "meta":
                nn.init.normal_(self.register_tokens, std=0.02)
        if config.temporal:
            self.temporal = TemporalBranch(
                config.d_model, grid=config.temporal_grid, dim=config.temporal_dim, heads=config.temporal_heads,
                causal=config.temporal_causal, queries=config.temporal_queries, **fk,
            )

    def recomposer(self, layout: VideoLayout) -> Recomposer:
        return Recomposer(layout, self.config.path, registers=self.config.registers,
                          text_sandwich=self.config.text_sandwich, time_major=self.config.time_major)

    def forward(
        self,
        video: torch.Tensor,
        layout: VideoLayout,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        temporal_sources: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        video: (b, N, d_model) tokens of ``layout`` (raster order per frame).
        text: (b, Lz, d_model) or None; text_mask: (b, Lz) bool, True = valid (default: all valid).
        rotary: (cos, sin) each (N, d_state) or (b, N, d_state) for the video tokens, raster order
            (last dim ngroups·d_state: one table per group/head); used only when ``config.rotary``.
            Text and registers get no rotation.
        temporal_sources: (T,) or (b, T) bool, frames the temporal branch may read.
        Returns (video_out (b, N, d_model), text_out (b, Lz, d_model) or None).
        """
        self._check_inputs(video, layout, text, text_mask, rotary)
        if layout.max_register >= self.config.num_registers and self.config.registers:
            raise ValueError(
                f"layout: register index {layout.max_register} but the block has {self.config.num_registers} registers"
            )
        rc = self.recomposer(layout)
        seq = rc.forward(video, getattr(self, "register_tokens", None), text, text_mask)
        mixer_rotary = None
        if self.config.rotary and rotary is not None:
            lz = rc.num_text_tokens(text)
            n = rotary[0].shape[-1]  # d_state, or ngroups·d_state for one table per group
            one = torch.ones(n, device=video.device)
            zero = torch.zeros(n, device=video.device)
            mixer_rotary = (rc.permute_rows(rotary[0], one, lz), rc.permute_rows(rotary[1], zero, lz))
        text_rows = None
        if self.config.text_projections:
            text_rows = rc.text_rows(text, "cpu")  # static: the mixer finds its indices on the CPU
        out = self.mixer(seq, rotary=mixer_rotary, text_rows=text_rows)
        video_out, text_out = rc.inverse(out, text, text_mask)
        if self.config.temporal:
            video_out = video_out + self.temporal(video, layout, temporal_sources)
        return video_out, text_out

    def _check_inputs(self, video, layout, text, text_mask, rotary):
        d = self.config.d_model
        if video.dim() != 3 or video.shape[-1] != d:
            raise ValueError(f"video: expected shape (batch, tokens, {d}), got {tuple(video.shape)}")
        if not video.is_floating_point():
            raise ValueError(f"video: expected a floating-point tensor, got {video.dtype}")
        layout.validate()
        if video.shape[1] == 0:
            raise ValueError("video: expected at least one token, got L=0")
        if video.shape[1] != layout.num_tokens:
            raise ValueError(
                f"layout: describes {layout.num_tokens} tokens but video has {video.shape[1]} "
                f"(expected video shape ({video.shape[0]}, {layout.num_tokens}, {d}))"
            )
        if text is not None:
            if text.dim() != 3 or text.shape[0] != video.shape[0] or text.shape[-1] != d:
                raise ValueError(f"text: expected shape ({video.shape[0]}, text_len, {d}), got {tuple(text.shape)}")
            if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
                raise ValueError(f"text_mask: expected shape {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
        elif text_mask is not None:
            raise ValueError("text_mask: given without text")
        if rotary is not None and self.config.rotary:
            c = self.config
            for name, t in zip(("rotary[0]", "rotary[1]"), rotary):
                if t.shape[-2:] not in ((layout.num_tokens, c.d_state), (layout.num_tokens, c.ngroups * c.d_state)):
                    raise ValueError(
                        f"{name}: expected shape (..., {layout.num_tokens}, {c.d_state}) or (..., "
                        f"{layout.num_tokens}, {c.ngroups * c.d_state}) (one table per group), got {tuple(t.shape)}"
                    )

    def extra_repr(self) -> str:
        c = self.config
        return (f"layer_index={c.layer_index}, path={c.path}, time_major={c.time_major}, "
                f"text_sandwich={c.text_sandwich}, registers={c.num_registers if c.registers else 0}, "
                f"bidirectional={c.bidirectional}, temporal={c.temporal}")
