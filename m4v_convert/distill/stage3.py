"""Stage 3 (optional): flow-matching fine-tune on the user's latents (DESIGN §4.3).

``--data DIR`` holds clean latents + text embeddings in the calibration folder format
(``calibration.py``). Each step noises a batch at random shifted σ, ``x_t = (1 − σ)·x0 + σ·ε``,
and regresses the student's prediction on the rectified-flow velocity

    L = MSE(v_pred, ε − x0)

which is what Wan predicts: its ``FlowMatchEulerDiscreteScheduler`` steps ``x ← x + (σ_next − σ)·v``
with σ decreasing, so ``v = dx/dσ = ε − x0`` (diffusers' flow-matching training scripts use the
same ``target = noise - model_input``). Without ``--data`` the stage is skipped (and logged so).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class Stage3Task:
    """Flow-matching fine-tune as a :class:`~m4v_convert.distill.trainer.StageTask`.

    batches: step → (forward kwargs, velocity target) from ``calibration.noised_batch(with_target=True)``.
    """

    name = "stage3"
    title = "stage 3 (flow-matching fine-tune)"

    def __init__(self, student: nn.Module, batches: Callable[[int], tuple[dict, torch.Tensor]],
                 generator: torch.Generator | None = None, counter: Callable[[dict], tuple[int, int]] | None = None):
        self.student, self.batches, self.generator = student, batches, generator
        self.counter = counter

    def batch(self, step: int):
        return self.batches(step)

    def loss(self, batch):
        kwargs, target = batch
        pred = self.student(**kwargs, return_dict=False)[0]
        loss = (pred.float() - target.float()).pow(2).mean()
        return loss, {"flow_matching": loss.detach()}

    def count(self, batch) -> tuple[int, int]:
        kwargs, _ = batch
        return self.counter(kwargs) if self.counter else (int(kwargs["hidden_states"].shape[0]), 0)
