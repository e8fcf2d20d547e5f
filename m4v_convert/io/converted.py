"""Write and read converted models in the diffusers folder layout.

``config.json`` (the model's own config plus an ``m4v`` entry recording the conversion) and
``diffusion_pytorch_model.safetensors`` (sharded with a diffusers index when large), whose
safetensors metadata carries ``format: pt`` plus the toolkit version, source, recipe and layers.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from m4v_convert.errors import CheckpointError, error_reason
from m4v_convert.io.safetensors_io import tensor_bytes, write_streamed

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _converted_class(cfg: dict):
    """The class that rebuilds a saved conversion, found through the backbone registry."""
    from m4v_convert.backbones import registry

    found = registry.find_converted(cfg)
    return found[1] if found else None


def converted_class(cfg: dict) -> type:
    """The converted class a saved ``config.json`` (or its ``_class_name`` and ``m4v`` entries) names;
    what a converted pipeline's ``transformer/m4v_transformer.py`` asks for (io/pipeline.py)."""
    cls = _converted_class(cfg)
    if cls is None:
        raise CheckpointError(f"no converted class for {cfg.get('_class_name')!r} in this m4v-convert "
                              f"({m4v_convert_version()}): is it the version that wrote the model?")
    return cls


_LOADER = '''"""The class of the converted transformer in this folder, from the installed m4v-convert.

diffusers runs this file for AutoModel.from_pretrained(folder, trust_remote_code=True) (config.json's
auto_map) and for DiffusionPipeline.from_pretrained(pipeline_folder, trust_remote_code=True)
(model_index.json): it only imports the toolkit; config.json and the weights beside it hold the model.
"""

from m4v_convert.io.converted import converted_class

{name} = converted_class({stub!r})
'''


def write_loader_module(folder, class_name: str, config: dict) -> Path:
    """``folder/m4v_transformer.py``, the module config.json's ``auto_map`` and a converted pipeline's
    model_index.json name."""
    from m4v_convert.models.converted import LOADER_MODULE

    m4v = config.get("m4v") or {}
    stub = {"_class_name": class_name, "m4v": {k: m4v[k] for k in ("generic", "base_class") if k in m4v}}
    path = Path(folder) / f"{LOADER_MODULE}.py"
    path.write_text(_LOADER.format(name=class_name, stub=stub))
    return path


def m4v_convert_version() -> str:
    import m4v_convert

    return m4v_convert.__version__


def save_converted(model, folder: Path, metadata: dict[str, str], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   tensors: Iterator[tuple[str, torch.Tensor]] | None = None) -> list[str]:
    """Write ``model`` (a converted diffusers ModelMixin) into ``folder``; returns the file names.

    tensors: the state dict's full tensors in its order, when they come one at a time (a sharded
    model gathers them: ``distill/sharding.full_tensors``); default the state dict itself. The files
    are written one tensor at a time either way."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    write_loader_module(folder, type(model).__name__, dict(model.config))
    meta = {"format": "pt", **{k: str(v) for k, v in metadata.items()}}
    state = model.state_dict()  # sharded: the global shapes, no data gathered
    layout = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    if tensors is None:
        tensors = iter(state.items())
    shards, current, size = [], [], 0
    for entry in layout:
        nbytes = tensor_bytes(entry[1], entry[2])
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_streamed(folder / WEIGHTS_NAME, shards[0], tensors, metadata=meta)
        return ["config.json", WEIGHTS_NAME]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_streamed(folder / name, shard, itertools.islice(tensors, len(shard)), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k, _, _ in shard})
    total = sum(tensor_bytes(s, d) for _, s, d in layout)
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return ["config.json", INDEX_NAME, *names]


def resolve_converted_folder(folder) -> Path:
    """``folder`` itself or, when it has no config.json, its single subfolder holding a converted
    model: ``diffusion_transformer_*`` (PyramidFlow conversions keep the release's folder layout)
    or the ``transformer/`` of a converted pipeline folder."""
    folder = Path(folder).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        subs = [p for p in sorted(folder.glob("diffusion_transformer_*")) if (p / "config.json").is_file()]
        if not subs:
            subs = [p for p in sorted(folder.iterdir()) if p.is_dir() and _is_converted(p / "config.json")]
        if len(subs) == 1:
            return subs[0]
    return folder


def _is_converted(path: Path) -> bool:
    try:
        return path.is_file() and "m4v" in json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def read_converted_config(folder: Path) -> dict:
    folder = resolve_converted_folder(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a converted model written by m4v-convert)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a converted model written by m4v-convert)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if "m4v" not in cfg or _converted_class(cfg) is None:
        raise CheckpointError(
            f"{folder}: not a converted model (config.json has no 'm4v' entry / class "
            f"{cfg.get('_class_name')!r}); convert it first with m4v-convert"
        )
    return cfg


def check_weights_match_config(folder: Path, cls: type, cfg: dict) -> None:
    """Refuse a converted folder whose ``config.json`` and weights disagree (an edited config, a
    converted layer missing from one of them, a file from another conversion), from the model built
    on the meta device and the safetensors headers, before any weight is read."""
    from m4v_convert.io.safetensors_io import read_header

    from m4v_convert.models.converted import strip_loader_entries

    try:
        with torch.device("meta"):
            model = cls.from_config(strip_loader_entries({k: v for k, v in cfg.items() if not k.startswith("_")}))
    except Exception as e:  # noqa: BLE001 (any failure to build from this config is the config's fault)
        raise CheckpointError(f"{folder}/config.json: cannot build {cls.__name__} from it "
                              f"({type(e).__name__}: {error_reason(e)}); was it edited?") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: info.shape for k, info in read_header(folder).items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = [f"{k} is {list(found[k])}, config needs {list(expected[k])}" for k in sorted(expected)
             if k in found and found[k] != expected[k]]
    problems = [f"{len(v)} {what}: {', '.join(v[:3])}{', ...' if len(v) > 3 else ''}"
                for v, what in ((missing, "tensor(s) missing from the weights"),
                                (unexpected, "tensor(s) the config does not describe"), (wrong, "shape mismatch(es)"))
                if v]
    if problems:
        raise CheckpointError(f"{folder}: the weights do not match config.json (converted layers "
                              f"{(cfg.get('m4v') or {}).get('converted_layers', '?')}): " + "; ".join(problems))


def load_converted(folder, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a converted model; returns the diffusers ``ModelMixin`` that was saved, in eval mode.

    Parameters are copied into freshly allocated memory (not left memory-mapped from the file):
    CPU BLAS kernels may round differently for differently aligned buffers, and the copy makes
    the reloaded model bit-identical to the one that was saved.
    """
    folder = resolve_converted_folder(folder)
    cfg = read_converted_config(folder)
    cls = _converted_class(cfg)
    check_weights_match_config(folder, cls, cfg)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError, IndexError, NotImplementedError) as e:
        raise CheckpointError(f"{folder}: cannot load converted model: {error_reason(e)}") from None
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for name, b in list(model.named_buffers()):
            if b is not None and b.device.type != "meta":
                b.data = b.data.clone()
    return model.to(device).eval()
