"""Run one conversion: plan it (:mod:`.plan`), then the backbone's conversion job, or, for
``--num-processes N`` outside a launched process group, N processes of it through accelerate."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from m4v_convert.errors import M4VError
from m4v_convert.jobs.plan import (ConversionPlan, ConvertFlags, console_or_default, load_for, plan_conversion,
                                   resolve_device, resolve_dtype)


def run_conversion(flags: ConvertFlags, command: str | None = None, console=None) -> dict:
    """Convert as ``flags`` say; returns the summary written to ``conversion.json``. ``command``:
    the backbone a backbone command (``wan2.1``, ``pyramidflow``) converts (None: the recipe's)."""
    from m4v_convert.backbones import registry
    from m4v_convert.distill.distributed import in_distributed_env

    con = console_or_default(console)
    recipe, entry = load_for(flags, command)
    if flags.num_processes > 1 and not in_distributed_env():
        return launch_processes(flags, recipe, entry, con)
    plan: ConversionPlan = plan_conversion(flags, recipe, entry, con)
    return registry.resolve(entry.convert)(plan)


def launch_processes(flags: ConvertFlags, recipe, entry, con) -> dict:
    """``--num-processes N``: check what can be checked here, then run N processes of this
    conversion (``jobs/worker.py``) via accelerate."""
    from m4v_convert.distill.distributed import launch
    from m4v_convert.distill.job import make_plan
    from m4v_convert.io.output import check_output_dir

    n = flags.num_processes
    device = resolve_device(flags.device)
    resolve_dtype(flags.dtype)
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise M4VError(f"--num-processes {n}: only {torch.cuda.device_count()} CUDA devices on this machine")
    check_output_dir(flags.out, flags.overwrite)
    make_plan(recipe, flags, device, default_stages=entry.default_stages)
    c = recipe.calib
    if flags.calib is None:
        train = int(c.get("num_samples", 16)) - int(c.get("batch_size", 1)) * int(c.get("eval_batches", 1))
        if n > train:
            raise M4VError(f"--num-processes {n}: the recipe's synthetic calibration has only {train} training "
                           "samples; every process needs at least one of its own: use fewer processes or more "
                           "samples (calib.num_samples)")
    con.print(f"launching {n} processes through accelerate ({device.type})")
    rc = launch(flags.to_json(), n)
    if rc != 0:
        raise M4VError(f"--num-processes {n}: the processes failed (exit status {rc}; their first error is printed "
                       "above); nothing was written to --out")
    return json.loads((Path(flags.out) / "conversion.json").read_text())


def print_distill_report(con, report, scope: str = "") -> None:
    """The held-out errors of a finished distillation: per layer (stage 1), end to end (stages 2/3)."""
    if report.stage1.error_before:
        _print_errors(con, report.stage1)
    if report.end_to_end_before is not None:
        con.print(f"end-to-end relative error ‖v_student − v_teacher‖ / ‖v_teacher‖ (held-out batch{scope}): "
                  f"{report.end_to_end_before:.4f} before stage 2/3 → {report.end_to_end_after:.4f} after")


def _print_errors(con, result) -> None:
    from rich.table import Table

    table = Table(title="per-layer relative error ‖student − teacher‖ / ‖teacher‖ (held-out batch)")
    table.add_column("layer", justify="right")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for i in result.error_before:
        table.add_row(str(i), f"{result.error_before[i]:.4f}", f"{result.error_after[i]:.4f}")
    con.print(table)
