"""Load / save PyramidFlow DiTs in the release's on-disk layout.

Layout (HF ``rain1011/pyramid-flow-miniflux`` and ``rain1011/pyramid-flow-sd3``)::

    <root>/diffusion_transformer_384p/{config.json, diffusion_pytorch_model.safetensors}
    <root>/diffusion_transformer_768p/{config.json, diffusion_pytorch_model.safetensors}

The weights are fp32 on disk. ``config.json``'s ``_class_name`` says the variant:
``PyramidFluxTransformer`` (miniFLUX) or ``PyramidDiffusionMMDiT`` (SD3).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from m4v_convert.errors import CheckpointError
from m4v_convert.io.safetensors_io import is_float_dtype

from .miniflux import PyramidFluxTransformer
from .sd3 import PyramidDiffusionMMDiT

VARIANTS = {"miniflux": PyramidFluxTransformer, "sd3": PyramidDiffusionMMDiT}
CLASS_NAMES = {"PyramidFluxTransformer": "miniflux", "PyramidDiffusionMMDiT": "sd3"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
_FOLDER_RE = re.compile(r"^diffusion_transformer_(\w+)$")
_RESOLUTION_PREFERENCE = ("768p", "384p")


def transformer_folder_name(resolution: str) -> str:
    return f"diffusion_transformer_{resolution}"


def _resolve_folder(path: Path, resolution: str | None) -> Path:
    """The ``diffusion_transformer_*`` folder to load from ``path`` (root or the folder itself)."""
    if not path.exists():
        raise CheckpointError(f"PyramidFlow checkpoint not found: {path} does not exist")
    if (path / CONFIG_NAME).is_file():
        match = _FOLDER_RE.match(path.name)
        if resolution is not None and match and match.group(1) != resolution:
            raise CheckpointError(
                f"{path} holds the {match.group(1)} transformer, but resolution {resolution!r} was "
                f"requested: pass the model root or its {transformer_folder_name(resolution)}/ folder"
            )
        return path
    found = {m.group(1): p for p in sorted(path.iterdir()) if p.is_dir() and (m := _FOLDER_RE.match(p.name))}
    if not found:
        raise CheckpointError(
            f"{path} is not a PyramidFlow model folder: it has no config.json and no "
            "diffusion_transformer_{384p,768p}/ subfolder"
        )
    if resolution is not None:
        if resolution not in found:
            raise CheckpointError(
                f"{path} has no {transformer_folder_name(resolution)}/ subfolder "
                f"(found: {', '.join(transformer_folder_name(r) for r in found)})"
            )
        return found[resolution]
    for r in _RESOLUTION_PREFERENCE:
        if r in found:
            return found[r]
    if len(found) == 1:
        return next(iter(found.values()))
    raise CheckpointError(
        f"{path} holds several transformers ({', '.join(sorted(found))}); pick one with resolution=..."
    )


def _load_json(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file} not found")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return config


def _read_config(folder: Path) -> dict:
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}")
    return _load_json(folder / CONFIG_NAME)


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    if (folder / INDEX_NAME).is_file():
        try:
            index = json.loads((folder / INDEX_NAME).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{folder / INDEX_NAME} is not a valid safetensors index ({e})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder} is missing weight shards listed in its index: {', '.join(missing)}")
        return [folder / n for n in names]
    if (folder / "diffusion_pytorch_model.bin").is_file():
        raise CheckpointError(
            f"{folder} only has diffusion_pytorch_model.bin (pickle); convert it to "
            f"{WEIGHTS_NAME} (the current release ships safetensors) and retry"
        )
    raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")


def _open_weights(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Key → (file, shape) of every tensor, read from the safetensors headers only."""
    keys: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    if not is_float_dtype(str(sl.get_dtype())):  # the model would cast it silently
                        raise CheckpointError(f"{f}: tensor {k} holds integers ({sl.get_dtype()}); a PyramidFlow "
                                              "checkpoint's weights are floating point")
                    keys[k] = (f, tuple(sl.get_shape()))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises several types for a damaged header
            raise CheckpointError(f"{f} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return keys


def _detect_variant(config: dict, keys) -> str | None:
    name = config.get("_class_name")
    if name in CLASS_NAMES:
        return CLASS_NAMES[name]
    if any(k.startswith("single_transformer_blocks.") for k in keys):
        return "miniflux"
    if "pos_embed.proj.weight" in keys:
        return "sd3"
    return None


def _build(cls, config: dict, device) -> torch.nn.Module:
    try:
        with torch.device(device):
            return cls.from_config(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json does not describe a valid {cls.__name__}: {e}") from None


def _key_summary(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def build_pyramidflow(config: dict | str | os.PathLike, device="meta") -> torch.nn.Module:
    """Instantiate a PyramidFlow DiT from a config dict or JSON file (default: on ``meta``, no memory).

    Used for full-size FLOPs and shape checks with ``recipes/configs/pyramidflow-*.json``.
    """
    if not isinstance(config, dict):
        config = _load_json(Path(config))
    variant = CLASS_NAMES.get(config.get("_class_name"))
    if variant is None:
        raise CheckpointError(f"config _class_name {config.get('_class_name')!r} is not a PyramidFlow DiT")
    return _build(VARIANTS[variant], config, device)


def load_pyramidflow(
    path: str | os.PathLike,
    variant: str | None = None,
    resolution: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load a released PyramidFlow DiT.

    Args:
        path: the model root (holding ``diffusion_transformer_384p/`` and/or ``..._768p/``) or one
            ``diffusion_transformer_*`` folder.
        variant: ``"miniflux"`` or ``"sd3"`` to insist on one (None: from ``config.json``).
        resolution: ``"384p"`` or ``"768p"`` (None: 768p if present, else 384p).
        dtype: ``torch.bfloat16`` (default) or ``torch.float32``; float16 is refused.
        device: where the weights go; ``"meta"``: the model built and checked against the files'
            names and shapes, no weight read.

    Raises:
        CheckpointError: missing folder/file, wrong variant or resolution, corrupt file, missing,
            unexpected or mis-shaped keys, float16 requested.
    """
    if dtype == torch.float16:
        raise CheckpointError(
            "PyramidFlow must run in bfloat16 or float32: its activations overflow float16 "
            "(use dtype=torch.bfloat16)"
        )
    if dtype not in (torch.bfloat16, torch.float32):
        raise CheckpointError(f"dtype {dtype} is not supported for PyramidFlow; use torch.bfloat16 or torch.float32")
    if variant is not None and variant not in VARIANTS:
        raise CheckpointError(f"variant {variant!r} is not a PyramidFlow variant (expected one of {sorted(VARIANTS)})")

    folder = _resolve_folder(Path(path), resolution)
    config = _read_config(folder)
    files = _weight_files(folder)
    on_disk = _open_weights(files)
    found = _detect_variant(config, on_disk)
    if found is None:
        raise CheckpointError(f"{folder} is neither a PyramidFlow miniFLUX nor an SD3 transformer")
    if variant is not None and found != variant:
        raise CheckpointError(
            f"{folder} holds the PyramidFlow {found} transformer, not the {variant} one "
            f"(download the pyramid-flow-{variant} release for that variant)"
        )

    model = _build(VARIANTS[found], config, "meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = expected.keys() - on_disk.keys()
    unexpected = on_disk.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_key_summary(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_key_summary(unexpected)}")
        raise CheckpointError(f"{folder} does not match its config.json ({'; '.join(parts)})")
    bad_shapes = [f"{k} {on_disk[k][1]} vs {s}" for k, s in expected.items() if on_disk[k][1] != s]
    if bad_shapes:
        raise CheckpointError(f"{folder} has tensors of the wrong shape for its config.json: {_key_summary(bad_shapes, 4)}")

    if torch.device(device).type == "meta":  # names and shapes checked; no weight read (the memory plan)
        return model.to(dtype).eval()
    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for k in st.keys():
                    t = st.get_tensor(k)
                    # a copy: get_tensor views the mapped file at unaligned offsets, which keeps the file
                    # mapped and changes matmul summation order (wan/load.py's _own_cpu_tensors says more)
                    state[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
        except Exception as e:
            raise CheckpointError(f"{f} could not be read ({type(e).__name__}: {e})") from None
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{folder}: tensors left uninitialized after loading: {_key_summary(leftover)}")
    return model.eval()


def save_pyramidflow(model: torch.nn.Module, root: str | os.PathLike, resolution: str) -> Path:
    """Write ``model`` as ``<root>/diffusion_transformer_<resolution>/`` (config + fp32 safetensors).

    Returns the folder written.
    """
    if type(model).__name__ not in CLASS_NAMES:
        raise CheckpointError(f"save_pyramidflow expects a PyramidFlow DiT, got {type(model).__name__}")
    if not _FOLDER_RE.match(transformer_folder_name(resolution)):
        raise CheckpointError(f"resolution {resolution!r} is not a valid folder suffix (e.g. '384p', '768p')")
    folder = Path(root) / transformer_folder_name(resolution)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    state = {
        k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder
