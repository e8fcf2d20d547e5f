"""Stage 2: end-to-end distillation (DESIGN §4.2).

The converted student runs free on a noised batch; the teacher runs on the same batch.

    L = w_out · MSE(v_student, v_teacher) + λ · Σ_layers normalized_mse(f_student, f_teacher)

``f`` is a converted layer's output (the student's MM-DiM, the teacher's attention at the same
layer, each in its own forward pass); each layer term is divided by the teacher feature's mean
square, per sample (see ``stage1.normalized_mse``). λ = recipe ``distill.stage2.feature_weight``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from m4v_convert.distill.stage1 import normalized_mse, relative_error

FeatureModules = Callable[[nn.Module], dict[int, nn.Module]]  # model → {layer: module whose output is f}


def forward_with_features(model: nn.Module, batch: dict, modules: dict[int, nn.Module]):
    """(model prediction, {layer: output of modules[layer]}) for one forward on ``batch``."""
    feats: dict[int, torch.Tensor] = {}

    def tap(i):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            feats.setdefault(i, out)  # first call only: gradient checkpointing re-runs the forward in backward
        return hook

    handles = [m.register_forward_hook(tap(i)) for i, m in modules.items()]
    try:
        pred = model(**batch, return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    return pred, feats


class Stage2Task:
    """End-to-end distillation as a :class:`~m4v_convert.distill.trainer.StageTask`."""

    name = "stage2"
    title = "stage 2 (end-to-end distillation)"

    def __init__(self, teacher: nn.Module, student: nn.Module, feature_modules: FeatureModules,
                 batches: Callable[[int], dict], generator: torch.Generator | None = None,
                 feature_weight: float = 0.5, output_weight: float = 1.0,
                 counter: Callable[[dict], tuple[int, int]] | None = None):
        self.teacher, self.student = teacher, student
        self.teacher_modules = feature_modules(teacher)
        self.student_modules = feature_modules(student)
        self.batches, self.generator = batches, generator
        self.feature_weight, self.output_weight = feature_weight, output_weight
        self.counter = counter

    def batch(self, step: int) -> dict:
        return self.batches(step)

    def loss(self, batch: dict):
        with torch.no_grad():
            t_pred, t_feats = forward_with_features(self.teacher, batch, self.teacher_modules)
        s_pred, s_feats = forward_with_features(self.student, batch, self.student_modules)
        out_loss = (s_pred.float() - t_pred.float()).pow(2).mean()
        feat_loss = sum((normalized_mse(s_feats[i], t_feats[i]) for i in self.student_modules),
                        torch.zeros((), device=out_loss.device))
        total = self.output_weight * out_loss + self.feature_weight * feat_loss
        return total, {"output": out_loss.detach(), "feature": feat_loss.detach()}

    def count(self, batch: dict) -> tuple[int, int]:
        return self.counter(batch) if self.counter else (int(batch["hidden_states"].shape[0]), 0)


@torch.no_grad()
def end_to_end_error(student: nn.Module, teacher: nn.Module, batches: list[dict]) -> float:
    """Mean over ``batches`` of ‖v_student − v_teacher‖ / ‖v_teacher‖ (held-out report)."""
    if not batches:
        return float("nan")
    student.eval()
    errs = [relative_error(student(**b, return_dict=False)[0], teacher(**b, return_dict=False)[0]) for b in batches]
    return sum(errs) / len(errs)
