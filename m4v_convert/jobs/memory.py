"""The memory plan of a conversion: the peak each process will need, estimated before any weight is read.

The teacher is built from the checkpoint's config on the ``meta`` device (shapes, no memory), the
student is converted from it there, and one training step of each stage (its own loss function,
forward and backward, on a batch of the run's size) runs on meta under :class:`_LiveBytes`, which
follows every tensor storage the step creates until it is freed: the step's peak is that of the
code that will run (the teacher pass recording stage 1's inputs, activations, temporaries, what
gradient checkpointing recomputes, the activations' gradients), not a hand formula. Added to that:
both models' weights (the student's own: it shares the rest with the teacher), each stage's
AdamW states and gradients (of the largest layer group; in one process every stage holds one
layer's gradients at a time), the held-out batches (and, before and after stage 1's training, their records),
the calibration samples, the load (a mapped weight file beside its copy), and the pipeline
components ``--prompts`` / ``--videos`` sampling loads.

On CPU the plan adds what glibc's allocator keeps of a step's freed memory (see
``CPU_HEAP_RESERVE``). Not counted: buffers an operation allocates inside its kernel, the CUDA
caching allocator's fragmentation; bf16 autocast is counted in float32 (an upper bound).
``tests/test_memory_plan.py`` checks the estimate against measured peaks. Attention is counted as
the fused kernel a GPU (or the CPU) runs, not the meta device's math path (see ``fused_attention_on_meta``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from m4v_convert.errors import M4VError

GB = 1e9

# glibc's malloc keeps freed memory of a training step in its heap (returning it to the system costs
# page faults: a run with a fixed mmap threshold measured 2.2x slower), so on CPU the resident peak
# exceeds the step's live tensors. With gradient checkpointing the live tensors shrink but the heap
# does not as much: each block's freed temporaries land in fresh heap (the dynamic mmap threshold
# moves them off mmap). Measured (2026-12-06, tests/test_memory_plan.py's model, stages 1 and 2, with
# and without checkpointing): resident minus live peak = 0.36-0.72x the activations a step keeps for
# backward with checkpointing off; the reserve is that many bytes times this factor.
CPU_HEAP_RESERVE = 0.55
ALLOCATOR_RESERVE = "allocator reserve (freed activations malloc keeps)"
STEP = "one training step at its peak (activations, temporaries, gradients)"
SAVED = "activations kept for backward"


@dataclass
class MemoryPhase:
    """One phase of the run and what it holds on top of the weights (bytes)."""

    name: str
    parts: dict[str, int]
    batch: int = 0  # samples per process (0: no batch)
    per_sample: int = 0  # the part of ``parts`` that grows with the batch

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class MemoryPlan:
    device: str  # "cpu" or "cuda:0"
    processes: int  # processes sharing ``available`` (CPU: all of them; CUDA: one per device)
    weights: dict[str, int]
    phases: list[MemoryPhase]
    available: int | None  # bytes free for this run (None: unknown)
    notes: list[str] = field(default_factory=list)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def peak_phase(self) -> MemoryPhase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak(self) -> int:
        """Estimated peak bytes of one process."""
        return self.weights_total + self.peak_phase.total

    @property
    def needed(self) -> int:
        """Bytes the run needs from ``available``."""
        return self.peak * self.processes

    @property
    def fits(self) -> bool:
        return self.available is None or self.needed <= self.available

    def largest_batch_that_fits(self) -> int | None:
        """The largest per-process batch whose peak fits ``available`` (activations scale with the
        batch; weights and optimizer states do not); None: none fits, or unknown."""
        if self.available is None:
            return None
        best = None
        for b in range(1, 1 << 20):
            peak = self.weights_total + max(p.total + (b - p.batch) * p.per_sample if p.batch else p.total
                                            for p in self.phases)
            if peak * self.processes > self.available:
                break
            best = b
        return best

    def line(self) -> str:
        where = f"{self.processes} processes" if self.processes > 1 else "this run"
        avail = "unknown" if self.available is None else f"{self.available / GB:.1f} GB"
        return (f"memory plan: ~{self.peak / GB:.1f} GB peak per process on {self.device} (weights "
                f"{self.weights_total / GB:.1f} GB, {self.peak_phase.name} {self.peak_phase.total / GB:.1f} GB); "
                f"{where} needs {self.needed / GB:.1f} GB, {avail} available")

    def table_lines(self) -> list[str]:
        rows = [f"memory plan on {self.device} (estimate, per process; GB)"]
        rows += [f"  weights: {k:<40} {v / GB:9.3f}" for k, v in self.weights.items()]
        for p in self.phases:
            batch = f" (batch {p.batch})" if p.batch else ""
            rows.append(f"  {p.name}{batch}: {p.total / GB:.3f}")
            rows += [f"    {k:<45} {v / GB:9.3f}" for k, v in p.parts.items()]
        rows.append(f"  peak: {self.peak / GB:.3f} per process ({self.peak_phase.name}) × {self.processes} = "
                    f"{self.needed / GB:.3f}; available: "
                    + ("unknown" if self.available is None else f"{self.available / GB:.3f}"))
        rows += [f"  note: {n}" for n in self.notes]
        return rows

    def refusal(self, flags, distill) -> str:
        fits = []
        b = self.largest_batch_that_fits()
        phase = self.peak_phase
        if b is not None and phase.batch and b < phase.batch:
            fits.append(f"--batch-size {b}")
        if not distill.grad_checkpointing:
            fits.append("--grad-checkpointing")
        if phase.name.startswith(("stage 1", "stage 2", "stage 3")):
            fits.append(f"--layer-groups K > {distill.layer_groups} (one group of layers trained at a time)")
        if flags.dtype in ("auto", "float32", "fp32") and self.device.startswith("cuda"):
            fits.append("--dtype bfloat16")
        if self.processes > 1 and not self.device.startswith("cuda") and not getattr(flags, "fsdp", False):
            fits.append("fewer --num-processes (each holds both models)")
        if not getattr(flags, "fsdp", False):
            fits.append("--fsdp with --num-processes N (weights and training state sharded across N processes)")
        fits.append("fewer --layers")
        return (f"memory plan: this run needs about {self.needed / GB:.1f} GB ({self.peak / GB:.1f} GB per process at "
                f"its peak, {phase.name}: weights {self.weights_total / GB:.1f} GB + {phase.total / GB:.1f} GB) but "
                f"{self.available / GB:.1f} GB is available on {self.device}; try {', '.join(fits)} (--dry-run "
                "prints the plan; --no-memory-check runs anyway)")

    def to_dict(self) -> dict:
        return {"device": self.device, "processes": self.processes, "weights": self.weights,
                "phases": [dataclasses.asdict(p) for p in self.phases], "peak": self.peak, "needed": self.needed,
                "available": self.available, "notes": self.notes}


# ------------------------------------------------------------------------------------------ counting


def tensor_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from ``obj`` (tensors, lists, tuples, dicts, dataclasses),
    each storage once: a view counts as its base, an id in ``seen`` not at all."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        base = obj._base if obj._base is not None else obj
        if id(base) in seen or id(obj) in seen:
            return 0
        seen.add(id(base))
        return base.numel() * base.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o, seen) for o in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return 0


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes autograd keeps for backward while ``fn()`` runs (each storage once, ``exclude`` ids not)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.enable_grad(), saved_tensors_hooks(pack, lambda t: t):
        fn()
    return tensor_bytes(saved, set(exclude))


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors operations create while they are alive, and the peak.

    An output that aliases an input (a view, an in-place or ``out=`` result) is no new memory; every
    other is counted until its storage is freed, which on the meta device happens exactly when it
    would on a real one (autograd keeping a tensor for backward keeps it alive here too)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if len(returns) == 1 and len(outs) != 1:  # one Tensor[] return
            returns = returns * len(outs)
        for ret, t in zip(returns, outs):
            if isinstance(t, torch.Tensor) and ret.alias_info is None:
                storage = t.untyped_storage()  # its life, not the tensor's: a saved output lives on in a copy
                n = storage.nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n


@contextlib.contextmanager
def fused_attention_on_meta():
    """On meta tensors, ``scaled_dot_product_attention`` as a fused kernel (flash / memory-efficient:
    what runs on a GPU, and on CPU): the meta device has none and takes the math path, which holds
    the L x L attention matrix (171 GB per layer at Wan2.1-1.3B 480p x 81 frames); the fused kernel
    keeps its output and the row log-sum-exp. Replaces the function for the plan's duration (a
    function mode would not reach the recomputation gradient checkpointing runs in backward)."""
    sdpa = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or kwargs.get("enable_gqa", False):
            return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def step_peak_bytes(loss_fn, params) -> int:
    """Peak bytes of the tensors alive during one training step, forward and backward: activations,
    transient results, what backward recomputes (gradient checkpointing) and the activations'
    gradients. ``loss_fn() -> (loss, parts)``; the gradients of ``params`` are counted with the
    optimizer state, so each is dropped as soon as it has accumulated."""
    def drop(p):
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(drop) for p in params if p.requires_grad]
    mode = _LiveBytes()
    try:
        with torch.enable_grad(), mode:
            loss = loss_fn()[0]
            loss.backward()
            del loss
    finally:
        for h in handles:
            h.remove()
    return mode.peak


def _ids(*modules) -> set[int]:
    return {id(t) for m in modules for t in [*m.parameters(), *m.buffers()]}


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def available_bytes(device: torch.device) -> int | None:
    """Free memory for this run: the CUDA device's free bytes, or the machine's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------ the plan


def plan_memory(plan, steps, world: int) -> MemoryPlan | None:
    """:func:`estimate_memory`, where a mask selecting rows (data-dependent: unknown on meta) is taken
    to select every row, an upper bound."""
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(meta_nonzero_assume_all_nonzero=True), fused_attention_on_meta():
        return estimate_memory(plan, steps, world)


def estimate_memory(plan, steps, world: int) -> MemoryPlan | None:
    """The memory plan of ``plan`` (a :class:`~m4v_convert.jobs.plan.ConversionPlan`) whose backbone
    side is ``steps`` (checked: ``check_before_loading`` ran); None where the backbone cannot build
    its teacher on meta. ``world``: the processes of the run."""
    from rich.console import Console

    from m4v_convert.distill.job import layer_groups, param_groups
    from m4v_convert.distill.params import set_trainable, trainable_params
    from m4v_convert.distill.stage1 import Stage1Task
    from m4v_convert.distill.stage2 import Stage2Task
    from m4v_convert.distill.stage3 import Stage3Task

    meta_teacher = getattr(steps, "meta_teacher", None)
    if meta_teacher is None:
        return None
    d, flags, device = plan.distill, plan.flags, plan.device
    # torch.nn.Module.to: diffusers' own .to warns about its float32 modules, of no weight here
    teacher = torch.nn.Module.to(meta_teacher(), plan.dtype)
    teacher.requires_grad_(False)
    layers = steps.select_layers(teacher)
    try:
        student = steps.make_student(teacher, layers)
    except ValueError as e:
        raise M4VError(f"checkpoint and recipe {plan.recipe.name!r} disagree: {e}") from None
    student.requires_grad_(False)
    weights = {"teacher": tensor_bytes([*teacher.parameters(), *teacher.buffers()])}
    # the student shares every untouched tensor with the teacher (from_teacher): its own are the MM-DiM layers
    weights["student (its converted layers)"] = tensor_bytes([*student.parameters(), *student.buffers()],
                                                             _ids(teacher))
    processes = world if device.type != "cuda" else 1
    # --fsdp: every process holds 1/world of each weight and training state (distill/sharding.py)
    shards = world if getattr(flags, "fsdp", False) and world > 1 else 1

    def per_shard(n: int) -> int:  # one process's part, rounded up
        return -(-n // shards)

    whole_teacher = weights["teacher"]
    if shards > 1:
        weights = {f"{k}, 1/{shards} shard": per_shard(v) for k, v in weights.items()}
    mp = MemoryPlan(device=str(device), processes=processes, weights=weights, phases=[],
                    available=available_bytes(device))
    # loading: the checkpoint read (mapped, or a state dict) beside the model's own copy; a backbone that
    # copies one weight file at a time says how much of it is read at once
    read_at_once = getattr(steps, "load_read_bytes", None)
    read = whole_teacher if read_at_once is None else min(read_at_once(), whole_teacher)
    loading = {"the checkpoint while it is copied in": read} if device.type == "cpu" else {}
    from m4v_convert.jobs.convert import loads_block_by_block

    if shards > 1 and loads_block_by_block(steps, True):  # read block by block, each sharded before the next
        from m4v_convert.distill.sharding import block_lists

        pairs = [(t, s) for n in block_lists(teacher, student) for t, s in zip(getattr(teacher, n), getattr(student, n))]
        in_blocks = _ids(*(t for t, _ in pairs))
        block = max(tensor_bytes([*t.parameters()]) + tensor_bytes([*s.parameters()], _ids(t)) for t, s in pairs)
        loading = {"one block whole (read and converted), before it is sharded": block,
                   "what precedes and follows the blocks, whole until sharded": tensor_bytes(
                       [p for p in teacher.parameters() if id(p) not in in_blocks])}
        if device.type == "cpu":
            loading["its part of the checkpoint while it is copied in"] = max(tensor_bytes([*t.parameters()])
                                                                            for t, _ in pairs)
    elif shards > 1:  # each process loads the whole teacher, then keeps its shard
        loading["the whole teacher, before it is sharded"] = whole_teacher - per_shard(whole_teacher)
    mp.phases.append(MemoryPhase("loading", loading))
    adapter = steps.distill_adapter(teacher, student, layers)
    if adapter is None:
        return mp

    # calibration shapes as the run will see them (a --calib folder is read; teacher-generated
    # samples have the synthetic ones' shapes); the samples stay in host memory
    quiet = Console(quiet=True)
    opts = dataclasses.replace(flags, teacher_calib=False, calib_cache=None)
    samples, _ = adapter.calibration_samples(plan.recipe, opts, teacher, d, plan.dist, quiet, device, plan.dtype)
    host = tensor_bytes(samples)
    if device.type == "cpu":
        mp.weights["calibration samples"] = host
    sampling = pipeline_sampling_phase(plan, adapter, len(samples))
    if sampling is not None:
        mp.phases.append(sampling)
        mp.notes.append("calibration sampling: the teacher's transient activations while it samples are not "
                        "counted")
    bs_eval, n_eval = int(plan.recipe.calib.get("batch_size", 1)), int(plan.recipe.calib.get("eval_batches", 1))
    meta = torch.device("meta")

    def batch(n: int, with_target: bool = False):
        pool = [samples[i % len(samples)] for i in range(n)]
        return adapter.batch(pool, torch.Generator().manual_seed(0), meta, plan.dtype, with_target=with_target)

    eval_batches = [batch(bs_eval) for _ in range(n_eval)]
    eval_inputs = tensor_bytes(eval_batches)
    blocks = adapter.mmdim_blocks(student)
    groups = layer_groups(list(blocks), d.layer_groups)
    group, stage1_blocks = None, blocks
    if len(groups) > 1:  # every stage holds one group's training state at a time: plan the largest
        group = max(groups, key=len)
        stage1_blocks = {i: blocks[i] for i in group}
    params = {1: trainable_params(student, "mmdim", stage1_blocks)}
    measured = dict(params)  # what is trainable while activations are measured
    teacher_ids = _ids(teacher)
    every = trainable_params(student, d.train, blocks)  # stages 2 and 3 train the same set
    parts = param_groups(student, every, blocks, groups)
    largest = max(range(len(parts)), key=lambda g: _param_bytes(parts[g].values()))
    for k in (2, 3):
        # the first group's backward reaches deepest (most activations); the largest holds the most state
        params[k], measured[k] = parts[largest], parts[0]
    # every stage steps one converted layer's part at a time (trainer.py's units): its gradients at most
    stage1_ids = {id(p) for p in params[1].values()}
    unit_bytes = {1: max(_param_bytes(p for p in b.parameters() if id(p) in stage1_ids) for b in stage1_blocks.values())}
    unit_bytes[2] = unit_bytes[3] = max(
        _param_bytes(u.values()) for u in param_groups(student, parts[largest], blocks,
                                                       [[i] for i in groups[largest]]))
    copied = {} if not any(k in d.stages and d.schedules[k].steps > 0 for k in (2, 3)) else \
        {id(p): p for p in every.values() if id(p) in teacher_ids}
    if copied:  # --train all: the student trains its own copy of each weight it shared with the teacher
        mp.weights["student's copies of the weights it trains" + (f", 1/{shards} shard" if shards > 1 else "")] = \
            per_shard(_param_bytes(copied.values()))
    model_ids = _ids(teacher, student)
    if shards > 1:
        from m4v_convert.distill.sharding import block_lists

        block_bytes = max(tensor_bytes([*t.parameters(), *s.parameters()]) for n in block_lists(teacher, student)
                          for t, s in zip(getattr(teacher, n), getattr(student, n)))
    transient = 1 + (1 if device.type == "cuda" else 0)  # the gradients (+ AdamW's foreach temporaries)

    def training_state(k: int) -> tuple[str, int]:
        moments = 2 * _param_bytes(params[k].values())
        if shards > 1:  # sharded AdamW states; each layer steps inside the backward once its gradient shards
            # are reduce-scattered (trainer.py), so one layer's whole gradients and then its shard exist at a time
            return (f"AdamW states, 1/{shards} shard ({_count(params[k])} trainable) + one layer's gradients (whole, "
                    "then its shard)", per_shard(moments) + unit_bytes[k] + transient * per_shard(unit_bytes[k]))
        if world == 1:  # one process: each layer steps inside the backward and frees its gradients
            return (f"AdamW states + one layer's gradients ({_count(params[k])} trainable)",
                    moments + transient * unit_bytes[k])
        return f"gradients + AdamW states ({_count(params[k])} trainable)", moments + transient * (moments // 2)

    def per_sample_phase(name: str, k: int, measure) -> MemoryPhase:
        # measured at 1 and 2 samples on meta and extended linearly: a huge --batch-size is never
        # built, not even its inputs
        b = d.schedules[k].batch_size
        one, two = measure(1), measure(2)
        for m in (one, two):  # the activations kept for backward size the CPU reserve; the step counts them
            saved = m.pop(SAVED)
            if device.type == "cpu":
                m[ALLOCATOR_RESERVE] = int(CPU_HEAP_RESERVE * saved)
        parts = {n: one[n] + (b - 1) * (two[n] - one[n]) for n in one}
        per = sum(two.values()) - sum(one.values())
        label, state = training_state(k)
        parts = {label: state, "held-out batches": eval_inputs, **parts}
        if shards > 1:  # FSDP2 gathers a block's weights to run it (and the next one's, prefetched)
            parts["two blocks' gathered weights"] = 2 * block_bytes
        return MemoryPhase(name, parts, batch=b, per_sample=per)

    runs = {k: k in d.stages and d.schedules[k].steps > 0 for k in (1, 2, 3)}
    if runs[1]:
        with torch.no_grad():
            eval_records = [adapter.record(teacher, b, layers=group) for b in eval_batches]
        held = tensor_bytes(eval_records)

        def stage1(b: int) -> dict[str, int]:
            train = batch(b)
            with torch.no_grad():
                recs = adapter.record(teacher, train, layers=group)
            set_trainable(student, params[1])
            plain = Stage1Task(stage1_blocks, lambda _: recs, None)  # the CPU reserve: see CPU_HEAP_RESERVE
            acts = saved_bytes(lambda: plain.loss(train), model_ids | _tensor_ids(recs))
            del recs
            # the step as it runs: the teacher pass that records the batch, then the blocks' loss and backward
            task = Stage1Task(stage1_blocks, lambda bt: _no_grad(adapter.record, teacher, bt, layers=group), None,
                              grad_checkpointing=d.grad_checkpointing)
            return {STEP: step_peak_bytes(lambda: task.loss(train), params[1].values()), SAVED: acts}

        name = "stage 1 (attention transfer)" if group is None else \
            f"stage 1 (attention transfer, largest of {d.layer_groups} layer groups: {len(group)} layers)"
        mp.phases.append(per_sample_phase(name, 1, stage1))
        # the held-out records exist before and after training, not during it (stage1.run_stage1)
        mp.phases.append(MemoryPhase("stage 1 held-out errors (before and after training)",
                                     {"held-out batches": eval_inputs, "teacher records (held-out batches)": held}))
    of_groups = "" if group is None else f", largest of {len(groups)} layer groups"

    def unchecked_saved_bytes(loss) -> int:
        """What autograd keeps for backward with gradient checkpointing off (the CPU reserve's size)."""
        if not (d.grad_checkpointing and hasattr(student, "disable_gradient_checkpointing")):
            return saved_bytes(loss, model_ids)
        student.disable_gradient_checkpointing()
        try:
            return saved_bytes(loss, model_ids)
        finally:
            adapter.enable_gradient_checkpointing(student)
    if runs[2] or runs[3]:
        if d.grad_checkpointing:
            adapter.enable_gradient_checkpointing(student)
        s_teacher, s_student = adapter.predictor(teacher), adapter.predictor(student)
    if runs[2]:
        def stage2(b: int) -> dict[str, int]:
            set_trainable(student, measured[2])
            task = Stage2Task(s_teacher, s_student, adapter.feature_modules, None,
                              feature_weight=d.feature_weight, output_weight=d.output_weight)
            train = batch(b)
            return {STEP: step_peak_bytes(lambda: task.loss(train), measured[2].values()),
                    SAVED: unchecked_saved_bytes(lambda: task.loss(train))}

        mp.phases.append(per_sample_phase(f"stage 2 (end-to-end{of_groups})", 2, stage2))
    if runs[3] and flags.data is not None and not getattr(adapter, "fine_tune_unsupported", None):
        def stage3(b: int) -> dict[str, int]:
            set_trainable(student, measured[3])
            task = Stage3Task(s_student, None)
            train = batch(b, with_target=True)
            return {STEP: step_peak_bytes(lambda: task.loss(train), measured[3].values()),
                    SAVED: unchecked_saved_bytes(lambda: task.loss(train))}

        mp.phases.append(per_sample_phase(f"stage 3 (fine-tune{of_groups})", 3, stage3))
        mp.notes.append("stage 3 counted at the calibration samples' size (--data is read when it starts)")
    if shards > 1 and device.type == "cpu":
        mp.notes.append("sharded on CPU, measured once (Wan2.1-1.3B in 2 processes, no layer groups): 6.3 GB per process "
                        "at the peak, where this plan says 7.3 GB (benchmarks/RESULTS.md, 2026-12-07)")
    if plan.distill.bf16:
        mp.notes.append("bf16 autocast keeps some activations in half precision: counted in float32 (an upper bound)")
    if d.uses_lora:
        mp.notes.append("LoRA adapters are not counted (rank-r matrices: small beside the layers they adapt)")
    return mp


def pipeline_sampling_phase(plan, adapter, count: int) -> MemoryPhase | None:
    """What making the --prompts / --videos samples loads beside the teacher and the student: the
    pipeline's text encoder (in the run's dtype) and VAE (float32), sized from their safetensors
    headers; None when nothing is sampled or the cache already holds every sample."""
    from m4v_convert.distill.job import teacher_calib_cache
    from m4v_convert.io.safetensors_io import read_header

    pipeline = getattr(adapter, "pipeline", None)
    if pipeline is None or not (getattr(adapter, "prompts", None) or getattr(adapter, "videos", None)):
        return None
    cache = teacher_calib_cache(plan.flags, plan.distill)
    if len(list(cache.glob("sample-*.safetensors"))) >= count:
        return None
    parts = {}
    for component, dtype in (("text_encoder", plan.dtype), ("vae", torch.float32)):
        size = torch.tensor([], dtype=dtype).element_size()
        try:
            header = read_header(pipeline / component)
        except M4VError:
            continue  # not safetensors: diffusers reads it, the plan cannot size it
        n = sum(math.prod(info.shape) for info in header.values())
        parts[f"{component} ({str(dtype).removeprefix('torch.')})"] = n * size
    return MemoryPhase("calibration sampling (pipeline components)", parts)


def _no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs)


def _count(params: dict) -> str:
    n = sum(p.numel() for p in params.values())
    return f"{n / 1e6:.1f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def _tensor_ids(obj) -> set[int]:
    out: set[int] = set()
    tensor_bytes(obj, out)
    return out


def check_memory(plan, steps, world: int) -> MemoryPlan | None:
    """Print the memory plan's line (the whole plan with ``--dry-run``) and refuse a run that would
    not fit; ``--no-memory-check``: no plan, no refusal."""
    con = plan.console
    if not plan.flags.memory_check and not plan.flags.dry_run:
        return None
    try:
        mp = plan_memory(plan, steps, world)
    except M4VError:
        raise
    except Exception as e:  # noqa: BLE001 (an op the meta device cannot run: the plan is a guard, not a step)
        if plan.flags.dry_run:
            raise M4VError(f"memory plan: cannot be estimated for this model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
        con.print(f"[yellow]note:[/] memory plan not estimated ({type(e).__name__}); the run goes on without it",
                  highlight=False)
        return None
    if mp is None:
        if plan.flags.dry_run:
            con.print("memory plan: not available for this backbone (it cannot build its model on the meta device)")
        return None
    if plan.flags.dry_run:
        for row in mp.table_lines():
            con.print(row, highlight=False)
    elif plan.dist.is_main:
        con.print(mp.line(), highlight=False)
    if not mp.fits and not plan.flags.dry_run:
        raise M4VError(mp.refusal(plan.flags, plan.distill))
    return mp


__all__ = ["MemoryPlan", "MemoryPhase", "check_memory", "plan_memory", "available_bytes", "tensor_bytes",
           "saved_bytes"]
