"""Sharded distillation with FSDP2 (``--fsdp``): each process holds 1/N of the teacher and student.

The student shares every unconverted weight with the teacher (``models/converted.py``), so the two
are sharded together, one FSDP2 group per transformer block: ``fully_shard([teacher.blocks[i],
student.blocks[i]])`` gathers the block's weights before whichever of the two runs it and frees them
after, and the teacher's pass runs through the same sharded blocks as the student's. Each
stage-1 module (a converted layer's MM-DiM) is a group of its own inside its block, because stage 1
calls it alone on the teacher's records. What precedes and follows the blocks (embeddings, output
head) belongs to one root group over both models (:class:`_Pair`); FSDP2 needs a single root, so
calls of the teacher and of the student are routed through it.

Gradients are averaged by FSDP2's reduce-scatter (each process keeps its shard's), AdamW and the
gradient-norm limits act on the sharded parameters, and the output is gathered one tensor at a
time (:func:`full_tensors`) for rank 0 to write.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import torch
import torch.nn as nn

from m4v_convert.distill.distributed import DistContext
from m4v_convert.errors import M4VError


class _Pair(nn.Module):
    """The root of the sharded teacher and student: ``pair("teacher", ...)`` runs the teacher."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        super().__init__()
        self.teacher, self.student = teacher, student

    def forward(self, which: str, *args, **kwargs):
        model = getattr(self, which)
        return type(model).forward(model, *args, **kwargs)  # the class's forward: the instance's routes here


def block_lists(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Names of the student's top-level ``nn.ModuleList``s of transformer blocks (the teacher has the same)."""
    names = [n for n, m in student.named_children() if isinstance(m, nn.ModuleList) and len(m)
             and isinstance(getattr(teacher, n, None), nn.ModuleList) and len(getattr(teacher, n)) == len(m)]
    if not names:
        raise M4VError(f"--fsdp: {type(teacher).__name__} has no list of transformer blocks to shard")
    return names


def stage1_groups(student: nn.Module, blocks: dict[int, nn.Module]) -> list[nn.Module]:
    """The student modules that get their own FSDP2 group so stage 1 can call them alone: each stage-1
    module, or where it wraps converted layers from outside the model, the student modules it holds."""
    inside = {id(m) for m in student.modules()}
    out = []
    for i, m in blocks.items():
        held = [m] if id(m) in inside else [c for c in m.children() if id(c) in inside]
        if not held:
            raise M4VError(f"--fsdp: the stage-1 module of layer {i} holds no module of the model; this backbone "
                           "cannot be sharded")
        out += held
    return out


def shard(teacher: nn.Module, student: nn.Module, blocks: dict[int, nn.Module], dist: DistContext,
          device: torch.device, bf16: bool) -> _Pair:
    """Shard ``teacher`` and ``student`` in place across ``dist``'s processes (module docstring); returns
    the root. ``bf16`` (CUDA): blocks compute in bfloat16 from float32 masters, gradients reduced in
    float32. Every process must hold the same weights before: the student's own are broadcast from rank 0.
    (A model loaded block by block is sharded as it loads: :class:`BlockSharder`.)"""
    sharder = BlockSharder(dist, device, bf16)
    held, placed = stage1_groups(student, blocks), set()
    for name in block_lists(teacher, student):
        for t, s in zip(getattr(teacher, name), getattr(student, name)):
            inside = [m for m in held if any(m is x for x in s.modules())]
            sharder.block(t, s, inside)
            placed |= {id(m) for m in inside}
    if len(placed) < len(held):
        raise M4VError("--fsdp: a stage-1 module of this backbone lies outside its transformer blocks; it cannot be "
                       "sharded with them")
    return sharder.root(teacher, student)


class BlockSharder:
    """Makes the FSDP2 groups of the module docstring one transformer block at a time, then the root,
    so that a model loaded block by block (``Conversion.load_sharded``) is never whole in a process.
    ``copies`` (``--train all``): the student first gets its own copy of each weight it shares with
    the teacher, as ``params.own_parameters_`` gives it in an unsharded run."""

    def __init__(self, dist: DistContext, device: torch.device, bf16: bool, copies: bool = False):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # FSDP2 warns of every module returning a view, which an in-place op would detach from its
        # backward hook; no caller here modifies these outputs in place (tests/test_fsdp.py compares the
        # sharded run's weights with one process's)
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor",
                                category=UserWarning)
        self.dist, self.copies = dist, copies
        self._done: set[int] = set()  # the tensors of the blocks already sharded
        if device.type == "cpu":
            map_large_allocations()
        self.mesh = init_device_mesh(device.type, (dist.world,))
        self.policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                       if bf16 and device.type == "cuda" else MixedPrecisionPolicy())

    def _own(self, student_part: nn.Module, teacher_part: nn.Module) -> None:
        """The student part's own tensors (those of no block already sharded) made equal on every
        process, broadcast from rank 0, after its copies of the weights it shares (``copies``)."""
        shared = {id(t) for t in (*teacher_part.parameters(), *teacher_part.buffers())}
        if self.copies:
            for module in student_part.modules():
                for k, p in module._parameters.items():
                    if p is not None and id(p) in shared and id(p) not in self._done:
                        module._parameters[k] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        mine = [t for t in (*student_part.parameters(), *student_part.buffers()) if id(t) not in self._done]
        self.dist.broadcast_([t for t in mine if id(t) not in shared])

    def block(self, teacher_block: nn.Module, student_block: nn.Module, stage1_modules: list[nn.Module]) -> None:
        """One pair of blocks: each stage-1 module inside the student's its own group, then the pair one."""
        from torch.distributed.fsdp import fully_shard

        self._own(student_block, teacher_block)
        for m in stage1_modules:
            fully_shard(m, mesh=self.mesh, mp_policy=self.policy)
        fully_shard([teacher_block, student_block], mesh=self.mesh, mp_policy=self.policy)
        _one_model_per_pass(teacher_block, student_block)
        self._done |= {id(t) for m in (teacher_block, student_block) for t in (*m.parameters(), *m.buffers())}
        release_freed_memory()  # the whole block just freed, before the next one is read

    def root(self, teacher: nn.Module, student: nn.Module) -> _Pair:
        """What precedes and follows the blocks, in one root group over both models, through which
        their calls are routed (module docstring); after every block's :meth:`block`."""
        from torch.distributed.fsdp import fully_shard

        self._own(student, teacher)
        pair = _Pair(teacher, student)
        # the root too frees its gathered weights after each call: the stages look up, freeze and unfreeze
        # parameters between calls, which must then be the sharded ones
        fully_shard(pair, mesh=self.mesh, mp_policy=self.policy, reshard_after_forward=True)
        # the root's weights are gathered only when the root runs: the models' own calls go through it
        teacher.forward = lambda *a, **k: pair("teacher", *a, **k)
        student.forward = lambda *a, **k: pair("student", *a, **k)
        # the root must be set up first, or the first stage-1 module called would take its place
        pair._get_fsdp_state()._lazy_init()
        return pair


def _one_model_per_pass(teacher_block: nn.Module, student_block: nn.Module) -> None:
    """Let a call of either block complete their group's forward. FSDP2 ends a group's forward
    (frees its gathered weights, sets up their gathering for backward) once every module of the
    group has run, else only at the end of the root's forward; a teacher or student pass runs only
    its own block of each pair, so every block stayed gathered through the whole pass: the whole
    model at once (measured: all 8 blocks of an 8-block Wan gathered at the end of a teacher pass).
    Each block's call now counts for both: after FSDP2's own pre-forward hook has listed the group's
    modules to run, the other block is struck off. Relies on FSDP2's ``_modules_to_run_forward``
    (torch 2.13); tests/test_fsdp.py checks that at most two blocks are gathered during a pass."""
    state = teacher_block._get_fsdp_state()
    if not isinstance(getattr(state, "_modules_to_run_forward", None), set):
        raise M4VError("--fsdp: this torch's FSDP2 has no per-group forward record (_modules_to_run_forward); "
                       "the sharded teacher and student would gather every block at once. Use torch 2.13")

    def runs_alone(other: nn.Module):
        def hook(module, args, kwargs):
            state._modules_to_run_forward.discard(other)
        return hook

    # appended: FSDP2's pre-forward hook is prepended, so it has filled the record when these run
    teacher_block.register_forward_pre_hook(runs_alone(student_block), with_kwargs=True)
    student_block.register_forward_pre_hook(runs_alone(teacher_block), with_kwargs=True)


def _libc():
    """glibc, through ctypes (None where the C library is not glibc or cannot be opened)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Have glibc map every allocation of ``threshold`` bytes or more on its own and unmap it when
    freed (``mallopt(M_MMAP_THRESHOLD)``; by default the threshold rises to 32 MB after the first such
    free, and blocks' gathered weights, their all-gather buffers and gradients then come from the
    heap, where freed ones stay resident). Measured, Wan2.1-1.3B in 2 sharded processes on CPU: a
    peak of 6.28 GB per process at 1 MB, 7.00 GB at 4 MB, 8.18 GB without (benchmarks/RESULTS.md)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc). What sharding frees (the whole weights)
    and what each sharded step frees (gathered blocks, their gradients) are many block-sized
    allocations that glibc keeps in its heap, resident: measured 1.3 GB after sharding Wan2.1-1.3B in 2
    processes, and 0.8 GB of 2 GB per process after each step of a 4-block Wan."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def scalar(t: torch.Tensor) -> float:
    """A (possibly sharded) 0-d tensor as a float."""
    return float(t.full_tensor() if is_sharded(t) else t)


def full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s state dict, one full tensor at a time. Sharded tensors are gathered: every process
    must run this to the end, in step."""
    for name, t in model.state_dict().items():
        yield name, (t.full_tensor() if is_sharded(t) else t).detach()


# ------------------------------------------------------------------------------------------ checkpoints


def save_shards(folder, model: nn.Module, names: list[str], optimizers: list | None) -> None:
    """Every process writes its shards of ``model``'s parameters ``names`` (and of ``optimizers``'
    states) into ``folder`` with ``torch.distributed.checkpoint``; a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = dict(model.named_parameters())
    state = {"weights": {n: named[n] for n in names}}
    if optimizers:
        state["optimizer"] = get_optimizer_state_dict(model, optimizers)
    dcp.save(state, checkpoint_id=str(folder))


def load_shards(folder, model: nn.Module, names: list[str]) -> None:
    """Read this process's shards of the parameters ``names`` from ``folder`` into ``model``, in place."""
    import torch.distributed.checkpoint as dcp

    named = dict(model.named_parameters())
    with torch.no_grad():
        dcp.load({"weights": {n: named[n] for n in names}}, checkpoint_id=str(folder))


def load_optimizer_shards(folder, model: nn.Module, optimizers: list) -> None:
    """Read this process's shards of ``optimizers``' states from ``folder`` (written by :func:`save_shards`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizers)}  # the layout, filled in by the load
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(model, optimizers, state["optimizer"])
