"""mamba-ssm's Triton kernels on CPU tensors, under Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter runs a kernel's Triton code with NumPy on CPU tensors, so the GPU path (argument
order, layouts, strides, masks, the backward kernels) is exercised on a machine without a GPU.
mamba-ssm's Python launchers around the kernels make three CUDA-only calls that the interpreter
does not replace; while the interpreter is on, and only then, :func:`install` stands in for them:

* ``torch.cuda.device(t.device.index)``: a CPU tensor's index is None, and a CPU build of torch
  has no CUDA device to enter; for a non-CUDA device it becomes a null context.
* ``torch.cuda.get_device_properties(t.device).multi_processor_count``: the backward kernels
  and the gated norm size their grids by the SM count; for a non-CUDA device it answers a
  fixed :data:`INTERPRETED_SM_COUNT`.
* ``triton.autotune``: the autotuner times every config on a GPU driver ("0 active drivers");
  each mamba-ssm autotuner keeps only its first config, so it never benchmarks.

A CUDA device passes through both torch stand-ins unchanged, and nothing is installed when the
interpreter is off: a normal run never sees them. ``select_ssd_backend``/``select_norm_backend``
accept CPU tensors for ``backend="triton"`` only while the interpreter is on; ``"auto"`` never
picks it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

INTERPRETED_SM_COUNT = 4  # any positive count is correct: it only changes how work is split

_installed = False


def interpreter_on() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET`` set to a true value).

    Triton reads the variable when a kernel is decorated, so it must be set before mamba-ssm's
    Triton modules are first imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def _is_cuda(device) -> bool:
    import torch

    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare index means a CUDA device


def install() -> None:
    """Install the stand-ins (idempotent); does nothing unless :func:`interpreter_on`."""
    global _installed
    if _installed or not interpreter_on():
        return
    import torch

    real_device, real_properties = torch.cuda.device, torch.cuda.get_device_properties

    def device(index):
        """``torch.cuda.device``, a null context for a CPU tensor's device index (None)."""
        if index is None or not _is_cuda(index):
            return contextlib.nullcontext()
        return real_device(index)

    def get_device_properties(dev=None):
        if dev is not None and not _is_cuda(dev):
            return types.SimpleNamespace(multi_processor_count=INTERPRETED_SM_COUNT, name="triton-interpreter")
        return real_properties(dev)

    torch.cuda.device = device
    torch.cuda.get_device_properties = get_device_properties
    _installed = True


def keep_first_configs(prefix: str = "mamba_ssm.ops.triton") -> int:
    """Trim every autotuner in the loaded modules under ``prefix`` to its first config (returns how
    many were trimmed): the interpreter cannot time configs on a GPU."""
    from triton.runtime.autotuner import Autotuner

    trimmed = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == prefix or name.startswith(prefix + ".")):
            continue
        for value in list(vars(module).values()):
            fn, seen = value, 0
            while fn is not None and seen < 8:  # heuristics/autotune wrappers nest through .fn
                if isinstance(fn, Autotuner) and len(fn.configs) > 1:
                    fn.configs = fn.configs[:1]
                    trimmed += 1
                fn, seen = getattr(fn, "fn", None), seen + 1
    return trimmed
