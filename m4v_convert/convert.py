"""The conversion verb: an in-place, filter-driven module swap (the torchao ``quantize_`` shape).

``mambafy_(model, config, filter_fn)`` walks the module tree once, asks
``filter_fn(module, fully_qualified_name)`` about every node and replaces the matches with what
the handler registered for ``type(config)`` builds from them. A new kind of conversion is a new
config dataclass plus a handler, never a new branch here.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

Handler = Callable[[nn.Module, str, object], nn.Module]
_HANDLERS: dict[type, Handler] = {}


def register_handler(config_type: type):
    """Decorator: ``handler(module, fqn, config) -> replacement module``."""

    def deco(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn

    return deco


def mambafy_(model: nn.Module, config, filter_fn: Callable[[nn.Module, str], bool]) -> list[str]:
    """Replace, in place, every submodule accepted by ``filter_fn``; return the replaced names."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"no mambafy handler registered for {type(config).__name__}")
    replaced: list[str] = []
    _swap(model, "", config, handler, filter_fn, replaced)
    return replaced


def _swap(module: nn.Module, prefix: str, config, handler: Handler, filter_fn, replaced: list[str]) -> None:
    for name, child in list(module.named_children()):
        fqn = f"{prefix}{name}"
        if filter_fn(child, fqn):
            setattr(module, name, handler(child, fqn, config))
            replaced.append(fqn)
        else:
            _swap(child, fqn + ".", config, handler, filter_fn, replaced)


def record_conversion(model, layers: dict, meta: dict) -> None:
    """Store the conversion in ``model.config["m4v"]``: earlier entries updated by ``meta``, and
    ``layers`` ({global index: MMDiMConfig dict}) replacing the previous layer record."""
    previous = dict(model.config.get("m4v") or {})
    previous.update(meta)
    previous["layers"] = layers
    model.register_to_config(m4v=previous)


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Parse ``--layers``: ``all``, ``3``, ``0-9``, ``0,2,4``, ``0-3,8,10-11``. Sorted, unique."""
    from m4v_convert.errors import M4VError

    usage = "use 'all', 'N', 'A-B' or a comma list like '0-3,8'"
    s = spec.strip().lower()
    if not s:
        raise M4VError(f"--layers: empty; {usage} (leave the flag out for the recipe's default)")
    if s == "all":
        return list(range(num_layers))
    out: set[int] = set()
    for part in s.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                if lo > hi:
                    raise M4VError(f"--layers: the range {part!r} runs backwards; write '{hi}-{lo}'")
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise M4VError(f"--layers: cannot parse {part!r} in {spec!r}; {usage}") from None
    bad = sorted(i for i in out if not 0 <= i < num_layers)
    if bad:
        raise M4VError(f"--layers: layer(s) {bad} out of range; this model has layers 0-{num_layers - 1}")
    return sorted(out)


def layer_ranges(layers: list[int]) -> str:
    """Sorted layer indices → ``--layers`` text, the inverse of :func:`parse_layers` (``0-3,8``)."""
    out, start = [], None
    for i, v in enumerate(layers):
        if start is None:
            start = v
        if i + 1 == len(layers) or layers[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)
