"""Find and load Wan2.1 transformers (diffusers ``WanTransformer3DModel``) from local files only.

Accepted inputs (the layout is decided by the tensor names, never by file names):

* a diffusers model folder: ``config.json`` (``_class_name: WanTransformer3DModel``) plus
  ``diffusion_pytorch_model.safetensors`` or a sharded ``...safetensors.index.json``;
* a diffusers pipeline folder: ``model_index.json`` plus ``transformer/`` holding the above;
* the original Wan release layout: ``config.json`` of the Wan repo (``dim``, ``num_heads``,
  ``num_layers``, ``ffn_dim``, ``in_dim``, ``out_dim``, ``freq_dim``, ``eps``, ``model_type``, ...)
  plus ``diffusion_pytorch_model*.safetensors`` (possibly sharded) with the original tensor names
  (``blocks.N.self_attn.q``, ``cross_attn``, ``ffn.0/2``, ``modulation``, ``head.head``, ...);
* a single ``.safetensors`` file with the original names (optionally prefixed with
  ``model.diffusion_model.``, as ComfyUI repackages them). Its config is given by the caller or
  inferred from tensor shapes; see :func:`infer_wan_original_config`.

Original-layout tensors are renamed by diffusers' own single-file converter
(``diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers``), then loaded with
``load_state_dict(strict=True)`` into a ``WanTransformer3DModel`` built locally from the mapped
config. Nothing here touches a model hub (``HF_HUB_OFFLINE=1`` is set, ``local_files_only=True``).

Every problem with the user's input is a :class:`m4v_convert.errors.CheckpointError` whose
one-line message names the path and what was expected.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from m4v_convert.errors import CheckpointError
from m4v_convert.io.safetensors_io import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    _resolve,
    refuse_integer_weights,
    read_header,
    read_state_dict,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = [
    "WanCheckpoint",
    "find_wan_checkpoint",
    "load_wan_transformer",
    "wan_original_config_to_diffusers",
    "infer_wan_original_config",
    "wan_key_to_original",
    "WAN_CLASS_NAME",
    "WAN_HEAD_DIM",
]

WAN_CLASS_NAME = "WanTransformer3DModel"
ORIGINAL_CLASS_NAME = "WanModel"  # `_class_name` in the config.json of the original Wan release
#: Head size of every published Wan2.1/2.2 transformer (1.3B: 1536 = 12 x 128, 14B: 5120 = 40 x 128).
#: Used only to infer ``num_heads`` of a bare original-layout file; override with ``num_heads=``.
WAN_HEAD_DIM = 128
COMFY_PREFIX = "model.diffusion_model."

Kind = Literal["diffusers", "original"]


# --------------------------------------------------------------------------------------------------
# Key-name table: diffusers -> original Wan (the inverse of diffusers' converter, for T2V and I2V).
# Used to write original-layout test checkpoints and to name missing keys in original terms.
# --------------------------------------------------------------------------------------------------

_TOP_LEVEL_TO_ORIGINAL = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}

_BLOCK_TO_ORIGINAL = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    # diffusers' norm2 is the (affine) LayerNorm before cross-attention; the original calls it norm3
    # (the original norm2, before the FFN, has no parameters -- nor has diffusers' norm3).
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def wan_key_to_original(key: str) -> str:
    """Original Wan tensor name of a diffusers ``WanTransformer3DModel`` state-dict key.

    >>> wan_key_to_original("blocks.3.attn1.to_out.0.weight")
    'blocks.3.self_attn.o.weight'
    """
    prefix, rest, table = "", key, _TOP_LEVEL_TO_ORIGINAL
    m = re.match(r"(blocks\.\d+\.)(.*)$", key)
    if m:
        prefix, rest, table = m.group(1), m.group(2), _BLOCK_TO_ORIGINAL
    for module in sorted(table, key=len, reverse=True):
        if rest == module or rest.startswith(module + "."):
            return prefix + table[module] + rest[len(module) :]
    raise KeyError(f"no original Wan name known for diffusers key {key!r}")


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def _wan_cls():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


def _init_params() -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(_wan_cls().__init__).parameters)
    params.pop("self", None)
    return params


def _diffusers_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """WanTransformer3DModel init kwargs of a diffusers config (unknown keys dropped, as diffusers does)."""
    params = _init_params()
    out = {k: v for k, v in cfg.items() if k in params}
    if "patch_size" in out and out["patch_size"] is not None:
        out["patch_size"] = tuple(out["patch_size"])
    return out


def wan_original_config_to_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Map an original Wan ``config.json`` (``WanModel`` kwargs) to ``WanTransformer3DModel`` kwargs.

    Keys the released config.json files omit take the original ``WanModel`` defaults
    (``patch_size=(1, 2, 2)``, ``text_dim=4096``, ``qk_norm=True``, ``cross_attn_norm=True``,
    ``eps=1e-6``). ``rope_max_seq_len`` is 1024, as in the original ``rope_params(1024, ...)``.
    I2V models (``model_type: "i2v"``) get ``image_dim=1280`` and ``added_kv_proj_dim=dim``.
    """
    missing = [k for k in ("dim", "num_heads", "num_layers", "ffn_dim", "in_dim", "out_dim") if k not in cfg]
    if missing:
        raise CheckpointError(f"original Wan config lacks {', '.join(missing)}")
    dim, heads = int(cfg["dim"]), int(cfg["num_heads"])
    if heads <= 0 or dim % heads:
        raise CheckpointError(f"original Wan config: dim={dim} is not divisible by num_heads={heads}")
    window = cfg.get("window_size", (-1, -1))
    if window is not None and tuple(window) != (-1, -1):
        raise CheckpointError(
            f"original Wan config: window_size={list(window)} (local attention) is not supported by WanTransformer3DModel"
        )
    model_type = cfg.get("model_type", "t2v")
    if model_type not in ("t2v", "i2v", "ti2v"):
        raise CheckpointError(
            f"original Wan config: model_type {model_type!r} is not supported (expected t2v, i2v or ti2v)"
        )
    qk_norm = cfg.get("qk_norm", True)
    out: dict[str, Any] = {
        "patch_size": tuple(cfg.get("patch_size", (1, 2, 2))),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": int(cfg["in_dim"]),
        "out_channels": int(cfg["out_dim"]),
        "text_dim": int(cfg.get("text_dim", 4096)),
        "freq_dim": int(cfg.get("freq_dim", 256)),
        "ffn_dim": int(cfg["ffn_dim"]),
        "num_layers": int(cfg["num_layers"]),
        "cross_attn_norm": bool(cfg.get("cross_attn_norm", True)),
        "qk_norm": "rms_norm_across_heads" if qk_norm is True else (qk_norm or None),
        "eps": float(cfg.get("eps", 1e-6)),
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
    }
    if model_type == "i2v":
        out["image_dim"] = int(cfg.get("image_dim", 1280))
        out["added_kv_proj_dim"] = dim
    return out


def infer_wan_original_config(
    shapes: Mapping[str, Iterable[int]], num_heads: int | None = None
) -> dict[str, Any]:
    """An original-style Wan config inferred from the shapes of original-layout tensors.

    Everything but the head count and ``eps`` follows from shapes. ``num_heads`` defaults to
    ``dim // 128`` (:data:`WAN_HEAD_DIM`, true of all published Wan models); pass ``num_heads`` for
    anything else. ``eps`` is taken as 1e-6 (all published models).
    """
    shp = {k: tuple(int(d) for d in v) for k, v in shapes.items()}

    def need(key: str) -> tuple[int, ...]:
        if key not in shp:
            raise CheckpointError(f"cannot infer the Wan config: tensor {key!r} is missing")
        return shp[key]

    pe = need("patch_embedding.weight")
    if len(pe) != 5:
        raise CheckpointError(f"cannot infer the Wan config: patch_embedding.weight has shape {list(pe)}, expected 5-D")
    dim, in_dim, patch = pe[0], pe[1], pe[2:]
    out_dim = need("head.head.weight")[0] // math.prod(patch)
    blocks = sorted({int(m.group(1)) for k in shp if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(f"cannot infer the Wan config: block indices are not 0..N-1 ({blocks[:5]}...)")
    if num_heads is None:
        if dim % WAN_HEAD_DIM:
            raise CheckpointError(
                f"cannot infer the number of attention heads: dim={dim} is not a multiple of {WAN_HEAD_DIM} "
                f"(the head size of all published Wan models); pass num_heads"
            )
        num_heads = dim // WAN_HEAD_DIM
    cfg: dict[str, Any] = {
        "_class_name": ORIGINAL_CLASS_NAME,
        "model_type": "i2v" if any(k.startswith("img_emb.") for k in shp) else "t2v",
        "patch_size": list(patch),
        "dim": dim,
        "in_dim": in_dim,
        "out_dim": out_dim,
        "ffn_dim": need("blocks.0.ffn.0.weight")[0],
        "freq_dim": need("time_embedding.0.weight")[1],
        "text_dim": need("text_embedding.0.weight")[1],
        "num_heads": int(num_heads),
        "num_layers": len(blocks),
        "qk_norm": "blocks.0.self_attn.norm_q.weight" in shp,
        "cross_attn_norm": "blocks.0.norm3.weight" in shp,
        "eps": 1e-6,
    }
    if "img_emb.proj.0.weight" in shp:
        cfg["image_dim"] = shp["img_emb.proj.0.weight"][0]
    return cfg


# --------------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------------


def _brief(items: Iterable[str], n: int = 3) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _is_original(keys: set[str]) -> bool:
    return "head.modulation" in keys or any(".self_attn.q." in k or k.startswith("time_projection.") for k in keys)


def _is_diffusers(keys: set[str]) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1.to_q." in k for k in keys)


def _guess_architecture(keys: set[str]) -> str:
    def has(s: str) -> bool:
        return any(s in k for k in keys)

    if has("vace_blocks."):
        return "Wan VACE (WanVACETransformer3DModel)"
    if has("motion_encoder.") or has("face_adapter."):
        return "Wan-Animate (WanAnimateTransformer3DModel)"
    if has("single_transformer_blocks."):
        return "a Flux-style transformer (FluxTransformer2DModel, e.g. PyramidFlow miniFLUX)"
    if has("double_blocks.") and has("txt_in."):
        return "HunyuanVideo (original layout)"
    if has("double_blocks."):
        return "Flux (original BFL layout)"
    if has("joint_blocks."):
        return "SD3 (original layout)"
    if has("patch_embed.text_proj"):
        return "CogVideoX (CogVideoXTransformer3DModel)"
    if has("transformer_blocks.") and has("context_embedder."):
        return "SD3 (SD3Transformer2DModel)"
    if has("adaln_single."):
        return "a PixArt/LTX-Video-style transformer"
    if has("down_blocks.") or has("input_blocks."):
        return "a UNet"
    if has("encoder.") and has("decoder."):
        return "a VAE"
    if has("SelfAttention.") or has("shared.weight"):
        return "a T5 text encoder"
    return f"an unknown architecture (tensors {_brief(sorted(keys))})"


def _split_prefix(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith(COMFY_PREFIX) for k in keys) and not any(
        k in ("patch_embedding.weight", "head.modulation", "proj_out.weight") for k in keys
    ):
        return COMFY_PREFIX
    return ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _looks_original_cfg(cfg: Mapping[str, Any]) -> bool:
    return "dim" in cfg and "num_heads" in cfg


def _check_config_class(cfg: Mapping[str, Any], where: str) -> None:
    cls = cfg.get("_class_name")
    if cls in (WAN_CLASS_NAME, ORIGINAL_CLASS_NAME):
        return
    if cls is not None:
        raise CheckpointError(
            f"{where} describes a {cls}, not a Wan2.1 transformer; the wan2.1 recipe expects {WAN_CLASS_NAME}"
        )
    if _looks_original_cfg(cfg) or ("num_attention_heads" in cfg and "attention_head_dim" in cfg and "ffn_dim" in cfg):
        return
    arch = cfg.get("architectures") or cfg.get("model_type")
    if isinstance(arch, (list, tuple)):
        arch = "/".join(map(str, arch))
    what = f"looks like a {arch} config" if arch else "has no _class_name and no Wan keys (dim, num_heads, ...)"
    raise CheckpointError(f"{where} {what}; the wan2.1 recipe expects a {WAN_CLASS_NAME} config")


def _to_diffusers_config(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    _check_config_class(cfg, where)
    try:
        if cfg.get("_class_name") == ORIGINAL_CLASS_NAME or _looks_original_cfg(cfg):
            return wan_original_config_to_diffusers(cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return _diffusers_kwargs(cfg)


def _check_pipeline_index(index: Path) -> None:
    data = _read_json(index)
    entry = data.get("transformer")
    pipe = data.get("_class_name", "pipeline")
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        raise CheckpointError(f"{index}: this {pipe} has no transformer component (expected {WAN_CLASS_NAME})")
    if entry[1] != WAN_CLASS_NAME:
        raise CheckpointError(
            f"{index}: the transformer of this {pipe} is a {entry[1]}; the wan2.1 recipe expects {WAN_CLASS_NAME}"
        )


# --------------------------------------------------------------------------------------------------
# Validation against the config
# --------------------------------------------------------------------------------------------------


def _expected_shapes(config: Mapping[str, Any], where: str) -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            model = _wan_cls()(**config)
    except Exception as e:
        raise CheckpointError(f"{where}: cannot build {WAN_CLASS_NAME} from the config: {e}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _ignored_unexpected(key: str) -> bool:
    patterns = getattr(_wan_cls(), "_keys_to_ignore_on_load_unexpected", None) or []
    return any(re.search(p, key) for p in patterns)


def _convert_original(state: dict[str, Any]) -> dict[str, Any]:
    """Rename original Wan tensors with diffusers' own single-file converter (looked up at call time)."""
    from diffusers.loaders import single_file_utils

    return single_file_utils.convert_wan_transformer_to_diffusers(dict(state))


def _validate(
    found: Mapping[str, tuple[int, ...]],
    config: Mapping[str, Any],
    where: str,
    kind: Kind,
    original_names: Mapping[str, str] | None = None,
) -> None:
    expected = _expected_shapes(config, where)

    def name(k: str) -> str:  # report names in the layout the user has
        if kind != "original":
            return k
        if original_names and k in original_names:
            return original_names[k]
        try:
            return wan_key_to_original(k)
        except KeyError:
            return k

    missing = sorted(name(k) for k in expected.keys() - found.keys())
    unexpected = sorted(name(k) for k in found.keys() - expected.keys() if not _ignored_unexpected(k))
    wrong = [
        f"{name(k)} is {list(found[k])} but the config needs {list(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_brief(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_brief(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {_brief(wrong, 2)}")
    if problems:
        dims = (
            f"{config.get('num_layers')} layers, {config.get('num_attention_heads')} heads x "
            f"{config.get('attention_head_dim')}"
        )
        raise CheckpointError(
            f"{where} does not match its {WAN_CLASS_NAME} config ({dims}): " + "; ".join(problems)
        )


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WanCheckpoint:
    """A located and validated (names and shapes, from headers only) Wan2.1 checkpoint.

    ``config`` always holds ``WanTransformer3DModel`` init kwargs, whatever the layout on disk;
    ``source_config`` is the config as found (diffusers or original style), given, or inferred.
    """

    kind: Kind  # tensor naming on disk
    root: Path  # folder handed to from_pretrained (the pipeline folder for pipelines), or the file's folder
    config: dict[str, Any]
    weight_files: tuple[Path, ...]
    subfolder: str | None = None  # "transformer" for pipeline folders
    config_source: str = ""  # path of the config.json, "given" or "inferred from tensor shapes"
    source_config: dict[str, Any] = field(default_factory=dict)
    key_prefix: str = ""  # e.g. "model.diffusion_model." for ComfyUI repackaged files
    use_from_pretrained: bool = False  # standard diffusers folder -> WanTransformer3DModel.from_pretrained

    @property
    def model_dir(self) -> Path:
        return self.root / self.subfolder if self.subfolder else self.root


def _as_config(config: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any] | None:
    if config is None:
        return None
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config).expanduser()
    if not path.is_file():
        raise CheckpointError(f"config file {path} does not exist")
    return _read_json(path)


def find_wan_checkpoint(
    path: str | os.PathLike,
    *,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    num_heads: int | None = None,
) -> WanCheckpoint:
    """Locate a Wan2.1 transformer checkpoint, work out its layout and config, and validate it.

    ``config`` (a dict or a JSON file, diffusers or original style) overrides any config.json;
    ``num_heads`` sets the head count when the config is inferred from shapes (default
    ``dim // 128``) and must agree with the config otherwise. Only safetensors headers are read.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist")
    if p.is_file() and p.name in ("config.json", "model_index.json"):
        p = p.parent
    given = _as_config(config)

    subfolder = None
    if p.is_dir():
        root = model_dir = p
        if (p / "model_index.json").is_file():
            _check_pipeline_index(p / "model_index.json")
            if not (p / "transformer").is_dir():
                raise CheckpointError(f"pipeline folder {p} has no transformer/ subfolder")
            model_dir, subfolder = p / "transformer", "transformer"
        elif (p / "transformer" / "config.json").is_file() and not any(p.glob("*.safetensors")):
            model_dir, subfolder = p / "transformer", "transformer"
        if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.safetensors.index.json")):
            if not any(model_dir.iterdir()):
                raise CheckpointError(f"{model_dir} is empty: expected a Wan2.1 checkpoint (config.json + {WEIGHTS_NAME})")
            pickles = [f.name for f in model_dir.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            if not pickles:
                raise CheckpointError(
                    f"no Wan2.1 checkpoint in {model_dir}: expected config.json + {WEIGHTS_NAME} (or a sharded "
                    f"index), a pipeline folder with model_index.json and transformer/, or the original Wan layout"
                )
        cfg_path = model_dir / "config.json"
        raw_cfg = _read_json(cfg_path) if cfg_path.is_file() else None
        where = str(model_dir)
        source = model_dir
    else:
        root = model_dir = p.parent
        cfg_path = model_dir / "config.json"
        raw_cfg = None  # a bare file: only a diffusers-named file may borrow a sibling config.json
        where = str(p)
        source = p

    if raw_cfg is not None:
        _check_config_class(raw_cfg, str(cfg_path))
    files, index = _resolve(source)
    header = read_header(source)
    prefix = _split_prefix(header)
    refuse_integer_weights({k: v for k, v in header.items() if k.startswith(prefix)}, where, "a Wan2.1 checkpoint")
    shapes = {k[len(prefix) :]: info.shape for k, info in header.items() if k.startswith(prefix)}
    keys = set(shapes)

    if _is_original(keys) and not _is_diffusers(keys):
        kind: Kind = "original"
    elif _is_diffusers(keys) and not _is_original(keys):
        kind = "diffusers"
    else:
        raise CheckpointError(
            f"{where} does not hold a Wan2.1 transformer: its tensors look like {_guess_architecture(keys)}; "
            f"the wan2.1 recipe expects {WAN_CLASS_NAME}"
        )
    for marker, what in (("vace_blocks.", "Wan VACE"), ("motion_encoder.", "Wan-Animate"), ("face_adapter.", "Wan-Animate")):
        if any(k.startswith(marker) for k in keys):
            raise CheckpointError(f"{where} is a {what} checkpoint; the wan2.1 recipe expects a plain {WAN_CLASS_NAME}")

    use_from_pretrained = False
    if given is not None:
        source_config, config_source = given, "given"
        cfg = _to_diffusers_config(given, "the given config")
    elif kind == "diffusers":
        if raw_cfg is None and p.is_file() and cfg_path.is_file():
            raw_cfg = _read_json(cfg_path)
            _check_config_class(raw_cfg, str(cfg_path))
        if raw_cfg is None:
            raise CheckpointError(
                f"{where} holds diffusers-named Wan tensors but no config.json next to them "
                f"(expected a {WAN_CLASS_NAME} config.json)"
            )
        if raw_cfg.get("_class_name") != WAN_CLASS_NAME:
            raise CheckpointError(
                f"{cfg_path}: _class_name is {raw_cfg.get('_class_name')!r} but the tensors use diffusers names; "
                f"expected {WAN_CLASS_NAME}"
            )
        source_config, config_source = raw_cfg, str(cfg_path)
        cfg = _diffusers_kwargs(raw_cfg)
        standard = files == [model_dir / WEIGHTS_NAME] or index == model_dir / WEIGHTS_INDEX_NAME
        use_from_pretrained = p.is_dir() and standard and not prefix
    elif raw_cfg is not None:
        source_config, config_source = raw_cfg, str(cfg_path)
        cfg = _to_diffusers_config(raw_cfg, str(cfg_path))
    else:
        try:
            source_config = infer_wan_original_config(shapes, num_heads=num_heads)
            cfg = wan_original_config_to_diffusers(source_config)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        config_source = "inferred from tensor shapes"

    heads = cfg.get("num_attention_heads", _init_params()["num_attention_heads"].default)
    if num_heads is not None and int(num_heads) != heads:
        raise CheckpointError(f"num_heads={num_heads} contradicts the config of {where} ({heads} heads)")

    original_names = None
    if kind == "original":
        meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        original_names = {}
        for k, t in meta.items():
            for new in _convert_original({k: t}):
                if new in original_names:
                    raise CheckpointError(
                        f"{where}: tensors {original_names[new]} and {k} both map to {new} in diffusers naming"
                    )
                original_names[new] = k
        found = {k: tuple(t.shape) for k, t in _convert_original(meta).items()}
    else:
        found = shapes
    _validate(found, cfg, where, kind, original_names)

    return WanCheckpoint(
        kind=kind,
        root=root,
        config=cfg,
        weight_files=tuple(files),
        subfolder=subfolder,
        config_source=config_source,
        source_config=dict(source_config),
        key_prefix=prefix,
        use_from_pretrained=use_from_pretrained,
    )


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r} (expected one of {', '.join(_DTYPES)})") from None


def _model_tensors(ckpt: WanCheckpoint, state: dict[str, torch.Tensor], dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors as stored (names with the file's prefix) → the model's: diffusers names, ignored keys
    dropped, ``dtype`` as ``from_pretrained(torch_dtype=...)`` applies it (``_keep_in_fp32_modules``
    stay in float32), each copied into memory the process owns (see :func:`_own_cpu_tensors`)."""
    if ckpt.key_prefix:
        state = {k[len(ckpt.key_prefix) :]: v for k, v in state.items()}
    if ckpt.kind == "original":
        state = _convert_original(state)
    state = {k: v for k, v in state.items() if not _ignored_unexpected(k)}
    keep = tuple(getattr(_wan_cls(), "_keep_in_fp32_modules", None) or ())
    for k, v in state.items():
        if v.is_floating_point():
            target = torch.float32 if any(m in k.split(".") for m in keep) else dtype
            state[k] = v.to(device=device, dtype=target, copy=True)
    return state


def empty_wan_transformer(ckpt: WanCheckpoint):
    """``ckpt``'s model with its parameters on the meta device, no weight read (its rope buffers,
    which no checkpoint holds, are real): for :func:`load_wan_part_` or a whole state dict."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return _wan_cls()(**ckpt.config)


def _load_from_state_dict(ckpt: WanCheckpoint, dtype: torch.dtype):
    state = read_state_dict(list(ckpt.weight_files), prefix_filter=ckpt.key_prefix or None)
    state = _model_tensors(ckpt, state, dtype)
    model = empty_wan_transformer(ckpt)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{ckpt.weight_files[0]}: cannot load into {WAN_CLASS_NAME}: {' '.join(first[:3])}") from None
    return model


@torch.no_grad()
def load_wan_part_(model, ckpt: WanCheckpoint, block: int | None, *, dtype: torch.dtype | str = torch.float32,
                   device: str | torch.device = "cpu") -> None:
    """Read one part of ``ckpt`` into ``model`` (from :func:`empty_wan_transformer`), in place:
    transformer block ``block``, or (None) everything outside the blocks. Only that part's tensors
    are read, its files opened for it alone, so no more of the checkpoint is mapped at once: a model
    loaded part by part and sharded as it goes (``--fsdp``) is never whole in one process."""

    def in_part(name: str) -> bool:  # stored names: the original layout numbers its blocks as diffusers does
        return name.startswith(f"blocks.{block}.") if block is not None else not name.startswith("blocks.")

    prefix = ckpt.key_prefix
    state = read_state_dict(list(ckpt.weight_files), prefix_filter=prefix or None,
                            keep=lambda key: in_part(key[len(prefix):]))
    state = _model_tensors(ckpt, state, _as_dtype(dtype), device)
    expected = {n for n in model.state_dict() if in_part(n)}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"{ckpt.weight_files[0]}: cannot load into {WAN_CLASS_NAME}: "
                              + (f"missing {_brief(missing)}" if missing else f"unexpected {_brief(extra)}"))
    model.load_state_dict(state, strict=False, assign=True)


def load_wan_transformer(
    path: str | os.PathLike | WanCheckpoint,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    num_heads: int | None = None,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
):
    """Load a Wan2.1 transformer as a diffusers ``WanTransformer3DModel`` (in eval mode).

    Diffusers folders and pipelines go through ``WanTransformer3DModel.from_pretrained(...,
    local_files_only=True)``; original-layout checkpoints through diffusers' single-file converter.
    As with ``from_pretrained(torch_dtype=...)``, the model's ``_keep_in_fp32_modules`` (time
    embedder, ``scale_shift_table``, norms) stay in float32 whatever ``dtype`` is.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    dtype = _as_dtype(dtype)
    ckpt = path if isinstance(path, WanCheckpoint) else find_wan_checkpoint(path, config=config, num_heads=num_heads)
    if ckpt.use_from_pretrained:
        try:
            model = _wan_cls().from_pretrained(
                str(ckpt.root),
                subfolder=ckpt.subfolder,
                local_files_only=True,
                torch_dtype=dtype,
            )
        except CheckpointError:
            raise
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{ckpt.model_dir}: diffusers could not load the Wan transformer: {reason}") from None
        if torch.device(device).type == "cpu":
            _own_cpu_tensors(model, ckpt.weight_files)
    else:
        model = _load_from_state_dict(ckpt, dtype)
    return model.to(device).eval()


@torch.no_grad()
def _own_cpu_tensors(model, weight_files: Sequence[Path] = ()) -> None:
    """Copy parameters and buffers into memory the process owns, one weight file at a time.

    On CPU, ``from_pretrained`` leaves tensors as views of the memory-mapped safetensors file, at
    offsets that are not 64-byte aligned. That (a) keeps the checkpoint file mapped, so writing an
    output over it would corrupt the live model, and (b) changes the SIMD summation order of matmuls,
    so outputs differ in the last bit from the same weights held in ordinary memory. A file's pages
    stay resident while any view of it lives, so the copies go file by file (the shard index's order,
    read from the headers): each shard's mapping is released before the next is touched, and loading
    peaks at the model plus one shard instead of twice the model.
    """
    import gc

    from m4v_convert.io.safetensors_io import read_header

    params = dict(model.named_parameters())
    order = [[k for k in read_header(f) if k in params] for f in weight_files]
    seen = {k for group in order for k in group}
    order.append([k for k in params if k not in seen])  # renamed on load, or not in any file
    for group in order:
        for name in group:
            p = params[name]
            if p.device.type == "cpu":
                p.data = p.data.clone(memory_format=torch.contiguous_format)
        gc.collect()  # the last view of this file gone: its mapping is released now
    for module in model.modules():
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.device.type == "cpu":
                module._buffers[name] = b.clone(memory_format=torch.contiguous_format)
