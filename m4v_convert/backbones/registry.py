"""The backbone registry: the one place that maps a recipe's ``backbone:`` (or a saved model's
config) to the code of that family.

Each family registers one :class:`Backbone` in ``backbones/__init__.py``. Its fields are
``"module:attribute"`` paths into the family's own folder, so that looking an entry up imports
nothing heavy (no diffusers model, no torch kernels) until a field is used. Code outside
``backbones/`` asks this module instead of testing a backbone's name: the CLI dispatches
``convert`` / ``flops`` / ``eval``, the process worker picks the job, the eval and ablate jobs
load their teacher, and :func:`m4v_convert.load_converted` finds the class that rebuilds a
saved model.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from m4v_convert.errors import M4VError


def resolve(path: str) -> Any:
    """``"package.module:attr"`` → the attribute."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Backbone:
    """One backbone family; every code field is a ``"module:attribute"`` path.

    - ``conversion``: ``(plan) -> Conversion``, this family's side of the one conversion job
      (:class:`m4v_convert.jobs.convert.Conversion`); ``converts`` names what the family converts,
      for a backbone command given another family's recipe.
    - ``flags_not_offered``: conversion flags (``ConvertFlags`` fields) this family's job does not
      take; ``check_flags`` (optional): ``(flags, recipe) -> None``, the family's own refusals, run
      before any weight is read; ``default_stages``: the distillation stages when neither the
      recipe nor ``--stages`` says.
    - ``published_flops``: ``(recipe, config, model, size, frames, layers, crosscheck) -> (report,
      markdown)``, the ``m4v-convert flops`` report for a published full-size config (no weights).
    - ``converted_class``: ``(config.json dict) -> class | None``, the class that rebuilds a model
      this family saved (None: not one of this family's).
    - ``load`` (optional): ``(path, device=...) -> teacher``, the family's checkpoint loader.
    - ``command``: the family's own CLI command (None: ``m4v-convert convert`` only).
    - ``check_recipe`` (optional): ``(recipe, checkpoint, model, layers) -> report with .lines()``,
      what ``m4v-convert recipes --check`` shows without converting.
    - ``eval_options`` / ``evaluate`` (optional): the ``eval`` job for this family's students;
      ``eval_refusal`` finishes the message for an ``eval`` flag this job does not take.

    Recipe fields (plain data, checked by the recipe loader before any model is read):

    - ``recipe_fields``: the recipe fields only this family reads (a dotted path for a field of a
      section: ``calib.x``, ``distill.stage2.x``); another family's recipe that sets one is refused.
    - ``recipe_required``: the fields (or sections) this family's recipes must set.
    - ``refused_mmdim``: ``(mmdim key, why)``: MM-DiM settings this family takes only at their default.
    """

    name: str
    conversion: str
    converts: str
    published_flops: str
    converted_class: str
    load: str | None = None
    command: str | None = None
    flags_not_offered: tuple[str, ...] = ()
    check_flags: str | None = None
    default_stages: str = "1,2,3"
    check_recipe: str | None = None
    eval_options: str | None = None
    evaluate: str | None = None
    eval_refusal: str = ""
    recipe_fields: tuple[str, ...] = ()
    recipe_required: tuple[str, ...] = ()
    refused_mmdim: tuple[tuple[str, str], ...] = ()

    def flops_report(self, recipe, config: dict, model: str, size, frames, layers, crosscheck: bool):
        """``m4v-convert flops``: (report dict, markdown) for a published full-size config."""
        return resolve(self.published_flops)(recipe, config, model, size, frames, layers, crosscheck)

    def check_conversion_flags(self, flags, recipe) -> None:
        if self.check_flags is not None:
            resolve(self.check_flags)(flags, recipe)

    def load_teacher(self, path, **kwargs):
        if self.load is None:
            raise M4VError(f"{path}: loading a {self.name} checkpoint here is not supported")
        return resolve(self.load)(path, **kwargs)

    def check(self, recipe, checkpoint=None, model: str | None = None, layers: str | None = None):
        """``recipes --check``: what the recipe would replace in the model, nothing converted."""
        if self.check_recipe is None:
            raise M4VError(f"recipes --check: recipe {recipe.name!r} is for backbone {self.name!r}, which has its "
                           f"own command (m4v-convert {self.command}); --check validates backbone: generic recipes")
        return resolve(self.check_recipe)(recipe, checkpoint, model, layers)

    def eval_from_flags(self, **flags) -> Any:
        """The eval job's options from the ``eval`` command's flags."""
        if self.evaluate is None:
            offered = ", ".join(e.name for e in _entries().values() if e.evaluate)
            raise M4VError(f"eval: no eval job for {self.name} conversions yet (only for {offered})")
        return options_from_flags(resolve(self.eval_options), flags, self.eval_refusal)

    def run_eval(self, options, console=None):
        return resolve(self.evaluate)(options, console)


def options_from_flags(cls, flags: dict, refusal: str) -> Any:
    """``cls(**flags)``, where a flag left at ``None`` (or ``False``) was not given and takes the
    field's default, and given flags ``cls`` has no field for are refused in one message:
    ``--a, --b: <refusal>``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in flags.items() if v is not None}
    extra = [k for k, v in given.items() if k not in fields and v is not False]
    if extra:
        raise M4VError(f"{', '.join('--' + k.replace('_', '-') for k in extra)}: {refusal}")
    return cls(**{k: v for k, v in given.items() if k in fields})


_ENTRIES: dict[str, Backbone] = {}


def register(entry: Backbone) -> Backbone:
    if entry.name in _ENTRIES and _ENTRIES[entry.name] != entry:
        raise ValueError(f"backbone {entry.name!r} is registered twice")
    _ENTRIES[entry.name] = entry
    return entry


def _entries() -> dict[str, Backbone]:
    importlib.import_module("m4v_convert.backbones")  # registers the shipped families
    return _ENTRIES


def names() -> list[str]:
    return list(_entries())


def entries() -> list[Backbone]:
    return list(_entries().values())


def get(name: str) -> Backbone:
    entries = _entries()
    if name not in entries:
        raise M4VError(f"backbone {name!r}: not a registered backbone (known: {', '.join(entries)})")
    return entries[name]


def for_recipe(recipe) -> Backbone:
    return get(recipe.backbone)


def find_converted(config: dict) -> tuple[Backbone, type] | None:
    """The family and class that rebuild a saved conversion (its ``config.json``), or None."""
    for entry in _entries().values():
        cls = resolve(entry.converted_class)(config)
        if cls is not None:
            return entry, cls
    return None
