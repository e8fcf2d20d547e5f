"""Recipes: one YAML per backbone family under ``recipes/`` (see recipes/wan2.1.yaml).

A recipe is validated on load, before any weight is read, against the pydantic models of
:mod:`m4v_convert.recipe_schema`: unknown keys, wrong types and impossible values each become one
line of a :class:`RecipeError` naming the file, the line, the field path and what was expected.
``backbone: generic`` recipes describe a diffusers video DiT the toolkit has no code for (see
``docs/recipes.md``); what needs the model's module tree is checked by
``m4v_convert.backbones.generic.conversion.check_recipe``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from m4v_convert.backbones import registry
from m4v_convert.errors import M4VError, RecipeError
from m4v_convert.layers.mmdim import MMDiMConfig
from m4v_convert.recipe_schema import FieldError, RecipeFile

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
_MMDIM_FIXED = {"d_model", "nheads", "headdim", "d_state", "ngroups", "layer_index", "extra"}
#: MMDiMConfig's default of every field that has one
MMDIM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MMDiMConfig) if f.default is not dataclasses.MISSING}


@dataclass
class Recipe:
    name: str
    description: str
    backbone: str
    default_layers: str
    path: Path
    published: dict[str, Path]
    video: dict
    mmdim: dict
    calib: dict
    distill: dict
    variant: str | None = None  # pyramidflow: "miniflux" | "sd3"
    resolution: str | None = None  # pyramidflow: "384p" | "768p"
    allow_double_stream: bool = False  # pyramidflow: may --layers name double-stream blocks
    spec: RecipeFile | None = None  # the validated file (generic backbones read their sections here)
    raw: dict | None = None  # the YAML as loaded (recorded in converted configs)

    @property
    def mmdim_settings(self) -> dict:
        """Every MM-DiM setting a conversion with this recipe uses: its ``mmdim`` fields over
        MMDiMConfig's defaults (sizes, which the model gives, left out)."""
        return {**MMDIM_DEFAULTS, **self.mmdim}

    def layers_or_default(self, layers: str | None) -> str:
        """``--layers`` as given (an empty one is refused by ``parse_layers``), else ``default_layers``."""
        return str(self.default_layers) if layers is None else layers

    def published_config(self, name: str | None) -> tuple[str, dict]:
        """(name, config) of the published full-size config ``--model NAME`` picks (None: the only one)."""
        if not self.published:
            raise M4VError(f"--model: recipe {self.name!r} ships no published config")
        if name is None:
            if len(self.published) != 1:
                raise M4VError(f"--model: recipe {self.name!r} ships configs {sorted(self.published)}; pick one")
            name = next(iter(self.published))
        if name not in self.published:
            raise M4VError(f"--model: recipe {self.name!r} ships configs {sorted(self.published)}, not {name!r}")
        return name, json.loads(self.published[name].read_text())

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("spec", "raw")}
        d["path"] = str(self.path)
        d["published"] = {k: str(v) for k, v in self.published.items()}
        return d


# ---------------------------------------------------------------------------------------------- errors


def _line_index(text: str) -> dict[tuple, int]:
    """Field path (tuple of keys / list indices) → 1-based line of its value (or key) in ``text``."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                p = path + (key.value,)
                lines[p] = key.start_mark.line + 1
                walk(value, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                lines[path + (i,)] = value.start_mark.line + 1
                walk(value, path + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if root is not None:
        walk(root, ())
    return lines


def _where(path: Path, lines: dict, loc: tuple) -> str:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return f"{path}: line {lines[loc[:n]]}"
    return str(path)


def _dotted(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _type_name(expected: str) -> str:
    return {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "true or false",
            "dict_type": "a mapping", "list_type": "a list", "tuple_type": "a list",
            "model_type": "a mapping", "model_attributes_type": "a mapping"}.get(expected, expected)


def _real_loc(loc: tuple, data, keep_last: bool) -> tuple:
    """pydantic's error location without its union / validator tags: the keys that exist in the
    YAML (plus, for a missing field, the missing key itself)."""
    out, node = [], data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif keep_last and i == len(loc) - 1:
            out.append(part)
    return tuple(out)


def _messages(errors: list[dict], data: dict, model_fields: dict) -> list[tuple[tuple, str]]:
    """pydantic errors → [(field path, human message)], one per mistake (union branches merged)."""
    grouped: dict[tuple, list[dict]] = {}
    for err in errors:
        kind = err["type"]
        ctx = err.get("ctx") or {}
        loc = _real_loc(tuple(err["loc"]), data, keep_last=kind in ("missing", "extra_forbidden"))
        if kind == "value_error" and isinstance(ctx.get("error"), FieldError):
            loc = loc + tuple(ctx["error"].field.split("."))
        grouped.setdefault(loc, []).append(err)
    out = []
    for loc, errs in grouped.items():
        field = _dotted(loc)
        custom = [e for e in errs if isinstance((e.get("ctx") or {}).get("error"), FieldError)]
        types = [e for e in errs if e["type"].endswith("_type") or e["type"].endswith("_parsing")]
        err = errs[0]
        kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
        if custom:
            out.append((loc, f"field '{field}' {custom[0]['ctx']['error'].message}"))
        elif kind == "extra_forbidden":
            parent = model_fields.get(tuple(p for p in loc[:-1] if not isinstance(p, int)))
            known = f" (expected one of: {', '.join(sorted(parent))})" if parent else ""
            out.append((loc, f"unknown field '{field}'{known}"))
        elif kind == "missing":
            out.append((loc, f"missing required field '{field}'"))
        elif kind == "literal_error":
            out.append((loc, f"field '{field}' must be one of {ctx.get('expected')}, got {value!r}"))
        elif kind in ("greater_than_equal", "greater_than"):
            op = ">=" if kind == "greater_than_equal" else ">"
            out.append((loc, f"field '{field}' must be {op} {ctx.get('ge', ctx.get('gt'))}, got {value!r}"))
        elif types and len(types) == len(errs):
            names = list(dict.fromkeys(_type_name(e["type"]) for e in types))
            out.append((loc, f"field '{field}' must be {' or '.join(names)}, got {type(value).__name__} "
                             f"({value!r})"))
        else:
            out.append((loc, f"field '{field}': {err['msg']}"))
    return out


def _known_fields() -> dict[tuple, list[str]]:
    """Field names of every section, by path, for "expected one of" hints (aliases as written)."""
    from pydantic import BaseModel

    out: dict[tuple, list[str]] = {}

    def model_of(annotation):
        import typing

        args = typing.get_args(annotation) or (annotation,)
        for a in args:
            if isinstance(a, type) and issubclass(a, BaseModel):
                return a
            inner = model_of(a) if typing.get_args(a) else None
            if inner is not None:
                return inner
        return None

    def walk(model, path, depth=0):
        out[path] = [f.alias or n for n, f in model.model_fields.items()]
        if depth > 3:
            return
        for n, f in model.model_fields.items():
            sub = model_of(f.annotation)
            if sub is not None and sub is not model:
                walk(sub, path + (f.alias or n,), depth + 1)

    walk(RecipeFile, ())
    return out


def _check_mmdim(mmdim: dict, where) -> None:
    fields = {f.name: f for f in dataclasses.fields(MMDiMConfig)}
    for key, value in mmdim.items():
        here = where(("mmdim", key))
        if key in _MMDIM_FIXED:
            raise RecipeError(f"{here}: field 'mmdim.{key}' is derived from the checkpoint and cannot be set")
        if key not in fields:
            raise RecipeError(f"{here}: unknown field 'mmdim.{key}' (MMDiMConfig has: "
                              f"{', '.join(sorted(set(fields) - _MMDIM_FIXED))})")
        default = fields[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise RecipeError(f"{here}: field 'mmdim.{key}' must be true or false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"{here}: field 'mmdim.{key}' must be a number, got {value!r}")
        if isinstance(default, str) and not isinstance(value, str):
            raise RecipeError(f"{here}: field 'mmdim.{key}' must be a string, got {value!r}")
    try:  # let the block validate choices (e.g. bc_norm, conv_activation)
        from m4v_convert.layers.mmdim import MMDiM

        MMDiM(MMDiMConfig(d_model=8, nheads=2, headdim=4, **mmdim), device="meta")
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where(('mmdim',))}: invalid mmdim settings: {e}") from None


# ---------------------------------------------------------------------------------------------- loading


class RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, with two of YAML 1.1's surprises for a person writing a recipe removed:
    a key given twice in one section is an error (it was silently the later one), and ``1e-3`` is a
    number (YAML 1.1 reads an exponent without a dot as a string)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one section (first on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a shipped recipe by name (``wan2.1``) or any YAML file by path."""
    path = Path(name_or_path).expanduser()
    if path.suffix not in (".yaml", ".yml") and not path.is_file():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(available_recipes()) or "none"
        raise RecipeError(f"unknown recipe {str(name_or_path)!r}: no file {path} (shipped recipes: {known})")
    text = path.read_text()
    try:
        data = yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    lines = _line_index(text)

    def where(loc: tuple) -> str:
        return _where(path, lines, loc)

    try:
        spec = RecipeFile.model_validate(data)
    except ValidationError as e:
        msgs = [f"{where(loc)}: {msg}" for loc, msg in _messages(e.errors(), data, _known_fields())]
        raise RecipeError("\n".join(msgs)) from None
    mmdim = data.get("mmdim") or {}
    _check_mmdim(mmdim, where)
    for key, why in registry.get(spec.backbone).refused_mmdim:
        if key in mmdim and mmdim[key] != MMDIM_DEFAULTS[key]:
            raise RecipeError(f"{where(('mmdim', key))}: field 'mmdim.{key}' {why}")
    published = {}
    for key, rel in (data.get("published") or {}).items():
        # relative to the recipe; a copy of a shipped recipe elsewhere still finds the shipped configs
        candidates = [(path.parent / rel).resolve(), (RECIPES_DIR / rel).resolve()]
        p = next((c for c in candidates if c.is_file()), None)
        if p is None:
            raise RecipeError(f"{where(('published', key))}: field 'published.{key}' points to {candidates[0]}, "
                              "which does not exist")
        published[str(key)] = p
    return Recipe(
        name=data["name"], description=data["description"], backbone=data["backbone"],
        default_layers=str(data["default_layers"]), path=path.resolve(), published=published,
        video=data.get("video") or {}, mmdim=mmdim, calib=data.get("calib") or {},
        distill=data.get("distill") or {}, variant=data.get("variant"), resolution=data.get("resolution"),
        allow_double_stream=bool(data.get("allow_double_stream", False)), spec=spec, raw=data,
    )


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def describe_recipes() -> list[tuple[str, str]]:
    out = []
    for name in available_recipes():
        try:
            out.append((name, load_recipe(name).description))
        except RecipeError as e:
            out.append((name, f"INVALID: {e}"))
    return out


def recipe_summary(recipe: Recipe) -> dict[str, Any]:
    return {"name": recipe.name, "backbone": recipe.backbone, "mmdim": recipe.mmdim}
