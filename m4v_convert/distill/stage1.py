"""Stage 1: teacher-forced attention transfer (DESIGN §4.1).

One teacher pass per step records, for every selected layer, the attention input, its output
and the context an MM-DiM needs; every MM-DiM then learns to reproduce its layer's output from
the teacher's input. Each layer's loss is normalized by its teacher output's mean square, so
deep layers with large activations do not dominate, and all layers step together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from m4v_convert.layers.init_from_attention import calibrate_output_norm
from m4v_convert.layers.mmdim import MMDiM

RecordFn = Callable[[dict], dict]  # batch → {layer: LayerRecord}


@dataclass
class Stage1Settings:
    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    calibrate_norm: bool = True


@dataclass
class Stage1Result:
    error_before: dict[int, float]
    error_after: dict[int, float]
    losses: list[dict[int, float]] = field(default_factory=list)


def relative_error(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """‖student − teacher‖ / ‖teacher‖ over the whole tensor."""
    return float((student.float() - teacher.float()).norm() / teacher.float().norm().clamp(min=1e-12))


@torch.no_grad()
def layer_errors(blocks: dict[int, MMDiM], records: Iterable[dict]) -> dict[int, float]:
    """Mean relative error per layer over a list of recorded batches."""
    sums: dict[int, float] = {i: 0.0 for i in blocks}
    n = 0
    for rec in records:
        n += 1
        for i, block in blocks.items():
            out, _ = block(rec[i].hidden_states, **rec[i].context)
            sums[i] += relative_error(out, rec[i].output)
    return {i: s / max(n, 1) for i, s in sums.items()}


@torch.no_grad()
def calibrate_output_norms(blocks: dict[int, MMDiM], records: dict) -> None:
    """Match each MM-DiM's per-head output scale to its teacher's (see ``calibrate_output_norm``)."""
    for i, block in blocks.items():
        if records[i].pre_out is None:
            continue
        captured = {}
        h = block.mixer.out_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("s", a[0]))
        try:
            block(records[i].hidden_states, **records[i].context)
        finally:
            h.remove()
        calibrate_output_norm(block, captured["s"], records[i].pre_out)


def run_stage1(
    blocks: dict[int, MMDiM],
    record: RecordFn,
    train_batches: Callable[[int], dict],
    eval_batches: list[dict],
    settings: Stage1Settings,
    progress=None,
) -> Stage1Result:
    """Train ``blocks`` (layer index → MMDiM) in place.

    record: runs the teacher on a batch and returns ``{layer: LayerRecord}``.
    train_batches: step → batch. eval_batches: fixed held-out batches for the before/after report.
    progress: optional callable(step, losses: dict[int, float]) for display.
    """
    eval_records = [record(b) for b in eval_batches]
    if settings.calibrate_norm:
        calibrate_output_norms(blocks, eval_records[0])
    before = layer_errors(blocks, eval_records)
    params = [p for blk in blocks.values() for p in blk.parameters() if p.requires_grad]
    result = Stage1Result(error_before=before, error_after=before)
    if settings.steps > 0 and params:
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.steps, eta_min=settings.lr * 0.1)
        for blk in blocks.values():
            blk.train()
        for step in range(settings.steps):
            recs = record(train_batches(step))
            opt.zero_grad(set_to_none=True)
            losses = {}
            total = 0.0
            for i, blk in blocks.items():
                target = recs[i].output
                out, _ = blk(recs[i].hidden_states, **recs[i].context)
                loss = (out.float() - target.float()).pow(2).mean() / target.float().pow(2).mean().clamp(min=1e-12)
                total = total + loss
                losses[i] = loss.item()
            if not torch.isfinite(total.detach()):
                raise FloatingPointError(f"stage 1: non-finite loss at step {step}: {losses}")
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            opt.step()
            sched.step()
            result.losses.append(losses)
            if progress is not None:
                progress(step, losses)
        for blk in blocks.values():
            blk.eval()
        result.error_after = layer_errors(blocks, eval_records)
    return result
