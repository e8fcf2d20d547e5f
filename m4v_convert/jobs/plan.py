"""The plan of one conversion: the recipe and the command's flags merged once, at the top.

:class:`ConvertFlags` holds what a conversion command was given (every flag of ``convert``,
``wan2.1`` and ``pyramidflow``; ``None``/``False``: not given). :func:`plan_conversion` loads the
recipe, finds its backbone in the registry, refuses what that backbone does not offer, resolves
device and dtype, joins a launched process group, checks ``--out`` and plans the distillation
(schedule, run folder, ``--resume`` state) — all before any weight is read — and hands the jobs
one :class:`ConversionPlan`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m4v_convert.errors import M4VError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ConvertFlags:
    """The flags of one conversion command; ``None`` = the recipe's value (or the default)."""

    recipe: str
    checkpoint: Path
    out: Path
    layers: str | None = None
    flops_budget: float | None = None  # --layers auto: converted / original FLOPs at most this (jobs/layer_selection.py)
    probe_steps: int | None = None  # --layers auto: stage-1 steps of the sensitivity probe
    model: str | None = None  # a published config of the recipe (generic recipes, single-file checkpoints)
    distill_steps: int | None = None
    stage2_steps: int | None = None
    stage3_steps: int | None = None
    stages: str | None = None
    lr: float | None = None
    batch_size: int | None = None
    feature_weight: float | None = None
    train: str | None = None
    checkpoint_every: int | None = None
    calib: Path | None = None
    data: Path | None = None
    teacher_calib: bool = False
    calib_cache: Path | None = None
    run_dir: Path | None = None
    resume: Path | None = None
    device: str = "auto"
    dtype: str = "auto"  # auto: float32 weights (bf16 autocast on CUDA under --mixed-precision auto)
    overwrite: bool = False
    seed: int = 0
    report_size: tuple[int, int] | None = None  # FLOPs report video size (None: the backbone's default)
    report_frames: int | None = None
    num_processes: int = 1
    fsdp: bool = False  # shard teacher and student across the processes with FSDP2 (distill/sharding.py)
    grad_checkpointing: bool | None = None  # None: the recipe's distill.grad_checkpointing
    layer_groups: int | None = None  # every stage in this many groups of layers, one after another (less memory)
    mixed_precision: str = "auto"
    deterministic: bool = False
    dry_run: bool = False  # print the memory plan and stop before any weight is read
    memory_check: bool = True  # refuse a run the memory plan says will not fit
    copy_components: bool = False  # a pipeline out: copy the unconverted components (default: hard links)
    prompts: Path | None = None  # calibration from prompts through the pipeline's encoder and the teacher
    videos: Path | None = None  # calibration from videos + captions through the pipeline's VAE and encoder
    calib_size: tuple[int, int] | None = None  # (height, width) of the prompt samples / video clips
    calib_frames: int | None = None
    guidance_scale: float | None = None
    teacher_steps: int | None = None

    @classmethod
    def from_flags(cls, **flags) -> "ConvertFlags":
        """From a command's keyword flags, where ``None`` means "not given" (the field's default)."""
        return cls(**{k: v for k, v in flags.items() if v is not None})

    def given(self) -> list[str]:
        """The fields set to something other than their default."""
        return [f.name for f in dataclasses.fields(self)
                if f.default is not dataclasses.MISSING and getattr(self, f.name) != f.default]

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "ConvertFlags":
        paths = {f.name for f in dataclasses.fields(cls) if "Path" in str(f.type)}
        data = {k: (Path(v) if k in paths and v is not None else tuple(v) if isinstance(v, list) else v)
                for k, v in data.items()}
        return cls(**data)


@dataclass
class ConversionPlan:
    """Everything a conversion job needs, checked: the recipe, its backbone's registry entry, the
    flags merged with it, this process's device / dtype / process group, and the distillation plan."""

    flags: ConvertFlags
    recipe: Any  # m4v_convert.recipes.Recipe
    backbone: Any  # m4v_convert.backbones.registry.Backbone
    device: torch.device
    dtype: torch.dtype
    dist: Any  # m4v_convert.distill.distributed.DistContext
    distill: Any  # m4v_convert.distill.job.DistillPlan
    console: Any = field(default=None, repr=False)
    started: float = field(default_factory=time.time)  # for the run's wall time in conversion.json

    @property
    def layer_spec(self) -> str:
        """``--layers``, else the recipe's ``default_layers``; ``auto``: every layer is a candidate (the job
        chooses among them, jobs/layer_selection.py)."""
        return "all" if self.auto_layers else self.recipe.layers_or_default(self.flags.layers)

    @property
    def auto_layers(self) -> bool:
        return wants_auto_layers(self.flags)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise M4VError(f"--device: expected auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise M4VError("--device cuda: no CUDA device is available on this machine")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    """``--dtype``; ``auto`` is float32 weights (the passes run under bf16 autocast on CUDA)."""
    if name == "auto":
        return torch.float32
    if name not in DTYPES:
        raise M4VError(f"--dtype: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def console_or_default(console):
    if console is not None:
        return console
    import sys

    from rich.console import Console

    # in a log file (stderr not a terminal) rich would cut progress lines at 80 columns
    return Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def load_for(flags: ConvertFlags, command: str | None = None):
    """(recipe, registry entry) of ``flags``, with the flags and checks this backbone refuses applied
    (``command``: the backbone a backbone command converts, checked against the recipe's)."""
    from m4v_convert.backbones import registry
    from m4v_convert.distill.distributed import in_distributed_env
    from m4v_convert.recipes import load_recipe

    recipe = load_recipe(flags.recipe)  # validated before any weight is read
    entry = registry.for_recipe(recipe)
    if command is not None and command != entry.name:
        raise M4VError(f"recipe {recipe.name!r} is for backbone {recipe.backbone!r}; this command converts "
                       f"{registry.get(command).converts}")
    refused = [name for name in flags.given() if name in entry.flags_not_offered]
    if refused:
        raise M4VError(f"{', '.join('--' + n.replace('_', '-') for n in refused)}: not offered for {entry.name} "
                       "recipes")
    if flags.num_processes < 1:
        raise M4VError(f"--num-processes: expected >= 1, got {flags.num_processes}")
    if flags.fsdp and flags.num_processes < 2 and not in_distributed_env():
        raise M4VError("--fsdp shards the weights across processes: add --num-processes N (N >= 2), or start the "
                       "command with accelerate launch / torchrun")
    check_auto_layers(flags, in_distributed_env())
    if flags.report_frames is not None and flags.report_frames < 1:
        raise M4VError(f"--frames: expected >= 1, got {flags.report_frames}")
    entry.check_conversion_flags(flags, recipe)
    return recipe, entry


def wants_auto_layers(flags: ConvertFlags) -> bool:
    return (flags.layers or "").strip().lower() == "auto"


def check_auto_layers(flags: ConvertFlags, launched: bool) -> None:
    """``--layers auto`` goes with ``--flops-budget`` (and ``--probe-steps``), one process, and only with it."""
    if not wants_auto_layers(flags):
        for name, value in (("--flops-budget", flags.flops_budget), ("--probe-steps", flags.probe_steps)):
            if value is not None:
                raise M4VError(f"{name} goes with --layers auto (it chooses the layers to convert)")
        return
    if flags.flops_budget is None:
        raise M4VError("--layers auto needs --flops-budget F: the converted model's FLOPs as a fraction of the "
                       "original's, e.g. 0.4")
    if not 0 < flags.flops_budget < 1:
        raise M4VError(f"--flops-budget: expected a fraction between 0 and 1 (converted / original FLOPs), got "
                       f"{flags.flops_budget:g}")
    if flags.probe_steps is not None and flags.probe_steps < 1:
        raise M4VError(f"--probe-steps: expected >= 1, got {flags.probe_steps}")
    if flags.num_processes > 1 or flags.fsdp or launched:
        raise M4VError("--layers auto: not offered with several processes yet; choose the layers in one process "
                       "(its conversion.json lists them) and give them to --layers")


def plan_conversion(flags: ConvertFlags, recipe, entry, console=None) -> ConversionPlan:
    """The checked plan of one process's conversion (after :func:`load_for`)."""
    from m4v_convert.distill.job import make_plan
    from m4v_convert.io.output import check_output_dir, remove_stale_temporaries

    con = console_or_default(console)
    device, dtype = resolve_device(flags.device), resolve_dtype(flags.dtype)
    dist, device, con = join_process_group(device, con, flags.fsdp)
    check_output_dir(flags.out, flags.overwrite, conversion_inputs(flags, recipe))
    if dist.is_main:
        for leftover in remove_stale_temporaries(flags.out):
            con.print(f"note: removed {leftover}, the unfinished output of an earlier run that was killed")
    if flags.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    distill = make_plan(recipe, flags, device, default_stages=entry.default_stages)
    return ConversionPlan(flags=flags, recipe=recipe, backbone=entry, device=device, dtype=dtype, dist=dist,
                          distill=distill, console=con)


def conversion_inputs(flags: ConvertFlags, recipe) -> dict[str, Path | None]:
    """The folders and files a conversion reads (or keeps its run in), which ``--out`` must stay apart from."""
    return {"--checkpoint": flags.checkpoint, "--calib": flags.calib, "--data": flags.data,
            "--prompts": flags.prompts, "--videos": flags.videos,
            "--calib-cache": flags.calib_cache, "--run-dir": flags.run_dir, "--resume": flags.resume,
            "recipe": recipe.path}


def join_process_group(device: torch.device, con, fsdp: bool = False):
    """(dist context, this process's device, its console) inside a launched run (no-op outside one):
    each process takes its local GPU, and only rank 0 prints."""
    from m4v_convert.distill.distributed import init_distributed

    dist = init_distributed(device.type, fsdp)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_main:
        from rich.console import Console

        con = Console(stderr=True, quiet=True)
    return dist, device, con
