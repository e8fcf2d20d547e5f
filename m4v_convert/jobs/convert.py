"""The conversion job, one way through for every backbone: load → select → swap → distill →
save → report.

:func:`run_conversion` plans it (:mod:`.plan`) and runs :func:`convert`, or, for
``--num-processes N`` outside a launched process group, N processes of it through accelerate.
:func:`convert` asks the backbone only for what differs (:class:`Conversion`, from its registry
entry) and writes one ``conversion.json`` schema and one model card for all of them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

import m4v_convert
from m4v_convert.errors import Interrupted, M4VError, error_reason
from m4v_convert.jobs.plan import (ConversionPlan, ConvertFlags, console_or_default, conversion_inputs, load_for,
                                   plan_conversion, resolve_device, resolve_dtype)

SCHEMA_VERSION = 1  # of conversion.json


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DistillSummary(_Strict):
    stage1_steps: int
    lr: float
    stages: list[int]
    train: str
    processes: int
    schedules: dict[str, dict[str, Any]]
    feature_weight: float
    stage2: dict[str, Any]  # steps (0: not run), lr, final_loss, end_to_end_before/after, skipped (why)
    stage3: dict[str, Any]


class ConversionSummary(_Strict):
    """``conversion.json``: one schema for every backbone."""

    schema_version: Literal[1]
    toolkit: Literal["m4v-convert"]
    version: str
    backbone: str
    source: str
    recipe: str
    layers: list[int]
    calibration: str  # synthetic | folder:PATH | teacher:(synthetic|folder:PATH) | none
    distill: DistillSummary
    transformer_folder: str | None  # where in the output folder the model is (None: the folder itself)
    pipeline: bool = False  # the output folder is a whole diffusers pipeline (model_index.json)
    error_before: dict[str, float]  # per converted layer, held-out relative error
    error_after: dict[str, float]
    end_to_end_error: dict[str, float | None]  # before / after stages 2-3
    stages: dict[str, dict[str, Any]]  # what each stage that was planned did
    flops_scope: str
    original_total_flops: int | None
    converted_total_flops: int | None
    seconds: float | None
    # --layers auto: budget, probe steps, each candidate's sensitivity, converted / kept layers, FLOPs ratio
    layer_selection: dict[str, Any] | None = None


class Conversion(Protocol):
    """A backbone's side of one conversion (``registry.Backbone.conversion(plan)``).
    Implemented by ``backbones/{wan,pyramidflow,generic}/conversion.py``."""

    transformer_folder: str | None  # where in --out the model goes (None: --out itself)
    pipeline: Path | None  # the diffusers pipeline folder the model came from (None: not a pipeline)
    distill_scope: str  # said of the held-out batch in the printed end-to-end error, e.g. ", all stages"

    def check_before_loading(self) -> None:
        """What can be refused from the checkpoint's config alone, before any weight is read."""

    def load_teacher(self) -> nn.Module: ...

    # optional: ``meta_teacher() -> nn.Module``, the teacher built from the checkpoint's config on the
    # meta device, no weight read (the memory plan, jobs/memory.py, uses it; without it, no plan)

    # optional, for --layers auto (jobs/layer_selection.py): ``flops_ratio(config, layers) -> float``, converted /
    # original FLOPs as ``flops_report`` counts them (backbones without it refuse --flops-budget)

    # optional, for --fsdp: ``load_sharded(layers, sharder) -> (teacher, student)``, both read and converted
    # one block at a time, each pair handed to ``sharder.block`` before the next is read (without it, every
    # process loads the whole teacher first), and ``sharded_loading_refused() -> str | None``: why this run
    # needs the whole teacher in one process after all (None: it does not)

    def select_layers(self, teacher: nn.Module) -> list[int]: ...

    def loaded_line(self, teacher: nn.Module, layers: list[int]) -> str:
        """The console line saying what was loaded and what will be converted."""

    def make_student(self, teacher: nn.Module, layers: list[int]) -> nn.Module:
        """An independent converted copy of ``teacher`` (raises ValueError where they disagree)."""

    def distill_adapter(self, teacher: nn.Module, student: nn.Module, layers: list[int]):
        """The :class:`~m4v_convert.distill.job.DistillAdapter` of this backbone (None: nothing to distill)."""

    def flops_report(self, config: dict, layers: list[int]) -> dict:
        """Original vs converted FLOPs: ``original_total_flops``, ``converted_total_flops`` (None where
        no video size is known) and, where it is not the whole model, their ``scope``."""

    def write_flops(self, report: dict, folder: Path) -> None: ...

    def flops_line(self, report: dict) -> str: ...

    def card_facts(self, config: dict, flops: dict):
        """:class:`~m4v_convert.io.model_card.CardFacts`."""


def convert(plan: ConversionPlan) -> dict:
    """Run the planned conversion; returns the summary written to ``conversion.json``. Inside a
    launched process group every process trains its share of each batch and rank 0 writes.
    Interrupted, it says what was kept and the command that continues (:class:`Interrupted`)."""
    try:
        return _convert(plan)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        run = plan.distill.run_dir
        if run is not None and run.has_checkpoint():
            raise Interrupted(f"--out was not written; the run's checkpoint{run.progress_text()} is kept in "
                              f"{run.path}: the same command with --resume {run.path} continues it") from None
        raise Interrupted("--out was not written and no checkpoint was kept (--checkpoint-every N makes a run "
                          "resumable)") from None


def _convert(plan: ConversionPlan) -> dict:
    from m4v_convert.backbones import registry
    from m4v_convert.distill.job import DistillReport, run_distillation
    from m4v_convert.distill.stage1 import Stage1Result
    from m4v_convert.io.pipeline import check_components
    from m4v_convert.jobs.memory import check_memory

    flags, recipe, con, dist = plan.flags, plan.recipe, plan.console, plan.dist
    selection = None  # --layers auto: how the layers were chosen (jobs/layer_selection.py)
    steps: Conversion = registry.resolve(plan.backbone.conversion)(plan)
    con.print(f"[bold]m4v-convert[/] {m4v_convert.__version__}  recipe [cyan]{recipe.name}[/]  "
              f"checkpoint {flags.checkpoint}" + (f"  ({dist.world} processes)" if dist.enabled else ""))
    steps.check_before_loading()
    if plan.auto_layers:  # the budget can be checked from the config alone
        from m4v_convert.jobs.layer_selection import check_budget

        meta = steps.meta_teacher()
        check_budget(plan, steps, steps.select_layers(meta), dict(meta.config))
    if steps.pipeline is not None:
        others = check_components(steps.pipeline, steps.transformer_folder)
        con.print(f"pipeline folder in: --out will be the pipeline with the converted {steps.transformer_folder}/ "
                  f"({', '.join(others)} {'copied' if flags.copy_components else 'hard-linked where possible'})")
    elif steps.transformer_folder is None:
        con.print("note: --checkpoint is not a diffusers pipeline folder (no model_index.json): --out holds the "
                  "converted transformer alone")
    memory = check_memory(plan, steps, dist.world if dist.enabled else flags.num_processes)
    if flags.dry_run:
        con.print("--dry-run: stopped before loading any weight; nothing was written")
        return {"dry_run": True, "memory": None if memory is None else memory.to_dict()}
    if loads_block_by_block(steps, dist.fsdp):
        teacher, student, layers = _load_sharded(plan, steps)
    else:
        if dist.fsdp and hasattr(steps, "load_sharded"):
            con.print(f"--fsdp: every process loads the whole teacher, then keeps its shard: "
                      f"{steps.sharded_loading_refused()}")
        teacher = steps.load_teacher()
        teacher.requires_grad_(False)
        layers = steps.select_layers(teacher)
        if plan.auto_layers:
            from m4v_convert.jobs.layer_selection import select_layers

            layers, selection = select_layers(plan, steps, teacher, layers)
        con.print(steps.loaded_line(teacher, layers))
        torch.manual_seed(flags.seed)
        try:
            student = steps.make_student(teacher, layers)
        except ValueError as e:
            raise M4VError(f"checkpoint and recipe {recipe.name!r} disagree: {e}") from None
        student.requires_grad_(False)
    cfg = dict(teacher.config)

    adapter = steps.distill_adapter(teacher, student, layers)
    if adapter is None:  # nothing to distill (a generic recipe without an inputs section, no steps)
        report = DistillReport(stage1=Stage1Result({}, {}), results={}, calibration="none", end_to_end_before=None,
                               end_to_end_after=None, log=[], plan=plan.distill)
    else:
        report = run_distillation(teacher, student, adapter, recipe, flags, plan.distill, dist, con, plan.device,
                                  plan.dtype)
    print_distill_report(con, report, scope=steps.distill_scope)
    if not any(r.get("steps") for r in report.results.values()):
        con.print("[bold yellow]warning:[/] nothing was trained (every planned stage was skipped or had 0 steps): "
                  "the output holds the MM-DiM layers as initialized from attention, not distilled")

    flops = steps.flops_report(cfg, layers)
    summary = conversion_summary(plan, layers, report, flops, steps.transformer_folder, steps.pipeline is not None)
    if selection is not None:
        summary["layer_selection"] = selection
    # config["m4v"]["layers"] holds the per-layer MMDiMConfig dicts; the plain list goes under its own key
    record = {k: v for k, v in summary.items() if k not in ("layers", "error_before", "error_after",
                                                           "end_to_end_error", "stages", "seconds")}
    student.register_to_config(m4v={**student.config["m4v"], **record, "converted_layers": layers})
    # sharded (--fsdp): every process gathers the weights with rank 0, one tensor at a time, as it writes
    tensors = None
    if dist.fsdp:
        from m4v_convert.distill.sharding import full_tensors

        tensors = full_tensors(student)
    try:
        if dist.is_main:
            _write_output(plan, steps, student, layers, report, flops, summary, cfg, tensors)
            con.print(f"[green]wrote[/] {Path(flags.out).resolve()}  ({summary['seconds']} s)")
            con.print(steps.flops_line(flops))
    finally:
        for _ in tensors or ():  # the other processes' part of the gathers (and rank 0's, after a failed write)
            pass
    dist.barrier()
    return summary


def loads_block_by_block(steps: Conversion, fsdp: bool) -> bool:
    """Whether the teacher is read block by block into its shards (``--fsdp`` and a backbone that
    offers ``load_sharded``, where nothing needs the whole teacher in one process first)."""
    return fsdp and hasattr(steps, "load_sharded") and steps.sharded_loading_refused() is None


def _load_sharded(plan: ConversionPlan, steps: Conversion):
    """(teacher, student, layers), sharded as they are read (``steps.load_sharded``)."""
    from m4v_convert.distill.sharding import BlockSharder, release_freed_memory

    flags, d = plan.flags, plan.distill
    layers = steps.select_layers(steps.meta_teacher())
    copies = d.train == "all" and any(k in d.stages for k in (2, 3))  # as run_distillation's own_parameters_
    sharder = BlockSharder(plan.dist, plan.device, d.bf16, copies=copies)
    torch.manual_seed(flags.seed)
    try:
        teacher, student = steps.load_sharded(layers, sharder)
    except ValueError as e:
        raise M4VError(f"checkpoint and recipe {plan.recipe.name!r} disagree: {e}") from None
    sharder.root(teacher, student)
    release_freed_memory()
    plan.console.print(steps.loaded_line(teacher, layers) + f" (read block by block into {plan.dist.world} shards)")
    return teacher, student, layers


def _write_output(plan: ConversionPlan, steps: Conversion, student, layers, report, flops, summary, cfg,
                  tensors=None) -> None:
    """``--out``, written atomically; a failed write (disk full) is one error line and keeps the
    earlier ``--out``, if any. ``tensors``: the weights one at a time (see ``save_converted``)."""
    from safetensors import SafetensorError

    from m4v_convert.distill.job import plot_losses
    from m4v_convert.io.converted import save_converted
    from m4v_convert.io.model_card import model_card
    from m4v_convert.io.output import atomic_output_dir
    from m4v_convert.io.pipeline import write_pipeline

    flags, recipe = plan.flags, plan.recipe
    try:
        with atomic_output_dir(flags.out, flags.overwrite) as tmp:
            folder = tmp / steps.transformer_folder if steps.transformer_folder else tmp
            save_converted(student, folder, metadata={
                "m4v_version": m4v_convert.__version__, "source": summary["source"], "recipe": recipe.name,
                "layers": ",".join(map(str, layers)), "calibration": summary["calibration"],
            }, tensors=tensors)
            if steps.pipeline is not None:
                write_pipeline(steps.pipeline, tmp, steps.transformer_folder, type(student).__name__,
                               copy_components=flags.copy_components)
            steps.write_flops(flops, tmp)
            (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in report.log))
            plot_losses(report.log, tmp / "loss.png")
            summary["seconds"] = round(time.time() - plan.started, 1)
            (tmp / "conversion.json").write_text(json.dumps(summary, indent=2))
            (tmp / "README.md").write_text(model_card(summary, recipe, steps.card_facts(cfg, flops)))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise M4VError(f"--out {Path(flags.out).resolve()}: cannot write the converted model ({error_reason(e)}); the "
                       "earlier --out, if any, is kept") from None


def conversion_summary(plan: ConversionPlan, layers: list[int], report, flops: dict,
                       transformer_folder: str | None, pipeline: bool = False) -> dict:
    """``conversion.json`` (:class:`ConversionSummary`, the same for every backbone)."""
    d, stage1 = plan.distill, report.stage1
    s1 = d.schedules[1]
    summary = {
        "schema_version": SCHEMA_VERSION,
        "toolkit": "m4v-convert", "version": m4v_convert.__version__, "backbone": plan.backbone.name,
        "source": str(Path(plan.flags.checkpoint).resolve()), "recipe": plan.recipe.name, "layers": layers,
        "calibration": report.calibration,
        "distill": {"stage1_steps": s1.steps if 1 in d.stages else 0, "lr": s1.lr, "stages": d.stages,
                    "train": d.train, "processes": plan.dist.world,
                    "schedules": {f"stage{k}": d.schedules[k].to_dict() for k in d.stages},
                    "feature_weight": d.feature_weight,
                    "stage2": later_stage(report.results, d, 2), "stage3": later_stage(report.results, d, 3)},
        "transformer_folder": transformer_folder,
        "pipeline": pipeline,
        "error_before": {str(k): v for k, v in stage1.error_before.items()},
        "error_after": {str(k): v for k, v in stage1.error_after.items()},
        "end_to_end_error": {"before": report.end_to_end_before, "after": report.end_to_end_after},
        "stages": {k: {n: v for n, v in r.items() if n not in ("error_before", "error_after")}
                   for k, r in report.results.items()},
        "flops_scope": flops.get("scope", "whole model, one forward"),
        "original_total_flops": flops.get("original_total_flops"),
        "converted_total_flops": flops.get("converted_total_flops"),
        "seconds": None,
    }
    ConversionSummary.model_validate(summary)  # a summary off the schema is a bug here, not the user's
    return summary


def later_stage(results: dict, plan, k: int) -> dict:
    """``conversion.json``'s view of stage ``k`` (2: end-to-end, 3: flow-matching fine-tune)."""
    r = results.get(f"stage{k}")
    if r is None or k not in plan.stages:
        return {"steps": 0}
    if r.get("skipped"):
        return {"steps": 0, "skipped": r["skipped"]}
    if not r.get("steps"):
        return {"steps": 0}
    out = {"steps": r["steps"], "lr": plan.schedules[k].lr, "final_loss": r.get("final_loss")}
    for key in ("end_to_end_before", "end_to_end_after", "seconds", "samples_per_s"):
        if key in r:
            out[key] = r[key]
    return out


def run_conversion(flags: ConvertFlags, command: str | None = None, console=None) -> dict:
    """Convert as ``flags`` say; returns the summary written to ``conversion.json``. ``command``:
    the backbone a backbone command (``wan2.1``, ``pyramidflow``) converts (None: the recipe's)."""
    from m4v_convert.distill.distributed import in_distributed_env

    con = console_or_default(console)
    recipe, entry = load_for(flags, command)
    if flags.num_processes > 1 and not in_distributed_env() and not flags.dry_run:
        return launch_processes(flags, recipe, entry, con)
    return convert(plan_conversion(flags, recipe, entry, con))


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
    check_output_dir(flags.out, flags.overwrite, conversion_inputs(flags, recipe))
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
