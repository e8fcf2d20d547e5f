"""The distillation schedule of one conversion: plan (recipe + flags) → calibration → stages 1-3.

:func:`make_plan` checks every distillation flag and the run folder before any weight is read;
:func:`run_distillation` then runs the planned stages on the :class:`~m4v_convert.distill.trainer.Trainer`
(one loop for all stages: checkpoints, resume, processes, guards, log) and returns a
:class:`DistillReport` for the output folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn

from m4v_convert.distill.calibration import (CalibSpec, CleanSample, check_uniform, folder_samples,
                                             synthetic_samples)
from m4v_convert.distill.distributed import DistContext
from m4v_convert.distill.params import (add_lora, check_train_mode, merge_lora_, own_parameters_, set_trainable,
                                        trainable_params)
from m4v_convert.distill.stage1 import Stage1Result, Stage1Settings
from m4v_convert.distill.state import RunDir, check_identity, fingerprint, log_until, samples_fingerprint
from m4v_convert.distill.trainer import StageOutcome, StageSchedule, Trainer
from m4v_convert.errors import M4VError

STAGES = (1, 2, 3)
_DEFAULT_STEPS = {1: 100, 2: 0, 3: 0}
_DEFAULT_LR = {1: 1e-3, 2: 1e-4, 3: 1e-5}


@dataclass
class DistillPlan:
    stages: list[int]
    schedules: dict[int, StageSchedule]
    train: str = "mmdim"
    feature_weight: float = 0.5
    output_weight: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 8.0
    teacher_steps: int = 4
    teacher_first_frame_steps: int | None = None  # PyramidFlow: the first latent frame's (None: teacher_steps)
    bf16: bool = False
    grad_checkpointing: bool = False
    layer_groups: int = 1  # every stage trains the converted layers in this many groups, one after another
    # stage 2: share of batches whose inputs are the student's own sampling states (see on_policy_batch),
    # and the Euler steps of that sampler
    on_policy: float = 0.0
    on_policy_steps: int = 20
    run_dir: RunDir | None = None
    resume_state: dict | None = field(default=None, repr=False)
    # where teacher-generated calibration is cached (teacher_calib_cache), fixed with the run folder so that
    # a --layers auto probe, which has no run folder, samples into the cache the run then reuses
    teacher_calib_dir: Path | None = None
    # --layers auto: the selection (jobs/layer_selection.py), part of the run's identity so that a resume
    # reuses it instead of probing again
    layer_selection: dict | None = None

    @property
    def uses_lora(self) -> bool:
        return self.train == "lora" and any(s in self.stages for s in (2, 3))


@dataclass
class DistillReport:
    stage1: Stage1Result
    results: dict[str, dict]  # per stage: steps, losses summary, throughput, errors
    calibration: str
    end_to_end_before: float | None
    end_to_end_after: float | None
    log: list[dict]
    plan: DistillPlan


class DistillAdapter(Protocol):
    """What :func:`run_distillation` needs of a backbone. Implemented by
    ``backbones/wan/distill.py``, ``backbones/pyramidflow/distill.py`` and
    ``backbones/generic/distill.py``; optional attributes: ``fine_tune_unsupported`` (a reason:
    stage 3 is skipped with it) and ``lora_targets`` (None: ``--train lora`` is refused)."""

    layers: list[int]

    def calibration_samples(self, recipe, opts, teacher, plan, dist, con, device, dtype) -> tuple[list, str]:
        """(clean samples, calibration label for the output)."""

    def data_samples(self, folder: Path) -> list:
        """The ``--data`` samples of stage 3."""

    def batch(self, samples: list, generator: torch.Generator, device, dtype, with_target: bool = False):
        """Forward kwargs of one noised batch (and, ``with_target``, the flow target)."""

    def shard(self, batch, rows: slice, device, dtype, with_target: bool = False):
        """Samples ``rows`` of ``batch`` (this process's share), on ``device``."""

    def record(self, teacher, batch: dict, layers: list[int] | None = None) -> dict:
        """Run the teacher once: per layer, the attention input, context and output (``LayerRecord``)."""

    def mmdim_blocks(self, student) -> dict:
        """Layer → module stage 1 trains (called as ``module(record.hidden_states, **record.context)``)."""

    def calibrate_output_norms(self, blocks: dict, records: dict) -> None:
        """Per-head output-scale calibration of ``blocks`` before stage 1."""

    def feature_modules(self, model) -> dict:
        """Layer → module whose output is stage 2's per-layer feature ({} for none)."""

    def predictor(self, model):
        """``model`` callable as ``m(**batch, return_dict=False)[0]`` → one prediction tensor."""

    def enable_gradient_checkpointing(self, student) -> None: ...

    def count(self, batch) -> tuple[int, int]:
        """(samples, video tokens) of a batch, for throughput."""

    def identity(self, config: dict) -> dict:
        """The model facts a ``--resume`` must match."""


def parse_stages(text: str) -> list[int]:
    try:
        stages = sorted({int(s) for s in str(text).replace(" ", "").split(",") if s})
    except ValueError:
        stages = []
    if not stages or any(s not in STAGES for s in stages):
        raise M4VError(f"--stages: expected a comma-separated subset of 1,2,3 (e.g. 1,2), got {text!r}")
    return stages


def _positive(flag: str, value, minimum=0, strict=False):
    if value is None:
        return None
    if not math.isfinite(value) or ((value <= minimum) if strict else (value < minimum)):
        raise M4VError(f"{flag}: expected {'>' if strict else '>='} {minimum}, got {value}")
    return value


def make_plan(recipe, opts, device: torch.device, default_stages: str = "1,2,3") -> DistillPlan:
    """Recipe schedule with the CLI overrides of ``opts`` (a ``ConvertFlags``); checks flags and
    the run folder (and reads a ``--resume`` checkpoint) before any weight is loaded.
    ``default_stages``: the backbone's, where neither ``--stages`` nor the recipe says."""
    d = recipe.distill
    stages = parse_stages(opts.stages if opts.stages is not None else str(d.get("stages", default_stages)))
    train = check_train_mode(opts.train or d.get("train", "mmdim"))
    _positive("--distill-steps", opts.distill_steps)
    _positive("--stage2-steps", opts.stage2_steps)
    _positive("--stage3-steps", opts.stage3_steps)
    _positive("--lr", opts.lr, strict=True)
    _positive("--batch-size", opts.batch_size, minimum=1)
    _positive("--checkpoint-every", opts.checkpoint_every)
    _positive("--feature-weight", opts.feature_weight)
    steps_flag = {1: opts.distill_steps, 2: opts.stage2_steps, 3: opts.stage3_steps}
    default_bs = int(recipe.calib.get("batch_size", 1))
    schedules = {}
    for k in STAGES:
        s = dict(d.get(f"stage{k}", {}))
        cls = Stage1Settings if k == 1 else StageSchedule
        schedules[k] = cls(
            steps=int(steps_flag[k] if steps_flag[k] is not None else s.get("steps", _DEFAULT_STEPS[k])),
            lr=float(opts.lr if opts.lr is not None else s.get("lr", _DEFAULT_LR[k])),
            weight_decay=float(s.get("weight_decay", 0.0)), grad_clip=float(s.get("grad_clip", 1.0)),
            batch_size=int(opts.batch_size if opts.batch_size is not None else s.get("batch_size", default_bs)),
            checkpoint_every=int(opts.checkpoint_every if opts.checkpoint_every is not None
                                 else s.get("checkpoint_every", 0)),
        )
        if schedules[k].batch_size < 1:
            raise M4VError(f"{recipe.path}: distill.stage{k}.batch_size must be >= 1")
    s2 = d.get("stage2", {})
    mp = opts.mixed_precision
    if mp not in ("auto", "bf16", "no"):
        raise M4VError(f"--mixed-precision: expected auto, bf16 or no, got {mp!r}")
    if train == "lora" and any(k in stages for k in (2, 3)):
        from m4v_convert.distill.params import _peft

        _peft()  # a missing peft fails here, before any weight is read
    c = recipe.calib
    bs_eval, n_eval = int(c.get("batch_size", 1)), int(c.get("eval_batches", 1))
    if opts.calib is None and int(c.get("num_samples", 16)) < bs_eval * (n_eval + 1):  # synthetic calibration
        raise M4VError(f"{recipe.path}: calib.num_samples {int(c.get('num_samples', 16))} leaves no training sample "
                       f"beside the {n_eval} held-out batch(es) of {bs_eval}; use at least {bs_eval * (n_eval + 1)}")
    if opts.data is not None and 3 not in stages:
        raise M4VError(f"--data is the fine-tune data of stage 3, which --stages {','.join(map(str, stages))} "
                       "leaves out")
    plan = DistillPlan(
        stages=stages, schedules=schedules, train=train,
        feature_weight=float(opts.feature_weight if opts.feature_weight is not None
                             else s2.get("feature_weight", 0.5)),
        output_weight=float(s2.get("output_weight", 1.0)),
        lora_rank=int(d.get("lora_rank", 8)), lora_alpha=float(d.get("lora_alpha", d.get("lora_rank", 8))),
        teacher_steps=int(getattr(opts, "teacher_steps", None) or recipe.calib.get("teacher_steps", 4)),
        teacher_first_frame_steps=(None if recipe.calib.get("teacher_first_frame_steps") is None
                                   else int(recipe.calib["teacher_first_frame_steps"])),
        bf16=(mp == "bf16") or (mp == "auto" and device.type == "cuda"),
        grad_checkpointing=bool(opts.grad_checkpointing if opts.grad_checkpointing is not None
                                else d.get("grad_checkpointing", False)),
        layer_groups=int(getattr(opts, "layer_groups", None) or d.get("layer_groups", 1)),
        on_policy=float(s2.get("on_policy", 0.0)), on_policy_steps=int(s2.get("on_policy_steps", 20)),
    )
    if plan.layer_groups < 1:
        raise M4VError(f"--layer-groups: expected >= 1, got {plan.layer_groups}")
    if getattr(opts, "fsdp", False) and plan.uses_lora:
        raise M4VError("--fsdp with --train lora: merging the adapters into sharded weights is not offered; use "
                       "--train mmdim or all")
    # run folder: --resume DIR, else --run-dir, else <out>.train when any stage checkpoints
    if opts.resume is not None:
        plan.run_dir = RunDir(opts.resume)
        plan.resume_state = plan.run_dir.load("--resume")
        saved_recipe = plan.resume_state["identity"].get("recipe")
        if saved_recipe != recipe.name:
            raise M4VError(f"--resume {plan.run_dir.path}: that run used recipe {saved_recipe!r}, this one "
                           f"{recipe.name!r}; resume it with the same recipe, or start a new run")
        check_resume_processes(plan.run_dir.path, plan.resume_state, opts)
    elif opts.run_dir is not None or any(schedules[k].checkpoint_every > 0 for k in stages):
        plan.run_dir = RunDir(opts.run_dir if opts.run_dir is not None
                              else Path(opts.out).expanduser().resolve().with_name(Path(opts.out).name + ".train"))
        if plan.run_dir.has_checkpoint():  # --overwrite replaces --out; it never throws a run's work away
            raise M4VError(f"run folder {plan.run_dir.path} holds the checkpoint of an earlier run"
                           f"{plan.run_dir.progress_text()}; continue it with --resume {plan.run_dir.path}, or delete "
                           "that folder to start over (--overwrite replaces --out only, never a run's checkpoint)")
    plan.teacher_calib_dir = teacher_calib_cache(opts, plan)
    return plan


def check_resume_processes(path: Path, state: dict, opts) -> None:
    """A run resumes with the processes it had, sharded (``--fsdp``) if it was: checked before
    anything is launched or loaded."""
    from m4v_convert.distill.distributed import sharding_requested

    sharded = bool(state.get("shards"))
    fsdp = sharding_requested(getattr(opts, "fsdp", False))
    saved = state["identity"].get("world_size")
    world = int(os.environ.get("WORLD_SIZE", 0)) or getattr(opts, "num_processes", 1)
    if sharded != fsdp or (saved is not None and saved != world):
        how = f"{'with' if sharded else 'without'} --fsdp and --num-processes {saved}"
        raise M4VError(f"--resume {path}: that run was {'' if sharded else 'not '}sharded (--fsdp) and had {saved} "
                       f"process(es), this one {'is' if fsdp else 'is not'} and has {world}; resume it {how} (a "
                       "checkpoint holds each process's part of the training state)")


# ---------------------------------------------------------------------------------------------- data


def _draw(pool: list, adapter, generator: torch.Generator, per_rank: int, dist: DistContext, device, dtype,
          with_target: bool = False):
    """This process's slice of one global batch; every process draws the same global batch (so the
    generator stays in step across processes and a checkpoint resumes it)."""
    idx = torch.randint(len(pool), (per_rank * dist.world,), generator=generator).tolist()
    out = adapter.batch([pool[i] for i in idx], generator, "cpu", torch.float32, with_target=with_target)
    rows = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    return adapter.shard(out, rows, device, dtype, with_target=with_target)


def on_policy_batch(batch: dict, student: nn.Module, adapter, plan: DistillPlan, generator: torch.Generator,
                    dist: DistContext) -> dict:
    """Stage 2's batch, or (with probability ``plan.on_policy``) the same text's state at a random step
    of the student's own sampling from fresh noise (``adapter.rollout``): stage 2 then also learns the
    teacher's velocity where the student's own errors have led it, which noised calibration latents
    never show (docs/fidelity-moving-teacher.md). Every process draws the same step and the global
    batch's noise, so they stay in step and a checkpoint resumes the stream."""
    if plan.on_policy <= 0:  # no draw: the stream, and the weights, of a run without it
        return batch
    if float(torch.rand((), generator=generator)) >= plan.on_policy:
        return batch
    k = int(torch.randint(plan.on_policy_steps, (), generator=generator))
    rows = batch["hidden_states"].shape[0]
    noise = torch.randn((rows * dist.world, *batch["hidden_states"].shape[1:]), generator=generator)
    noise = noise[dist.rank * rows:(dist.rank + 1) * rows].to(batch["hidden_states"].device)
    # the sampler runs in the precision of the stage's own forward (the trainer's bf16 autocast)
    with torch.autocast(noise.device.type, dtype=torch.bfloat16, enabled=plan.bf16):
        return adapter.rollout(student, batch, noise, k, plan.on_policy_steps)


def teacher_calib_cache(opts, plan: DistillPlan) -> Path:
    """Where teacher-generated calibration is cached: --calib-cache, else the run folder's ``teacher_calib/``
    (decided once, by ``make_plan``: ``plan.teacher_calib_dir``)."""
    if getattr(plan, "teacher_calib_dir", None) is not None:
        return plan.teacher_calib_dir
    if opts.calib_cache is not None:
        return Path(opts.calib_cache)
    run = (plan.run_dir.path if plan.run_dir is not None
           else Path(opts.out).expanduser().resolve().with_name(Path(opts.out).name + ".train"))
    return run / "teacher_calib"


def teacher_calib_key(teacher, opts, plan: DistillPlan, spec, text_source: str, texts_sha256: str) -> dict:
    """What a teacher-sample cache must have been made with to be reused (any other settings are refused)."""
    from m4v_convert.distill.teacher_samples import teacher_fingerprint

    return {"teacher": teacher_fingerprint(teacher, str(Path(opts.checkpoint).resolve())),
            "steps": plan.teacher_steps, **({} if plan.teacher_first_frame_steps is None else
                                            {"first_frame_steps": plan.teacher_first_frame_steps}),
            "seed": opts.seed, "spec": dataclasses.asdict(spec),
            "text_source": text_source, "texts_sha256": texts_sha256}


def calibration_samples(recipe, opts, spec: CalibSpec, teacher, plan: DistillPlan, dist: DistContext, con,
                        device, dtype, patch_size) -> tuple[list[CleanSample], str]:
    """(samples, label): --calib folder, teacher-generated (--teacher-calib / --calib-cache), or synthetic."""
    from m4v_convert.distill.teacher_samples import cached_teacher_samples, sample_with_teacher, texts_digest

    n = int(recipe.calib.get("num_samples", 16))
    if opts.teacher_calib or opts.calib_cache is not None:
        if opts.calib is not None:
            texts = [s.text for s in folder_samples(opts.calib, spec)]
            text_source = f"folder:{Path(opts.calib).resolve()}"
        else:
            texts = [s.text for s in synthetic_samples(spec, n, seed=opts.seed)]
            text_source = "synthetic"
        cache = teacher_calib_cache(opts, plan)
        key = teacher_calib_key(teacher, opts, plan, spec, text_source, texts_digest(texts))

        def make():
            con.print(f"calibration: sampling {len(texts)} clean latents with the teacher "
                      f"({plan.teacher_steps} flow-matching Euler steps each) ...")
            return sample_with_teacher(teacher, texts, spec, plan.teacher_steps, opts.seed,
                                       batch_size=int(recipe.calib.get("batch_size", 1)), device=device, dtype=dtype,
                                       progress=lambda done, total: con.print(f"  teacher samples {done}/{total}"))

        samples, reused = cached_teacher_samples(cache, key, spec, make, dist=dist)
        con.print(f"calibration: TEACHER-GENERATED latents ({'reused' if reused else 'cached in'} {cache}); text "
                  f"embeddings: {text_source}")
        label = f"teacher:{text_source}"
    elif opts.calib is not None:
        samples, label = folder_samples(opts.calib, spec), f"folder:{opts.calib}"
    else:
        samples, label = synthetic_samples(spec, n, seed=opts.seed), "synthetic"
        con.print("[yellow]calibration: SYNTHETIC batches (random latents and text embeddings); pass --calib DIR "
                  "with real latents (or --teacher-calib) for a useful conversion[/]")
    check_uniform(samples, "--calib" if label.startswith("folder") else "calibration", patch_size)
    return samples, label


# ---------------------------------------------------------------------------------------------- run


def run_distillation(teacher, student, adapter: DistillAdapter, recipe, opts, plan: DistillPlan, dist: DistContext, con, device,
                     dtype) -> DistillReport:
    """Run the planned stages on ``student`` in place (see the module docstring).

    ``adapter`` (:class:`DistillAdapter`) is what the job knows of the backbone: calibration /
    ``--data`` samples and how to batch, noise and shard them; the teacher's per-layer records and
    the stage-1 modules; feature modules, predictions, LoRA targets, gradient checkpointing, and
    sample/token counts.
    """
    from m4v_convert.distill import stage1 as stage1_mod
    from m4v_convert.distill.stage2 import Stage2Task, end_to_end_error
    from m4v_convert.distill.stage3 import Stage3Task

    layers = adapter.layers
    samples, calib_label = adapter.calibration_samples(recipe, opts, teacher, plan, dist, con, device, dtype)
    data = None
    if 3 in plan.stages and opts.data is not None and not getattr(adapter, "fine_tune_unsupported", None):
        data = adapter.data_samples(opts.data)
    bs_eval, n_eval = int(recipe.calib.get("batch_size", 1)), int(recipe.calib.get("eval_batches", 1))
    if len(samples) < bs_eval * (n_eval + 1):
        raise M4VError(f"calibration: {len(samples)} samples, need at least {bs_eval * (n_eval + 1)} "
                       f"(batch_size {bs_eval} × ({n_eval} eval + 1 train) batches)")
    train_pool = samples[n_eval * bs_eval:]
    for pool, what in ((train_pool, "calibration training samples"), (data, "--data samples")):
        if pool is not None and dist.world > len(pool):
            raise M4VError(f"{dist.world} processes but only {len(pool)} {what}: every process needs at least one "
                           "sample of its own; use fewer processes or more samples")

    # LoRA before anything is saved or loaded: its parameters are part of the training state
    if plan.uses_lora:
        if not getattr(adapter, "lora_targets", None):
            raise M4VError("--train lora: this backbone names no layers for LoRA adapters; use mmdim or all")
        adapted = add_lora(student, adapter.lora_targets, plan.lora_rank, plan.lora_alpha)
        con.print(f"LoRA rank {plan.lora_rank} on {len(adapted)} linear layers (the backbone's lora_targets)")
    from m4v_convert.distill.sharding import full_tensors, is_sharded

    blocks = adapter.mmdim_blocks(student)
    # read block by block into its shards (jobs/convert.py), the student already holds its copies
    presharded = any(is_sharded(p) for p in teacher.parameters())
    stage_params = {1: trainable_params(student, "mmdim", blocks)}
    for k in (2, 3):
        if k in plan.stages:  # --train all: the student's own copy of each weight it shares with the teacher
            trained = trainable_params(student, plan.train, blocks)
            if presharded and {id(p) for p in teacher.parameters()} & {id(p) for p in trained.values()}:
                raise M4VError("--fsdp: the sharded student shares a weight it trains with the teacher")  # a bug here
            own_parameters_(student, trained, teacher)
        stage_params[k] = trainable_params(student, plan.train, blocks)
    persist = list(dict.fromkeys(n for k in plan.stages for n in stage_params[k]))

    model_cfg = dict(teacher.config)
    identity = {
        "recipe": recipe.name, "layers": list(layers), "train": plan.train, "stages": plan.stages,
        "schedules": {f"stage{k}": plan.schedules[k].to_dict() for k in plan.stages}, "seed": opts.seed,
        "world_size": dist.world,
        # what the run trains on, by content: the same folder spelled two ways is the same data, and
        # another teacher or changed files at the same path are not
        "calibration": {"source": calib_label.split(":", 1)[0], "digest": samples_fingerprint(samples)},
        "data": None if data is None else samples_fingerprint(data),
        "model": adapter.identity(model_cfg), "dtype": str(dtype), "teacher": fingerprint(full_tensors(teacher)),
        "lora": [plan.lora_rank, plan.lora_alpha] if plan.uses_lora else None,
        "loss": {"feature_weight": plan.feature_weight, "output_weight": plan.output_weight,
                 **({"on_policy": [plan.on_policy, plan.on_policy_steps]} if plan.on_policy > 0 else {})},
        **({"layer_groups": plan.layer_groups} if plan.layer_groups > 1 else {}),
        **({"sharded": True} if dist.fsdp else {}),
        **({"layer_selection": plan.layer_selection} if plan.layer_selection is not None else {}),
    }
    state = plan.resume_state
    if state is not None:
        check_identity(state["identity"], identity, plan.run_dir.path)
    if dist.fsdp and not presharded:  # after all that reads whole weights (the identity, --train all's copies)
        from m4v_convert.distill.sharding import release_freed_memory, shard

        names = {k: list(ps) for k, ps in stage_params.items()}
        stage_params = None  # sharding replaces the parameters: nothing may keep the whole ones
        shard(teacher, student, blocks, dist, device, plan.bf16)
        release_freed_memory()
        named = dict(student.named_parameters())
        stage_params = {k: {n: named[n] for n in ns} for k, ns in names.items()}
        con.print(f"FSDP2: teacher and student sharded across {dist.world} processes, one group per block")
    trainer = Trainer(student, dist=dist, run_dir=plan.run_dir, console=con, device=device, bf16=plan.bf16,
                      identity=identity, persist=persist)
    if state is not None:
        trainer.load_weights(state)
        trainer.completed = dict(state["completed"])
        trainer.log = log_until(plan.run_dir.read_log(), state["stage"], int(state["step"]))
        if dist.is_main:
            plan.run_dir.rewrite_log(trainer.log)
        con.print(f"resuming {plan.run_dir.path}: {state['stage']} step {state['step']}"
                  f"{' (done)' if state['stage_done'] else ''}")
    elif plan.run_dir is not None and dist.is_main:
        plan.run_dir.create()
        plan.run_dir.clear()
    dist.barrier()

    gen_eval = torch.Generator().manual_seed(opts.seed)
    eval_batches = [adapter.batch(samples[i * bs_eval:(i + 1) * bs_eval], gen_eval, device, dtype)
                    for i in range(n_eval)]
    s_teacher, s_student = adapter.predictor(teacher), adapter.predictor(student)  # called as diffusers models

    def resume_for(stage: str):
        if state is not None and state["stage"] == stage and not state["stage_done"]:
            return state
        return None

    def generator(k: int, group: int = 0) -> torch.Generator:
        """Stage ``k``'s batch stream (of its layer group ``group``)."""
        return torch.Generator().manual_seed(opts.seed + 1000 * k + group)

    groups = layer_groups(list(blocks), plan.layer_groups)
    results: dict[str, dict] = {}
    stage1 = Stage1Result(error_before={}, error_after={})
    e2e_before = e2e_after = None

    # ---- stage 1: teacher-forced attention transfer
    if 1 in plan.stages:
        sched = plan.schedules[1]
        if "stage1" in trainer.completed:
            done = trainer.completed["stage1"]
            stage1 = Stage1Result({int(k): v for k, v in done["error_before"].items()},
                                  {int(k): v for k, v in done["error_after"].items()})
        else:
            stage1 = Stage1Result(error_before={}, error_after={})
            outcomes = []
            for g, group in enumerate(groups):
                # stage 1 is teacher-forced: each group needs only its own layers' records, gradients and
                # optimizer state, freed before the next group starts
                name = "stage1" if len(groups) == 1 else f"stage1.group{g + 1}"
                if name in trainer.completed:
                    done = trainer.completed[name]
                    stage1.error_before.update({int(k): v for k, v in done["error_before"].items()})
                    stage1.error_after.update({int(k): v for k, v in done["error_after"].items()})
                    continue
                ids = {id(p) for i in group for p in blocks[i].parameters()}
                params = {n: p for n, p in stage_params[1].items() if id(p) in ids}
                set_trainable(student, params)
                g1 = generator(1)  # every group sees the batches one group would: a layer trains as it would alone
                part = stage1_mod.run_stage1(
                    {i: blocks[i] for i in group}, lambda b, group=group: adapter.record(teacher, b, layers=group),
                    lambda step, g1=g1: _draw(train_pool, adapter, g1, sched.batch_size, dist, device, dtype),
                    eval_batches, sched, trainer=trainer, generator=g1, resume=resume_for(name),
                    grad_checkpointing=plan.grad_checkpointing, counter=adapter.count,
                    calibrate=adapter.calibrate_output_norms, name=name,
                    title=None if len(groups) == 1 else f"stage 1, layers {group[0]}-{group[-1]} "
                                                        f"(group {g + 1}/{len(groups)})")
                stage1.error_before.update(part.error_before)
                stage1.error_after.update(part.error_after)
                outcomes.append(part.outcome)
                stage1.outcome = combined_outcome(outcomes)
                stage1.losses += part.losses
                if len(groups) > 1:
                    trainer.finish_stage(name, {
                        "steps": sched.steps, "layers": group, **_throughput(part.outcome),
                        "error_before": {str(k): v for k, v in part.error_before.items()},
                        "error_after": {str(k): v for k, v in part.error_after.items()}})
            trainer.finish_stage("stage1", {
                "steps": sched.steps, **_throughput(stage1.outcome),
                **({"layer_groups": [list(g) for g in groups]} if len(groups) > 1 else {}),
                "error_before": {str(k): v for k, v in stage1.error_before.items()},
                "error_after": {str(k): v for k, v in stage1.error_after.items()}})
        results["stage1"] = trainer.completed["stage1"]

    # ---- stages 2 and 3 run the whole student
    if any(k in plan.stages for k in (2, 3)) and plan.grad_checkpointing:
        adapter.enable_gradient_checkpointing(student)

    def run_grouped(k: int, make_task) -> None:
        """Stage ``k`` (2 or 3) on its trainable parameters, one layer group after another: the
        stage's objective is unchanged, each group is trained for the stage's steps with the others
        held fixed (block-coordinate descent), so only one group's gradients and AdamW states exist
        at a time. One group: the plain stage."""
        stage, sched = f"stage{k}", plan.schedules[k]
        parts = param_groups(student, stage_params[k], blocks, groups)
        before, outcomes = None, []
        for g, params in enumerate(parts):
            name = stage if len(parts) == 1 else f"{stage}.group{g + 1}"
            if name in trainer.completed:
                before = trainer.completed[name]["end_to_end_before"]
                continue
            r = resume_for(name)
            if r is not None:
                before = float(r["extra"]["end_to_end_before"])
            elif before is None:
                before = end_to_end_error(s_student, s_teacher, eval_batches)
            set_trainable(student, params)
            task = make_task(generator(k, g))
            if len(parts) > 1:
                task.name = name
                task.title = f"{task.title}, layers {groups[g][0]}-{groups[g][-1]} (group {g + 1}/{len(parts)})"
            # each converted layer's part is its own unit (own AdamW and gradient-norm limit, stepped inside
            # the backward as soon as its gradients are complete): one layer's gradients exist at a time
            units = [list(u) for u in param_groups(student, params, blocks, [[i] for i in groups[g]]) if u]
            outcomes.append(trainer.fit(task, sched, params, resume=r, extra={"end_to_end_before": before},
                                        units=units))
            if len(parts) > 1:
                trainer.finish_stage(name, {"steps": sched.steps, "layers": groups[g],
                                            **_throughput(outcomes[-1]), "end_to_end_before": before})
        trainer.finish_stage(stage, {"steps": sched.steps, **_throughput(combined_outcome(outcomes)),
                                     **({"layer_groups": [list(g) for g in groups]} if len(parts) > 1 else {}),
                                     "end_to_end_before": before,
                                     "end_to_end_after": end_to_end_error(s_student, s_teacher, eval_batches)})

    if 2 in plan.stages:
        sched2 = plan.schedules[2]
        if "stage2" not in trainer.completed:
            run_grouped(2, lambda gen: Stage2Task(
                s_teacher, s_student, adapter.feature_modules,
                lambda step: on_policy_batch(_draw(train_pool, adapter, gen, sched2.batch_size, dist, device, dtype),
                                             student, adapter, plan, gen, dist),
                generator=gen, feature_weight=plan.feature_weight, output_weight=plan.output_weight,
                counter=adapter.count))
        results["stage2"] = trainer.completed["stage2"]
        e2e_before = results["stage2"]["end_to_end_before"]
    if 3 in plan.stages:
        sched3 = plan.schedules[3]
        unsupported = getattr(adapter, "fine_tune_unsupported", None)
        if "stage3" not in trainer.completed:
            if unsupported:
                con.print(f"stage 3 (flow-matching fine-tune) skipped: {unsupported}")
                trainer.log_record({"event": "stage_skipped", "stage": "stage3", "reason": unsupported})
                trainer.finish_stage("stage3", {"steps": 0, "skipped": unsupported})
            elif data is None:
                con.print("stage 3 (flow-matching fine-tune) skipped: no --data folder given")
                trainer.log_record({"event": "stage_skipped", "stage": "stage3", "reason": "no --data"})
                trainer.finish_stage("stage3", {"steps": 0, "skipped": "no --data"})
            else:
                run_grouped(3, lambda gen: Stage3Task(
                    s_student, lambda step: _draw(data, adapter, gen, sched3.batch_size, dist, device, dtype,
                                                  with_target=True),
                    generator=gen, counter=adapter.count))
        results["stage3"] = trainer.completed["stage3"]
        if e2e_before is None and "end_to_end_before" in results["stage3"]:
            e2e_before = results["stage3"]["end_to_end_before"]
    for k in ("stage3", "stage2"):
        if k in results and "end_to_end_after" in results[k]:
            e2e_after = results[k]["end_to_end_after"]
            break
    student.requires_grad_(False)
    if plan.uses_lora:
        merged = merge_lora_(student)
        con.print(f"merged {merged} LoRA adapters into their layers")
    if plan.run_dir is not None:
        con.print(f"training state kept in {plan.run_dir.path} (delete it once the output is good)")
    return DistillReport(stage1=stage1, results=results, calibration=calib_label, end_to_end_before=e2e_before,
                         end_to_end_after=e2e_after, log=trainer.log, plan=plan)


def layer_groups(layers: list[int], k: int) -> list[list[int]]:
    """``layers`` in ``k`` contiguous groups of (nearly) equal size, the first ones one larger."""
    if k > len(layers):
        raise M4VError(f"--layer-groups {k}: more groups than the {len(layers)} converted layers")
    size, extra = divmod(len(layers), k)
    out, start = [], 0
    for g in range(k):
        n = size + (1 if g < extra else 0)
        out.append(layers[start:start + n])
        start += n
    return out


def param_groups(model: nn.Module, params: dict[str, nn.Parameter], blocks: dict[int, nn.Module],
                 groups: list[list[int]]) -> list[dict[str, nn.Parameter]]:
    """``params`` cut into ``len(groups)`` parts in the model's order, each part starting with the
    transformer block of its layer group's first converted layer: a part holds its layers' MM-DiMs
    and (``--train all``, ``lora``) the other trainable weights of its blocks; the first part also
    takes what precedes the blocks (embeddings), the last what follows them (output head)."""
    position = {id(p): i for i, p in enumerate(model.parameters())}
    starts = [min(position[id(p)] for p in _enclosing_block(model, blocks[group[0]]).parameters())
              for group in groups[1:]]
    parts: list[dict[str, nn.Parameter]] = [{} for _ in groups]
    for name, p in params.items():
        parts[sum(position[id(p)] >= s for s in starts)][name] = p
    return parts


def _enclosing_block(model: nn.Module, module: nn.Module) -> nn.Module:
    """The outermost ``nn.ModuleList`` element (a transformer block) holding ``module`` (or, for a
    wrapper outside the model such as PyramidFlow's stage-1 target, its first parameter); itself if none."""
    name = next((n for n, m in model.named_modules() if m is module), None)
    if name is None:
        first = next(module.parameters())
        name = next(n for n, p in model.named_parameters() if p is first).rpartition(".")[0]
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit() and isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
            return model.get_submodule(".".join(parts[:i + 1]))
    return module


def combined_outcome(outcomes: list) -> StageOutcome:
    """One stage's outcome from its layer groups' (steps, losses and throughput over all of them)."""
    out = StageOutcome()
    for o in outcomes:
        out.losses += o.losses
        out.parts += o.parts
        out.steps_run += o.steps_run
        out.seconds += o.seconds
    if out.seconds > 0:
        out.samples_per_s = sum(o.samples_per_s * o.seconds for o in outcomes) / out.seconds
        out.tokens_per_s = sum(o.tokens_per_s * o.seconds for o in outcomes) / out.seconds
    return out


def _throughput(outcome) -> dict:
    if outcome is None or not outcome.steps_run:
        return {}
    return {"final_loss": outcome.losses[-1], "samples_per_s": round(outcome.samples_per_s, 3),
            "tokens_per_s": round(outcome.tokens_per_s, 1), "seconds": round(outcome.seconds, 2)}


def plot_losses(log: list[dict], path: Path) -> None:
    """``loss.png``: every stage's loss curve (log scale), one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, tuple[list[int], list[float]]] = {}
    for r in log:
        if "loss" in r and "event" not in r and isinstance(r.get("loss"), (int, float)):
            xs, ys = curves.setdefault(r["stage"], ([], []))
            xs.append(r["step"])
            ys.append(r["loss"])
    n = max(len(curves), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4), squeeze=False)
    for ax, (stage, (xs, ys)) in zip(axes[0], sorted(curves.items())):
        ax.plot(xs, ys, lw=1.2)
        if all(y > 0 for y in ys):
            ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    if not curves:
        axes[0][0].text(0.5, 0.5, "no training steps", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
