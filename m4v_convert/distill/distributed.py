"""Data-parallel distillation: one process per device (gloo on CPU, NCCL on GPU), set up by accelerate.

Every process holds the teacher and the student, draws the *same* global batch from the same
generator and trains on its own slice; gradients are averaged across processes (one flat
all-reduce per step), so every process takes the identical optimizer step and the weights stay
identical. With equal per-process batches this is the single-process step on the combined batch
(up to float summation order).

Start it with ``accelerate launch --multi_gpu --num_processes N -m cli wan2.1 ...`` (``--multi_gpu``
selects accelerate's torchrun launcher, which also runs CPU-only processes), ``torchrun
--nproc_per_node N -m cli wan2.1 ...``, or ``m4v-convert wan2.1 --num-processes N ...``, which
re-launches itself through accelerate's launcher (:func:`launch`). With ``--fsdp`` the processes
shard the weights instead of replicating them (``sharding.py``); this module still sets them up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

WORKER_MODULE = "m4v_convert.jobs.worker"


def in_distributed_env() -> bool:
    """True inside a process started by accelerate launch / torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False  # weights sharded with FSDP2 (distill/sharding.py), not replicated

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    @torch.no_grad()
    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` in place across processes (one flat float32 buffer per dtype group)."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset: offset + n].view_as(t))
            offset += n

    @torch.no_grad()
    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's ``tensors`` to every process."""
        if not self.enabled:
            return
        for t in tensors:
            buf = t.detach().contiguous()
            torch.distributed.broadcast(buf, src=0)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def env_flag(var: str) -> bool:
    return os.environ.get(var, "false").lower() in ("1", "true")


def sharding_requested(fsdp_flag: bool) -> bool:
    """Whether this run shards its weights: ``--fsdp``, or ``accelerate launch --use_fsdp
    --fsdp_version 2`` (any other FSDP version is refused)."""
    from m4v_convert.errors import M4VError

    if not env_flag("ACCELERATE_USE_FSDP"):
        return bool(fsdp_flag)
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise M4VError("accelerate launch --use_fsdp: m4v-convert shards with FSDP2; add --fsdp_version 2 (its "
                       "other FSDP settings are not read: the trainer shards per transformer block itself)")
    return True


def init_distributed(device_type: str, fsdp: bool = False) -> DistContext:
    """The process group of this run (a no-op context outside a multi-process launch). ``fsdp``:
    ``--fsdp`` (see :func:`sharding_requested`)."""
    from m4v_convert.errors import M4VError

    if env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise M4VError("accelerate launch with DeepSpeed: not supported by m4v-convert's trainer; launch without it "
                       "(--fsdp shards the weights with FSDP2; see docs/distillation.md)")
    fsdp = sharding_requested(fsdp)
    if not in_distributed_env():
        return DistContext()
    from accelerate import PartialState

    state = PartialState(cpu=device_type == "cpu")  # cpu=True: gloo even when the launcher said multi-GPU
    return DistContext(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index,
                       fsdp=fsdp)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(options: dict, num_processes: int) -> int:
    """Run the conversion ``options`` describes (``ConvertFlags`` as JSON) in ``num_processes``
    processes of :data:`WORKER_MODULE` via accelerate's launcher; returns the launcher's exit status."""
    fd, name = tempfile.mkstemp(prefix="m4v-launch-", suffix=".json")
    spec = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(options, indent=2, default=str))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", WORKER_MODULE, str(spec)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        return subprocess.run(cmd, env=env).returncode
    finally:
        spec.unlink(missing_ok=True)
