"""What one teacher pass hands to stage 1 for each selected layer (shared by all backbones)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerRecord:
    """One selected layer's teacher-forced training example: input, context, teacher output."""

    hidden_states: torch.Tensor
    output: torch.Tensor
    context: dict  # keyword arguments for MMDiM.forward besides the video tokens
    pre_out: torch.Tensor | None = None  # teacher's input to its output projection (per-head scale)
