"""Lazy, defensive access to mamba-ssm's Triton SSD kernel (``mamba_chunk_scan_combined``).

mamba-ssm's top-level ``__init__`` imports its Mamba v1 CUDA extension (``selective_scan_cuda``),
which an offline ``MAMBA_SKIP_CUDA_BUILD=TRUE`` install does not have, although the Triton SSD
kernels need nothing from it. So: try the normal import first; if that fails for any reason,
register a bare package module for ``mamba_ssm`` whose ``__path__`` points at the installed
package folder, so its submodules import without running ``__init__``; then import
``mamba_ssm.ops.triton.ssd_combined`` again.

Nothing here runs at import time of ``m4v_convert``; the first lookup happens on first use,
every exception is caught, and the outcome (module or the reason it is missing) is cached.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types

from m4v_convert.ops.triton_interpreter import install as install_interpreter_shims
from m4v_convert.ops.triton_interpreter import interpreter_on, keep_first_configs

_PKG = "mamba_ssm"
_SCAN_MODULE = "mamba_ssm.ops.triton.ssd_combined"
_SCAN_NAME = "mamba_chunk_scan_combined"

_lock = threading.Lock()
_modules: dict[str, tuple[types.ModuleType | None, str | None]] = {}


def _install_stub_package() -> None:
    """Put a stand-in ``mamba_ssm`` package (no ``__init__`` code) into ``sys.modules``."""
    if _PKG in sys.modules:
        existing = sys.modules[_PKG]
        if existing is None:
            raise ImportError(f"{_PKG} is blocked (sys.modules[{_PKG!r}] is None)")
        if not hasattr(existing, "__path__"):
            raise ImportError(f"sys.modules[{_PKG!r}] is not a package")
        return  # the real package (or our stub) is already there
    spec = importlib.util.find_spec(_PKG)  # locates the folder without executing __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{_PKG} is not installed")
    stub = types.ModuleType(_PKG, "stand-in for mamba_ssm installed by m4v_convert (its __init__ was skipped)")
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__package__ = _PKG
    stub.__spec__ = importlib.machinery.ModuleSpec(_PKG, None, is_package=True)
    stub.__spec__.submodule_search_locations = list(stub.__path__)
    stub._m4v_stub = True
    sys.modules[_PKG] = stub


def load_mamba_module(name: str) -> types.ModuleType | None:
    """Import submodule ``name`` of mamba-ssm (e.g. ``mamba_ssm.ops.triton.layernorm_gated``)
    without requiring mamba-ssm's ``__init__`` to succeed; ``None`` if it cannot be imported.

    The result is cached; :func:`mamba_module_error` tells why a module is missing. When the
    fallback is used, a stand-in ``mamba_ssm`` package stays registered in ``sys.modules``
    (marked ``_m4v_stub = True``) so later ``import mamba_ssm.ops...`` statements work too.
    """
    if not name.startswith(_PKG + "."):
        raise ValueError(f"not a mamba_ssm submodule: {name!r}")
    with _lock:
        if name in _modules:
            return _modules[name][0]
        module, error = None, None
        try:
            module = importlib.import_module(name)
        except BaseException as first:  # noqa: BLE001 - any failure means "not available"
            if isinstance(first, (KeyboardInterrupt, SystemExit)):
                raise
            error = f"{type(first).__name__}: {first}"
            try:
                _install_stub_package()
                module = importlib.import_module(name)
                error = None
            except BaseException as second:  # noqa: BLE001
                if isinstance(second, (KeyboardInterrupt, SystemExit)):
                    raise
                error = f"{error}; without mamba_ssm/__init__: {type(second).__name__}: {second}"
                module = None
        if module is not None and interpreter_on():  # CPU tensors through the real kernels (tests)
            install_interpreter_shims()
            keep_first_configs()
        _modules[name] = (module, error)
        return module


def mamba_module_error(name: str) -> str | None:
    """Why :func:`load_mamba_module` returned None for ``name`` (None if loaded or not tried)."""
    return _modules.get(name, (None, None))[1]


def get_triton_scan():
    """mamba-ssm's ``mamba_chunk_scan_combined``, or None when it cannot be imported."""
    module = load_mamba_module(_SCAN_MODULE)
    fn = getattr(module, _SCAN_NAME, None) if module is not None else None
    if module is not None and fn is None and _SCAN_MODULE in _modules:
        _modules[_SCAN_MODULE] = (module, f"{_SCAN_MODULE} has no {_SCAN_NAME}")
    return fn if callable(fn) else None


def triton_scan_available() -> bool:
    """True when mamba-ssm's Triton SSD kernel can be imported (CUDA is checked per call)."""
    try:
        return get_triton_scan() is not None
    except Exception:  # noqa: BLE001 - never raise from an availability probe
        return False


def triton_scan_error() -> str | None:
    """Why the Triton kernel is unavailable (None when available or not yet looked up)."""
    return mamba_module_error(_SCAN_MODULE)
