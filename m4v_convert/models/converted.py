"""The converted-model base: one mixin for every backbone's ``M4V<Model>`` class.

A converted class is ``class M4VFoo(ConvertedModelMixin, Foo)`` with ``__init__ =
converted_init(Foo)``. The mixin owns the life of a conversion:

- ``from_teacher(teacher, ...)``: the converted class over the teacher's own weights (a copy of
  the module tree that shares every parameter and buffer with the teacher, class swap, an empty
  ``config["m4v"]`` record); nothing is converted yet. A converted layer is a new module with its
  own parameters, so the teacher keeps its attention and nothing untouched is held twice; whatever
  training would change in a shared tensor is copied first (``distill.params.own_parameters_``);
- ``convert_(layers, mmdim, meta)``: the in-place swap (:func:`m4v_convert.convert.mambafy_`, a
  layer already converted is left alone), binding the call context, recording the conversion in
  ``config["m4v"]``;
- ``__init__(**config)`` (what ``from_pretrained`` calls): the teacher's constructor, then the
  converted layers rebuilt from ``config["m4v"]`` before the weights are loaded;
- ``converted_layers`` and the call-context binding.

A backbone's class supplies only what differs: which modules are converted (``converted_types``,
``converted_modules``), what to swap (``_swaps``), how to rebuild layers from the record
(``_build_converted``) and, where diffusers does not pass a converted layer what it needs (the
frame grid, the text), a call context (``_init_m4v`` sets ``_m4v_context``).
"""

from __future__ import annotations

import copy
import inspect
import json
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint

from m4v_convert.convert import mambafy_, record_conversion


#: the module every converted folder holds (io/converted.py writes it): one import of the class from
#: the installed toolkit, for diffusers' ``trust_remote_code=True`` loaders (AutoModel, pipelines)
LOADER_MODULE = "m4v_transformer"

#: written into every converted ``config.json``. diffusers' stock class reads ``quantization_config``
#: before it builds anything, so ``WanTransformer3DModel.from_pretrained(converted)`` stops with this
#: text (unguarded, it returned the model with its MM-DiM weights dropped and the attention layers
#: initialised at random); the converted class drops it when it loads.
STOCK_CLASS_GUARD = {
    "quant_method": "m4v-convert MM-DiM conversion (not a quantization): the stock class cannot load it and "
                    "would drop its MM-DiM weights; load it with m4v_convert.load_converted(folder), "
                    "diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True), or a converted pipeline "
                    "with DiffusionPipeline.from_pretrained(pipeline_folder, trust_remote_code=True)"}


class ConvertedModelMixin:
    """Mixed in before a diffusers model class; see the module docstring."""

    #: ``from_teacher`` accepts only instances of this class (None: any model)
    teacher_class: type | None = None
    #: the modules a conversion puts in (a second ``convert_`` skips them; they get the call context)
    converted_types: tuple[type, ...] = ()

    # ------------------------------------------------------------------ what a backbone supplies

    def _init_m4v(self, m4v: dict, *args) -> None:
        """Set up what converted layers read at call time (``self._m4v_context``, hooks); default none.
        ``args``: those given to ``from_teacher`` (none when rebuilt from a saved config)."""

    def _new_record(self, teacher: nn.Module, *args) -> dict:
        """``config["m4v"]`` of a fresh copy of ``teacher`` (no layer converted)."""
        return {"layers": {}}

    def _build_converted(self, m4v: dict) -> None:
        """Put the converted layers recorded in ``m4v`` in place (before weights are loaded)."""
        raise NotImplementedError

    def _swaps(self, layers: Sequence, mmdim: dict) -> Iterable[tuple[Any, set[str]]]:
        """(swap config for ``mambafy_``, names of the modules it replaces), for ``convert_``."""
        raise NotImplementedError

    def converted_modules(self) -> dict[int, nn.Module]:
        """Layer index → the converted module (each has ``.mmdim``)."""
        raise NotImplementedError

    def _layer_records(self) -> dict:
        """``config["m4v"]["layers"]``: one ``MMDiMConfig`` dict per converted layer."""
        return {str(i): m.mmdim.config.to_dict() for i, m in sorted(self.converted_modules().items())}

    # ------------------------------------------------------------------ shared

    def _m4v_setup(self, m4v: dict | None) -> None:
        """After the teacher's constructor: record ``m4v`` and rebuild its converted layers."""
        self.register_to_config(m4v=m4v)
        self._init_m4v(m4v or {})
        self._build_converted(m4v or {})
        self._bind_context()

    @classmethod
    def from_teacher(cls, teacher: nn.Module, *args, share: bool = True):
        """``teacher`` as this class (no layer converted yet), sharing every parameter and buffer with
        it (module docstring; ``share=False``: an independent copy); ``args`` are the backbone's own (a
        generic recipe's spec)."""
        if cls.teacher_class is not None and not isinstance(teacher, cls.teacher_class):
            raise TypeError(f"expected a {cls.teacher_class.__name__}, got {type(teacher).__name__}")
        # deepcopy with the teacher's tensors in its memo: new modules, the same Parameter objects
        shared = {id(t): t for t in (*teacher.parameters(), *teacher.buffers())} if share else {}
        student = copy.deepcopy(teacher, shared)
        student.__class__ = cls
        m4v = student._new_record(teacher, *args)
        student.register_to_config(m4v=m4v)
        student._init_m4v(m4v, *args)
        return student

    @staticmethod
    def share_weights_(part: nn.Module, teacher_part: nn.Module) -> None:
        """Point ``part`` (a module of the student, not converted yet) at ``teacher_part``'s parameters
        and buffers again, as ``from_teacher`` made it: after the teacher's part was loaded in place of
        the tensors they shared (a model loaded part by part, ``Conversion.load_sharded``)."""
        for name, module in teacher_part.named_modules():
            mine = part.get_submodule(name)
            mine._parameters.update(module._parameters)
            mine._buffers.update(module._buffers)

    def convert_(self, layers: Sequence, mmdim: dict, meta: dict | None = None) -> list[str]:
        """Replace ``layers`` by MM-DiM initialized from them; returns the replaced module names."""
        replaced = []
        for swap, names in self._swaps(layers, dict(mmdim)):
            replaced += self._swap_modules(swap, names)
        self._finish_conversion(self._layer_records(), meta)
        return replaced

    def _swap_modules(self, swap, names: set[str]) -> list[str]:
        return mambafy_(self, swap, lambda m, fqn: fqn in names and not isinstance(m, self.converted_types))

    def _finish_conversion(self, layers: dict, meta: dict | None) -> None:
        self._bind_context()
        record_conversion(self, layers, meta or {})

    def _bind_context(self) -> None:
        ctx = getattr(self, "_m4v_context", None)
        if ctx is None:
            return
        for module in self.modules():
            if isinstance(module, self.converted_types) and hasattr(module, "context"):
                module.context = ctx

    @property
    def converted_layers(self) -> list[int]:
        return sorted(self.converted_modules())

    # ------------------------------------------------------------------ config.json

    def to_json_string(self) -> str:
        """diffusers' config.json, with the stock-class guard and ``auto_map`` (AutoModel's remote code)."""
        data = json.loads(super().to_json_string())
        data["quantization_config"] = STOCK_CLASS_GUARD
        data["auto_map"] = {"AutoModel": f"{LOADER_MODULE}.{type(self).__name__}"}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' ``load_config`` without the guard and ``auto_map`` (``from_pretrained`` reads both)."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        strip_loader_entries(config)
        return out

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' ``save_pretrained``, plus the loader module ``auto_map`` names."""
        from m4v_convert.io.converted import write_loader_module

        super().save_pretrained(save_directory, *args, **kwargs)
        write_loader_module(save_directory, type(self).__name__, dict(self.config))

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        """diffusers' block-level gradient checkpointing (the same call), with the converted layers'
        call context (frame grid, text) captured when a block runs forward and put back while
        backward recomputes it: the model's forward clears the context when it returns."""
        func = gradient_checkpointing_func or _checkpoint
        ctx = getattr(self, "_m4v_context", None)
        super().enable_gradient_checkpointing(func if ctx is None else _keeping_context(ctx, func))


def strip_loader_entries(config: dict) -> dict:
    """``config`` without what only the stock class and AutoModel read (the guard, ``auto_map``)."""
    if config.get("quantization_config") == STOCK_CLASS_GUARD:
        config.pop("quantization_config")
    config.pop("auto_map", None)
    return config


def _checkpoint(block, *args):
    """diffusers' default: non-reentrant ``torch.utils.checkpoint``."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


def _keeping_context(ctx, func):
    def checkpointed(block, *args):
        saved = dict(vars(ctx))

        def run(*a):
            current = dict(vars(ctx))
            vars(ctx).update(saved)
            try:
                return block(*a)
            finally:
                vars(ctx).update(current)

        return func(run, *args)

    return checkpointed


def converted_init(base: type):
    """The ``__init__`` of ``M4V<Base>``: ``Base``'s arguments (its signature, so diffusers'
    ``from_pretrained`` / ``from_config`` pass the saved config through) plus keyword ``m4v``, the
    conversion record, from which the converted layers are rebuilt."""
    base_init = base.__init__

    def __init__(self, *args, m4v: dict | None = None, **kwargs):
        base_init(self, *args, **kwargs)
        self._m4v_setup(m4v)

    sig = inspect.signature(base_init)
    params = list(sig.parameters.values())
    m4v_param = inspect.Parameter("m4v", inspect.Parameter.KEYWORD_ONLY, default=None)
    head = [p for p in params if p.kind != p.VAR_KEYWORD]
    tail = [p for p in params if p.kind == p.VAR_KEYWORD]
    __init__.__signature__ = sig.replace(parameters=head + [m4v_param] + tail)
    __init__.__doc__ = f"``{base.__name__}``'s arguments, plus ``m4v``: the conversion record (config.json)."
    return __init__
