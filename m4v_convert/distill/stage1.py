"""Stage 1: teacher-forced attention transfer (DESIGN §4.1).

One teacher pass per step records, for every selected layer, the attention input, its output
and the context an MM-DiM needs; every MM-DiM then learns to reproduce its layer's output from
the teacher's input. Each layer's loss is normalized by its teacher output's mean square, so
deep layers with large activations do not dominate. The layers' problems are independent, and
each is trained as it would be alone: its own AdamW and gradient-norm limit, its step taken as soon
as the backward pass has its gradients (which are freed then: one layer's exist at a time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

from m4v_convert.distill.trainer import StageOutcome, StageSchedule, Trainer
from m4v_convert.layers.init_from_attention import calibrate_output_norm
from m4v_convert.layers.mmdim import MMDiM

RecordFn = Callable[[dict], dict]  # batch → {layer: LayerRecord}


@dataclass
class Stage1Settings(StageSchedule):
    calibrate_norm: bool = True


@dataclass
class Stage1Result:
    error_before: dict[int, float]
    error_after: dict[int, float]
    losses: list[dict[int, float]] = field(default_factory=list)
    outcome: StageOutcome | None = None


def normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch mean of each sample's MSE divided by that sample's teacher mean square.

    Per sample (not per batch), so the loss of a batch split over processes averages to the loss
    of the whole batch: data-parallel training is then the single-process step.
    """
    p, t = pred.float(), target.float()
    err = (p - t).pow(2).flatten(1).mean(1)
    scale = t.pow(2).flatten(1).mean(1).clamp(min=1e-12)
    return (err / scale).mean()


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


class Stage1Task:
    """Stage 1 as a :class:`~m4v_convert.distill.trainer.StageTask`: one teacher pass records every
    selected layer; each block's loss is :func:`normalized_mse` against its layer's output."""

    name = "stage1"
    title = "stage 1 (attention transfer)"

    def __init__(self, blocks: dict[int, nn.Module], record: RecordFn, batches: Callable[[int], dict],
                 generator: torch.Generator | None = None, grad_checkpointing: bool = False,
                 counter: Callable[[dict], tuple[int, int]] | None = None, sharded: bool = False):
        self.blocks, self.record, self.batches = blocks, record, batches
        self.sharded = sharded
        self.generator = generator
        self.grad_checkpointing = grad_checkpointing
        self.counter = counter

    def batch(self, step: int) -> dict:
        return self.batches(step)

    def _call(self, block: nn.Module, rec) -> torch.Tensor:
        x = rec.hidden_states
        if self.sharded and torch.is_grad_enabled():
            # FSDP2 reduce-scatters a block's gradients when the backward reaches the block's inputs; a
            # teacher record needs no gradient, so every layer's whole gradients would wait for the end of
            # the backward (measured: all of them at once). Asking for the input's gradient lets each
            # layer's be reduced, stepped and freed as soon as its part of the backward is done.
            x = x.detach().requires_grad_()
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **rec.context)[0]
        return block(x, **rec.context)[0]

    def loss(self, batch: dict):
        recs = self.record(batch)
        total, parts = 0.0, {}
        for i, block in self.blocks.items():
            layer_loss = normalized_mse(self._call(block, recs[i]), recs[i].output)
            total = total + layer_loss
            parts[f"layer{i}"] = layer_loss.detach()
        return total, parts

    def count(self, batch: dict) -> tuple[int, int]:
        if self.counter is not None:
            return self.counter(batch)
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return (1 if first is None else int(first.shape[0])), 0


def run_stage1(
    blocks: dict[int, nn.Module],
    record: RecordFn,
    train_batches: Callable[[int], dict],
    eval_batches: list[dict],
    settings: StageSchedule,
    progress=None,
    *,
    trainer: Trainer | None = None,
    generator: torch.Generator | None = None,
    resume: dict | None = None,
    grad_checkpointing: bool = False,
    counter: Callable[[dict], tuple[int, int]] | None = None,
    calibrate: Callable[[dict, dict], None] | None = None,
    name: str = "stage1",
    title: str | None = None,
) -> Stage1Result:
    """Train ``blocks`` (layer index → MMDiM) in place.

    record: runs the teacher on a batch and returns ``{layer: LayerRecord}``.
    train_batches: step → batch (drawn from ``generator``, which checkpoints save and resume restores).
    eval_batches: fixed held-out batches for the before/after report.
    progress: optional callable(step, losses: dict[int, float]) for display.
    trainer: the run's :class:`Trainer` (checkpoints, processes, log); default: a local one.
    resume: a checkpoint of this stage in progress (from ``RunDir.load``).
    calibrate: (blocks, records) → None, the per-head output-scale calibration run before training
        (``settings.calibrate_norm``); default :func:`calibrate_output_norms` (blocks are MMDiMs).
    name, title: the stage's name in checkpoints and the log, and its progress line (layer groups).
    """
    # the held-out records are made again for the errors after training, not kept through it: they are
    # as large as a training batch's (18 GB for Wan2.1-1.3B at 480p), and the same teacher pass on the
    # same batches gives them again
    if resume is None:
        eval_records = [record(b) for b in eval_batches]
        if getattr(settings, "calibrate_norm", True):
            (calibrate or calibrate_output_norms)(blocks, eval_records[0])
        before = layer_errors(blocks, eval_records)
        del eval_records
    else:  # the weights (norm calibration included) come from the checkpoint
        before = {int(k): float(v) for k, v in resume["extra"]["error_before"].items()}
    if trainer is None:
        trainer = Trainer(nn.ModuleDict({str(i): b for i, b in blocks.items()}), show_progress=False)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    params: dict[str, nn.Parameter] = {}
    units: list[list[str]] = []  # each layer's trainable parameters
    for i, blk in blocks.items():
        unit = {names.get(id(p), f"{i}.{n}"): p for n, p in blk.named_parameters() if p.requires_grad}
        params.update(unit)
        if unit:
            units.append(list(unit))
    task = Stage1Task(blocks, record, train_batches, generator=generator, grad_checkpointing=grad_checkpointing,
                      counter=counter, sharded=trainer.dist.fsdp)
    task.name, task.title = name, title or task.title  # a layer group checkpoints and resumes as its own stage

    def on_step(step, parts):
        if progress is not None:
            progress(step, {int(k.removeprefix("layer")): v for k, v in parts.items()})

    # each layer is its own unit (own AdamW, own gradient-norm limit, stepped inside the backward): the
    # layers' losses are independent, so a layer trains as it would alone, in any layer group
    outcome = trainer.fit(task, settings, params, resume=resume, on_step=on_step, units=units,
                          extra={"error_before": {str(i): v for i, v in before.items()}})
    result = Stage1Result(error_before=before, error_after=before, outcome=outcome,
                          losses=[{int(k.removeprefix("layer")): v for k, v in p.items()} for p in outcome.parts])
    if settings.steps > 0 and params:
        for blk in blocks.values():
            blk.eval()
        result.error_after = layer_errors(blocks, [record(b) for b in eval_batches])
    return result
