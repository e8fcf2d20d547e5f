"""``--layers auto --flops-budget F``: convert the layers the teacher misses least, within a FLOPs budget.

Each candidate layer's sensitivity is its held-out relative error after a short stage 1 (``--probe-steps``)
with every candidate converted: stage 1 trains each layer alone on the teacher's own inputs, so one short
run measures every layer at once. Then, most sensitive first, a layer stays attention wherever the model
still fits the budget without it (converted FLOPs / original FLOPs ≤ F, counted as the FLOPs report counts
them: the conversion's ``flops_ratio(config, layers)``); the rest are converted, and the conversion runs as
``--layers`` with that list would (the same weights). The table goes to ``conversion.json``
(``layer_selection``) and the model card.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from m4v_convert.errors import M4VError

DEFAULT_PROBE_STEPS = 100


def probe_steps_of(flags) -> int:
    return flags.probe_steps if flags.probe_steps is not None else DEFAULT_PROBE_STEPS


def check_budget(plan, steps, candidates: list[int], config: dict) -> None:
    """Before any weight is read: converting every candidate must fit the budget, and a resumed run must
    have chosen its layers for this budget."""
    resumed_selection(plan)
    budget = plan.flags.flops_budget
    floor = steps.flops_ratio(config, candidates)
    if floor > budget:
        raise M4VError(f"--flops-budget {budget:g}: even with every layer converted the model keeps {floor:.3f} of "
                       f"its FLOPs; give a budget of at least {floor:.3f}")


def choose(sensitivity: dict[int, float], ratio: Callable[[list[int]], float], budget: float) -> list[int]:
    """The layers to convert: every candidate, less the most sensitive ones that the budget lets stay
    attention (most sensitive first; one that does not fit is skipped and the next one tried)."""
    candidates = sorted(sensitivity)
    kept: set[int] = set()
    for i in sorted(candidates, key=lambda j: (-sensitivity[j], j)):
        trial = [j for j in candidates if j not in kept and j != i]
        if ratio(trial) <= budget:
            kept.add(i)
    return [j for j in candidates if j not in kept]


def probe_sensitivity(plan, steps, teacher, candidates: list[int]) -> dict[int, float]:
    """Every candidate's held-out error after ``--probe-steps`` of stage 1 (a throwaway student)."""
    from m4v_convert.distill.job import run_distillation

    flags, d = plan.flags, plan.distill
    probe_steps = probe_steps_of(flags)
    probe_plan = dataclasses.replace(
        d, stages=[1], schedules={1: dataclasses.replace(d.schedules[1], steps=probe_steps, checkpoint_every=0)},
        run_dir=None, resume_state=None)
    plan.console.print(f"--layers auto: measuring each layer's sensitivity ({probe_steps} stage-1 steps, every "
                       "candidate converted)")
    torch.manual_seed(flags.seed)
    probe = steps.make_student(teacher, candidates)
    probe.requires_grad_(False)
    adapter = steps.distill_adapter(teacher, probe, candidates)
    report = run_distillation(teacher, probe, adapter, plan.recipe, flags, probe_plan, plan.dist, plan.console,
                              plan.device, plan.dtype)
    del probe, adapter
    return {int(i): float(e) for i, e in report.stage1.error_after.items()}


def select_layers(plan, steps, teacher, candidates: list[int]) -> tuple[list[int], dict]:
    """(layers to convert, the ``layer_selection`` record) for ``--layers auto``. A resumed run keeps the
    selection it made (saved with its identity) rather than probing again."""
    saved = resumed_selection(plan)
    if saved is not None:
        plan.console.print("--layers auto: the resumed run's selection (its probe is not run again)")
        record = saved
    else:
        config = dict(teacher.config)
        ratio = lambda layers: steps.flops_ratio(config, layers)  # noqa: E731
        sensitivity = probe_sensitivity(plan, steps, teacher, candidates)
        layers = choose(sensitivity, ratio, plan.flags.flops_budget)
        record = {"flops_budget": plan.flags.flops_budget,
                  "probe_steps": probe_steps_of(plan.flags),
                  "sensitivity": {str(i): sensitivity[i] for i in sorted(sensitivity)},
                  "converted": layers, "kept_attention": [i for i in candidates if i not in layers],
                  "flops_ratio": ratio(layers)}
    plan.console.print(selection_text(record))
    if saved is not None or plan.distill.resume_state is None:  # a run saved without one resumes as it was
        plan.distill.layer_selection = record
    return list(record["converted"]), record


def resumed_selection(plan) -> dict | None:
    """The selection of the run that ``--resume`` continues (None: not resuming, or that run chose its layers
    otherwise); refused when this command asks for another budget or probe."""
    state = plan.distill.resume_state
    saved = None if state is None else state["identity"].get("layer_selection")
    if saved is None:
        return None
    asked = {"flops_budget": plan.flags.flops_budget, "probe_steps": probe_steps_of(plan.flags)}
    if any(saved[k] != v for k, v in asked.items()):
        raise M4VError(f"--resume {plan.distill.run_dir.path}: that run chose its layers with --flops-budget "
                       f"{saved['flops_budget']:g} --probe-steps {saved['probe_steps']}, this one asks for "
                       f"--flops-budget {asked['flops_budget']:g} --probe-steps {asked['probe_steps']}; resume it "
                       "with the same, or pass another --run-dir to start a new run")
    return saved


def selection_text(record: dict) -> str:
    """The console's and the model card's account of the selection."""
    converted = set(record["converted"])
    rows = "\n".join(f"| {i} | {e:.4f} | {'MM-DiM' if int(i) in converted else 'attention'} |"
                     for i, e in record["sensitivity"].items())
    return (f"layers chosen for FLOPs budget {record['flops_budget']:g} (converted model: "
            f"{record['flops_ratio']:.3f} of the original's FLOPs); sensitivity = held-out relative error after "
            f"{record['probe_steps']} stage-1 steps:\n\n| layer | sensitivity | becomes |\n|---:|---:|---|\n{rows}\n")
