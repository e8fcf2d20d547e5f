"""Recipes: one YAML per backbone family under ``recipes/`` (see recipes/wan2.1.yaml).

A recipe is checked field by field on load, before any weight is read: unknown keys, wrong
types and impossible values each raise a :class:`RecipeError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from m4v_convert.errors import RecipeError
from m4v_convert.layers.mmdim import MMDiMConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
BACKBONES = ("wan", "pyramidflow")
# pyramidflow only: which release variant and transformer folder (diffusion_transformer_<resolution>)
PYRAMIDFLOW_VARIANTS = ("miniflux", "sd3")
PYRAMIDFLOW_RESOLUTIONS = ("384p", "768p")

# section → {field: (type(s), required)}
_SCHEMA: dict[str, dict[str, tuple]] = {
    "": {
        "name": (str, True), "description": (str, True), "backbone": (str, True),
        "default_layers": ((str, int), True), "published": (dict, False), "video": (dict, False),
        "mmdim": (dict, False), "calib": (dict, False), "distill": (dict, False),
        # pyramidflow only
        "variant": (str, False), "resolution": (str, False), "allow_double_stream": (bool, False),
    },
    "video": {"temporal_compression": (int, True), "spatial_compression": (int, True), "text_len": (int, True)},
    "calib": {
        "latent_frames": (int, True), "latent_height": (int, True), "latent_width": (int, True),
        "text_len": (int, True), "flow_shift": ((int, float), False), "num_samples": (int, False),
        "batch_size": (int, False), "eval_batches": (int, False), "seed": (int, False),
        "teacher_steps": (int, False),  # --teacher-calib: Euler steps per teacher sample
    },
    "distill": {"stage1": (dict, False), "stage2": (dict, False), "stage3": (dict, False),
                "stages": ((str, int, list), False), "train": (str, False), "lora_rank": (int, False),
                "lora_alpha": ((int, float), False)},
    "distill.stage1": {"steps": (int, False), "lr": ((int, float), False), "weight_decay": ((int, float), False),
                       "grad_clip": ((int, float), False), "batch_size": (int, False),
                       "checkpoint_every": (int, False)},
    "distill.stage2": {"steps": (int, False), "lr": ((int, float), False), "weight_decay": ((int, float), False),
                       "grad_clip": ((int, float), False), "batch_size": (int, False),
                       "checkpoint_every": (int, False), "feature_weight": ((int, float), False),
                       "output_weight": ((int, float), False)},
    "distill.stage3": {"steps": (int, False), "lr": ((int, float), False), "weight_decay": ((int, float), False),
                       "grad_clip": ((int, float), False), "batch_size": (int, False),
                       "checkpoint_every": (int, False)},
}
_MMDIM_FIXED = {"d_model", "nheads", "headdim", "d_state", "ngroups", "layer_index", "extra"}


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

    def stage1(self) -> dict:
        return dict(self.distill.get("stage1", {}))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["published"] = {k: str(v) for k, v in self.published.items()}
        return d


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__


def _check_section(data: dict, section: str, where: str) -> None:
    schema = _SCHEMA[section]
    label = f"{section}." if section else ""
    for key in data:
        if key not in schema:
            raise RecipeError(f"{where}: unknown field '{label}{key}' (expected one of: {', '.join(sorted(schema))})")
    for key, (typ, required) in schema.items():
        if key not in data:
            if required:
                raise RecipeError(f"{where}: missing required field '{label}{key}'")
            continue
        value = data[key]
        if (isinstance(value, bool) and typ is not bool) or not isinstance(value, typ):
            raise RecipeError(f"{where}: field '{label}{key}' must be {_type_name(typ)}, got {type(value).__name__} "
                              f"({value!r})")
        if isinstance(value, (int, float)) and value < 0:
            raise RecipeError(f"{where}: field '{label}{key}' must be >= 0, got {value}")


def _check_mmdim(mmdim: dict, where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(MMDiMConfig)}
    for key, value in mmdim.items():
        if key in _MMDIM_FIXED:
            raise RecipeError(f"{where}: field 'mmdim.{key}' is derived from the checkpoint and cannot be set")
        if key not in fields:
            raise RecipeError(f"{where}: unknown field 'mmdim.{key}' (MMDiMConfig has: "
                              f"{', '.join(sorted(set(fields) - _MMDIM_FIXED))})")
        default = fields[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise RecipeError(f"{where}: field 'mmdim.{key}' must be true or false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"{where}: field 'mmdim.{key}' must be a number, got {value!r}")
        if isinstance(default, str) and not isinstance(value, str):
            raise RecipeError(f"{where}: field 'mmdim.{key}' must be a string, got {value!r}")
    try:  # let the block validate choices (e.g. bc_norm, conv_activation)
        from m4v_convert.layers.mmdim import MMDiM

        MMDiM(MMDiMConfig(d_model=8, nheads=2, headdim=4, **mmdim), device="meta")
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: invalid mmdim settings: {e}") from None


def _check_backbone_fields(data: dict, where: str) -> None:
    pyramid_only = [k for k in ("variant", "resolution", "allow_double_stream") if k in data]
    if data["backbone"] != "pyramidflow":
        if pyramid_only:
            raise RecipeError(f"{where}: field '{pyramid_only[0]}' is only used by backbone 'pyramidflow'")
        return
    for key, allowed in (("variant", PYRAMIDFLOW_VARIANTS), ("resolution", PYRAMIDFLOW_RESOLUTIONS)):
        if key not in data:
            raise RecipeError(f"{where}: backbone 'pyramidflow' needs field '{key}' (one of {list(allowed)})")
        if data[key] not in allowed:
            raise RecipeError(f"{where}: field '{key}' must be one of {list(allowed)}, got {data[key]!r}")


def _check_distill(distill: dict, where: str) -> None:
    """Values the type check cannot judge: stage list, train mode, strictly positive sizes."""
    from m4v_convert.distill.params import TRAIN_MODES

    if "stages" in distill:
        raw = distill["stages"]
        items = raw if isinstance(raw, list) else str(raw).replace(" ", "").split(",")
        if not items or any(str(s) not in ("1", "2", "3") for s in items):
            raise RecipeError(f"{where}: field 'distill.stages' must list stages among 1, 2, 3 (e.g. '1,2,3'), "
                              f"got {raw!r}")
    if distill.get("train", "mmdim") not in TRAIN_MODES:
        raise RecipeError(f"{where}: field 'distill.train' must be one of {list(TRAIN_MODES)}, "
                          f"got {distill['train']!r}")
    if distill.get("lora_rank", 1) < 1:
        raise RecipeError(f"{where}: field 'distill.lora_rank' must be >= 1, got {distill['lora_rank']}")
    for stage in ("stage1", "stage2", "stage3"):
        section = distill.get(stage, {})
        for key in ("lr", "batch_size"):
            if key in section and section[key] <= 0:
                raise RecipeError(f"{where}: field 'distill.{stage}.{key}' must be > 0, got {section[key]}")


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a shipped recipe by name (``wan2.1``) or any YAML file by path."""
    path = Path(name_or_path).expanduser()
    if path.suffix not in (".yaml", ".yml") and not path.is_file():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(available_recipes()) or "none"
        raise RecipeError(f"unknown recipe {str(name_or_path)!r}: no file {path} (shipped recipes: {known})")
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{where}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of fields at the top level, got {type(data).__name__}")
    _check_section(data, "", where)
    for section in ("video", "calib", "distill"):
        if section in data:
            _check_section(data[section], section, where)
    for stage in ("stage1", "stage2", "stage3"):
        if stage in data.get("distill", {}):
            _check_section(data["distill"][stage], f"distill.{stage}", where)
    _check_distill(data.get("distill", {}), where)
    if data["backbone"] not in BACKBONES:
        raise RecipeError(f"{where}: field 'backbone' must be one of {list(BACKBONES)}, got {data['backbone']!r}")
    _check_backbone_fields(data, where)
    mmdim = data.get("mmdim", {}) or {}
    _check_mmdim(mmdim, where)
    published = {}
    for key, rel in (data.get("published") or {}).items():
        p = (path.parent / rel).resolve()
        if not p.is_file():
            raise RecipeError(f"{where}: field 'published.{key}' points to {p}, which does not exist")
        published[str(key)] = p
    return Recipe(
        name=data["name"], description=data["description"], backbone=data["backbone"],
        default_layers=str(data["default_layers"]), path=path.resolve(), published=published,
        video=data.get("video", {}), mmdim=mmdim, calib=data.get("calib", {}), distill=data.get("distill", {}),
        variant=data.get("variant"), resolution=data.get("resolution"),
        allow_double_stream=bool(data.get("allow_double_stream", False)),
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
