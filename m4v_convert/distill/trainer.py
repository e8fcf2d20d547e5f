"""The training loop every distillation stage runs on (torchtune-style: setup, loss step, train,
save_checkpoint, resume).

A stage is a :class:`StageTask`: it draws this process's batch for a step and computes the loss
on it. :class:`Trainer` owns the rest: AdamW + cosine schedule, bf16 autocast on GPU, gradient
averaging across processes, gradient clipping, the NaN/inf guard, checkpoints every N steps
(atomic, see ``state.py``), resume, the JSONL log and the progress display.

The distillation stages pass their parameters in ``units``, one per converted layer (its MM-DiM,
and what else of its transformer block the stage trains): each unit gets its own AdamW and its own
gradient-norm limit, and in a single process (or sharded, ``--fsdp``) steps as soon as its
gradients are complete, inside the backward pass, which then frees them: one layer's gradients exist
at a time instead of all of them (1.4 GB for Wan2.1-1.3B, 21 GB for 14B in float32). In stage 1, whose layers' losses are
independent, a layer then trains exactly as it would alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import torch

from m4v_convert.distill.distributed import DistContext
from m4v_convert.distill.sharding import (load_optimizer_shards, load_shards, release_freed_memory, save_shards,
                                          scalar)
from m4v_convert.distill.state import FORMAT, VERSION, RunDir
from m4v_convert.errors import M4VError


@dataclass
class StageSchedule:
    """One stage's optimization settings (recipe ``distill.stageN``; CLI flags override)."""

    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm (of each unit, where the stage gives units); 0 = none
    batch_size: int = 1  # per process
    checkpoint_every: int = 0  # steps between checkpoints; 0 = none inside the stage
    min_lr_ratio: float = 0.1  # cosine schedule ends at lr * min_lr_ratio

    def to_dict(self) -> dict:
        return asdict(self)


class StageTask(Protocol):
    """What a stage supplies to :meth:`Trainer.fit`."""

    name: str  # "stage1"
    title: str  # "stage 1 (attention transfer)"
    generator: torch.Generator | None  # the stage's batch generator (checkpointed with the run)

    def batch(self, step: int) -> Any:
        """This process's share of the global batch of ``step``."""

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss to minimize, named detached parts for the log)."""

    def count(self, batch: Any) -> tuple[int, int]:
        """(samples, video tokens) in this process's ``batch``."""


@dataclass
class StageOutcome:
    losses: list[float] = field(default_factory=list)  # global mean loss per step (this run's steps)
    parts: list[dict[str, float]] = field(default_factory=list)
    steps_run: int = 0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0


class _UnitStates:
    """Saves and restores a list of optimizers or schedulers as one checkpoint entry."""

    def __init__(self, items: list):
        self.items = items

    def state_dict(self) -> dict:
        return {"units": [x.state_dict() for x in self.items]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or len(state.get("units", ())) != len(self.items):
            raise M4VError("--resume: the checkpoint's optimizer state does not match this run's parameter units "
                           "(written by another version?); start the run again without --resume")
        for x, sd in zip(self.items, state["units"]):
            x.load_state_dict(sd)

    def step(self) -> None:
        for x in self.items:
            x.step()


class _UnitSteps:
    """One AdamW and one gradient-norm limit per unit of parameters. ``in_backward`` (one process, or
    sharded: FSDP2 hands each parameter its averaged shard of the gradient inside the backward): a
    unit steps as soon as the backward pass has accumulated all its gradients, and its gradients are
    freed then; otherwise (data parallel: gradients are averaged after the backward) every unit
    steps after it."""

    def __init__(self, units: list[list[torch.nn.Parameter]], schedule: StageSchedule, in_backward: bool):
        self.units = units
        self.params = [p for u in units for p in u]
        opts = [torch.optim.AdamW(u, lr=schedule.lr, weight_decay=schedule.weight_decay) for u in units]
        self.optimizer = _UnitStates(opts)
        self.scheduler = _UnitStates([torch.optim.lr_scheduler.CosineAnnealingLR(
            o, T_max=schedule.steps, eta_min=schedule.lr * schedule.min_lr_ratio) for o in opts])
        self.steps_in_backward = in_backward
        self.norms: list[float | None] = []
        self._arrived: list[int] = []
        self._limit = math.inf
        self._hooks = []
        if in_backward:
            for u, params in enumerate(units):
                for p in params:
                    self._hooks.append(p.register_post_accumulate_grad_hook(lambda _, u=u: self._accumulated(u)))

    @property
    def lr(self) -> float:
        return self.optimizer.items[0].param_groups[0]["lr"]

    def zero_grad(self) -> None:
        if self.steps_in_backward:  # the backward freed them
            return
        for p in self.params:  # zeroed in place, not freed: a fresh set every step fragments the CPU heap
            if p.grad is not None:
                p.grad.zero_()

    def fill_grads(self) -> list[torch.Tensor]:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def backward(self, loss: torch.Tensor, limit: float) -> float:
        """Backward with each unit's step inside it; the global gradient norm (before clipping)."""
        self._limit, self.norms, self._arrived = limit, [None] * len(self.units), [0] * len(self.units)
        loss.backward()
        for u, norm in enumerate(self.norms):  # units with a parameter the loss does not reach
            if norm is None:
                self._step_unit(u)
        self._arrived = []
        return math.sqrt(sum(n * n for n in self.norms))

    def _accumulated(self, u: int) -> None:
        if not self._arrived:  # a backward outside the training step
            return
        self._arrived[u] += 1
        if self._arrived[u] == len(self.units[u]):
            self._step_unit(u)

    def _step_unit(self, u: int) -> None:
        params = self.units[u]
        for p in params:  # a parameter the loss does not reach
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.norms[u] = scalar(torch.nn.utils.clip_grad_norm_(params, self._limit))
        if math.isfinite(self.norms[u]):  # a non-finite unit stops training after this backward
            self.optimizer.items[u].step()
        for p in params:
            p.grad = None

    def clip(self, limit: float) -> float:
        self.norms = [float(torch.nn.utils.clip_grad_norm_(u, limit)) for u in self.units]  # data parallel only
        return math.sqrt(sum(n * n for n in self.norms))

    def step(self) -> None:
        self.optimizer.step()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class Trainer:
    """Runs stages on ``model`` (the student). See the module docstring.

    run_dir: where checkpoints and the log go; None = no checkpoints (log kept in memory only).
    identity: what a resume must match (saved in every checkpoint).
    persist: names of the student parameters a checkpoint saves (everything any stage trains).
    """

    def __init__(self, model: torch.nn.Module, *, dist: DistContext | None = None, run_dir: RunDir | None = None,
                 console=None, device: torch.device | str = "cpu", bf16: bool = False, identity: dict | None = None,
                 persist: list[str] | None = None, show_progress: bool = True):
        self.model = model
        self.dist = dist or DistContext()
        self.run_dir = run_dir  # only rank 0 writes to it
        self.console = console
        self.device = torch.device(device)
        self.bf16 = bf16
        self.identity = identity or {}
        self.persist = list(persist) if persist is not None else [n for n, _ in model.named_parameters()]
        self.show_progress = show_progress
        self.completed: dict[str, dict] = {}  # results of finished stages
        self.log: list[dict] = []
        self.last_checkpoint: tuple[str, int] | None = None  # (stage, step) of the last good checkpoint

    # ------------------------------------------------------------------ log

    def log_record(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        self.log.append(record)
        if self.run_dir is not None and self.dist.is_main:
            self.run_dir.append_log([record])

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, stage: str, step: int, *, done: bool = False, optimizer=None, scheduler=None,
                        generator: torch.Generator | None = None, extra: dict | None = None) -> None:
        """Write the full training state (rank 0; other ranks hold identical weights)."""
        if self.run_dir is None:
            return
        shards = None
        if self.dist.fsdp:  # every process writes its part of the tensors; state.pt then names the folder
            if self.dist.is_main:
                self.run_dir.create()
                self.run_dir.remove_shards(unfinished_only=True)
            self.dist.barrier()
            save_shards(self.run_dir.shards_tmp, self.model, self.persist,
                        None if optimizer is None or done else optimizer.items)
            if self.dist.is_main:
                shards = self.run_dir.new_shards_name(stage, step)
                self.run_dir.shards_tmp.rename(self.run_dir.path / shards)
        if self.dist.is_main:
            named = dict(self.model.named_parameters())
            state = {
                "format": FORMAT, "version": VERSION, "identity": self.identity,
                "stage": stage, "step": step, "stage_done": done, "shards": shards,
                "weights": {} if shards else {n: named[n].detach().to("cpu", copy=True) for n in self.persist},
                "optimizer": None if optimizer is None or done or shards else optimizer.state_dict(),
                "scheduler": None if scheduler is None or done else scheduler.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "generator": None if generator is None else generator.get_state(),
                },
                "completed": self.completed,
                "extra": extra or {},
            }
            self.run_dir.save(state)
            if shards:
                self.run_dir.remove_shards(keep=shards)
        self.last_checkpoint = (stage, step)
        self.log_record({"event": "checkpoint", "stage": stage, "step": step, "stage_done": done})
        self.dist.barrier()  # nobody runs ahead of a checkpoint that could fail

    def load_weights(self, state: dict) -> None:
        if state.get("shards"):
            load_shards(self.run_dir.path / state["shards"], self.model, self.persist)
            return
        named = dict(self.model.named_parameters())
        missing = [n for n in state["weights"] if n not in named]
        if missing:
            raise M4VError(f"--resume: checkpoint has weights this student lacks ({missing[:3]}...)")
        with torch.no_grad():
            for n, t in state["weights"].items():
                named[n].copy_(t.to(named[n].device, named[n].dtype))

    def finish_stage(self, stage: str, result: dict) -> None:
        """Record a finished stage's results; with a run folder, checkpoint the boundary."""
        self.completed[stage] = result
        self.log_record({"event": "stage_end", "stage": stage, "step": int(result.get("steps", 0)),
                         **{k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "step"}})
        self.save_checkpoint(stage, int(result.get("steps", 0)), done=True)

    # ------------------------------------------------------------------ training

    def fit(self, task: StageTask, schedule: StageSchedule, params: dict[str, torch.nn.Parameter], *,
            resume: dict | None = None, extra: dict | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None,
            units: list[list[str]] | None = None) -> StageOutcome:
        """Train ``params`` for ``schedule.steps`` steps of ``task`` (continuing ``resume`` if given).

        extra: stage data saved with each checkpoint (e.g. errors measured before training).
        on_step: callable(step, parts) after every step.
        units: names of ``params`` in units with an AdamW and a gradient-norm limit each (see the
            module docstring); None: one unit of them all.
        """
        outcome = StageOutcome()
        plist = list(params.values())
        if schedule.steps <= 0 or not plist:
            return outcome
        stepper = _UnitSteps([[params[n] for n in u] for u in units or [list(params)]], schedule,
                             in_backward=not self.dist.enabled or self.dist.fsdp)
        start = 0
        if resume is not None:
            if resume.get("shards"):
                load_optimizer_shards(self.run_dir.path / resume["shards"], self.model, stepper.optimizer.items)
            else:
                stepper.optimizer.load_state_dict(resume["optimizer"])
            stepper.scheduler.load_state_dict(resume["scheduler"])
            rng = resume["rng"]
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            if task.generator is not None and rng["generator"] is not None:
                task.generator.set_state(rng["generator"])
            start = int(resume["step"])
            self.log_record({"event": "resume", "stage": task.name, "step": start})
        else:
            if not self.dist.fsdp:  # sharded: every process holds its own part of the same weights
                self.dist.broadcast_(plist)  # every process starts from rank 0's weights
            self.log_record({"event": "stage_start", "stage": task.name, "step": 0, "steps": schedule.steps,
                             "lr": schedule.lr, "batch_size": schedule.batch_size, "processes": self.dist.world})

        progress = self._progress(task, schedule, start)
        self.model.train()
        t0 = time.perf_counter()
        samples_seen = tokens_seen = 0
        clip = schedule.grad_clip if schedule.grad_clip > 0 else math.inf
        try:
            for step in range(start, schedule.steps):
                t_step = time.perf_counter()
                batch = task.batch(step)
                n_samples, n_tokens = task.count(batch)
                stepper.zero_grad()
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss, parts = task.loss(batch)
                stats = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())])
                if stepper.steps_in_backward:  # one process, or sharded: the step's loss is known before backward
                    if self.dist.fsdp:
                        self.dist.all_reduce_mean_([stats])
                    if not math.isfinite(float(stats[0])):
                        self._non_finite(task, step + 1, float(stats[0]), math.nan)
                    grad_norm = stepper.backward(loss, clip)
                else:
                    loss.backward()
                    grads = stepper.fill_grads()
                    stats = stats.to(grads[0].device)
                    self.dist.all_reduce_mean_([stats, *grads])  # same loss and gradients on every process
                    grad_norm = stepper.clip(clip)
                loss_value = float(stats[0])
                part_values = {k: float(v) for k, v in zip(parts, stats[1:])}
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    self._non_finite(task, step + 1, loss_value, grad_norm)
                if not stepper.steps_in_backward:
                    stepper.step()
                stepper.scheduler.step()
                if self.dist.fsdp and self.device.type == "cpu":
                    # the gathered blocks and their gradients are many block-sized buffers a step frees;
                    # glibc keeps them in its heap, which then grows step after step (measured on a 4-block
                    # Wan: 0.8 GB of 2 GB per process): hand them back before the next step
                    release_freed_memory()
                dt = time.perf_counter() - t_step
                samples_seen += n_samples * self.dist.world
                tokens_seen += n_tokens * self.dist.world
                outcome.losses.append(loss_value)
                outcome.parts.append(part_values)
                outcome.steps_run += 1
                self.log_record({"stage": task.name, "step": step + 1, "loss": loss_value, "parts": part_values,
                                 "lr": stepper.lr, "grad_norm": grad_norm,
                                 "samples_per_s": n_samples * self.dist.world / dt,
                                 "tokens_per_s": n_tokens * self.dist.world / dt})
                if progress is not None:
                    progress[0].update(progress[1], advance=1, info=f"loss {loss_value:.4g}  "
                                       f"{samples_seen / (time.perf_counter() - t0):.2f} samples/s")
                if on_step is not None:
                    on_step(step, part_values)
                every = schedule.checkpoint_every
                if every > 0 and (step + 1) % every == 0 and step + 1 < schedule.steps:
                    self.save_checkpoint(task.name, step + 1, optimizer=stepper.optimizer, scheduler=stepper.scheduler,
                                         generator=task.generator, extra=extra)
        finally:
            stepper.close()
            if progress is not None:
                progress[0].stop()
            self.model.eval()
            for p in plist:  # the next stage or layer group trains other parameters
                p.grad = None
        outcome.seconds = time.perf_counter() - t0
        if outcome.seconds > 0:
            outcome.samples_per_s = samples_seen / outcome.seconds
            outcome.tokens_per_s = tokens_seen / outcome.seconds
        self._check_ranks_agree(task.name, plist)
        return outcome

    def _non_finite(self, task: StageTask, step: int, loss: float, grad_norm: float):
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        self.log_record({"event": "non_finite", "stage": task.name, "step": step, "loss": str(loss),
                         "grad_norm": str(grad_norm)})
        if self.last_checkpoint is not None and self.run_dir is not None:
            stage, at = self.last_checkpoint
            keep = (f"the last good checkpoint ({stage}, step {at}) is kept in {self.run_dir.path}; continue "
                    f"from it with --resume {self.run_dir.path} after lowering the learning rate")
        else:
            keep = "no checkpoint had been written yet (--checkpoint-every N keeps one)"
        raise M4VError(f"{task.title}: {what} at step {step}; training stopped and nothing was written to --out; "
                       f"{keep}")

    def _check_ranks_agree(self, stage: str, plist: list[torch.nn.Parameter]) -> None:
        """Log a checksum of the trained weights from every process (they must be identical; sharded,
        each process holds other parts of them)."""
        if not self.dist.enabled or self.dist.fsdp:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).double() for p in plist])
            ramp = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device) % 97
            checksum = [float(flat.sum()), float((flat * ramp).sum()), float(flat.abs().max())]
        sums = self.dist.all_gather_object(checksum)
        self.log_record({"event": "rank_checksums", "stage": stage, "checksums": sums})
        if any(s != sums[0] for s in sums):
            raise M4VError(f"{stage}: the processes' weights diverged (checksums {sums}); this is a bug, please report")

    def _progress(self, task: StageTask, schedule: StageSchedule, start: int):
        if self.console is None or not self.show_progress or not self.dist.is_main:
            return None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        progress = Progress(TextColumn(task.title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                            console=self.console, transient=False)
        tid = progress.add_task(task.name, total=schedule.steps, completed=start, info="")
        progress.start()
        return progress, tid
