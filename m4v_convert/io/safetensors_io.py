"""Reading safetensors checkpoints: single files, plain folders and sharded folders.

Only safetensors is read here (no pickle). Every problem the user can cause -- a missing file, a
truncated or corrupt file, an index that names a missing shard, a key stored twice -- is raised as
:class:`m4v_convert.errors.CheckpointError` with a one-line message naming the offending file.

Folder resolution (:func:`resolve_weight_files`), in this order:

1. ``diffusion_pytorch_model.safetensors.index.json`` -> every shard in its ``weight_map``;
2. ``diffusion_pytorch_model.safetensors``;
3. exactly one other ``*.safetensors.index.json`` -> its shards;
4. ``diffusion_pytorch_model-*.safetensors`` shards without an index (sorted by name);
5. exactly one ``*.safetensors`` file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from m4v_convert.errors import CheckpointError

__all__ = [
    "TensorInfo",
    "resolve_weight_files",
    "read_header",
    "read_state_dict",
    "read_metadata",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

PathLike = str | os.PathLike
Source = PathLike | Sequence[PathLike]


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor (no data is read)."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "F32", "BF16"
    file: Path


def _brief(items: Iterable[str], n: int = 3) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _read_index(index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read shard index {index}: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"shard index {index} has no 'weight_map' (expected a safetensors index)")
    shards: list[Path] = []
    for name in dict.fromkeys(weight_map.values()):
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(f"shard index {index} names an invalid shard file {name!r}")
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointError(f"shard {shard} listed in {index.name} is missing")
        shards.append(shard)
    return shards


def resolve_weight_files(folder_or_file: PathLike) -> list[Path]:
    """The safetensors file(s) holding the weights of a file or a model folder (see module doc)."""
    return _resolve(folder_or_file)[0]


def _resolve(folder_or_file: PathLike) -> tuple[list[Path], Path | None]:
    """(weight files, the shard index they came from or None)."""
    p = Path(folder_or_file).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist")
    if p.is_file():
        if p.name.endswith(".safetensors.index.json"):
            return _read_index(p), p
        if p.suffix == ".safetensors":
            return [p], None
        if p.suffix in _PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{p} is a pickle-based checkpoint; only .safetensors files are read (convert it first)"
            )
        raise CheckpointError(f"{p} is not a .safetensors file or a safetensors shard index")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {p} is neither a file nor a folder")

    if (p / WEIGHTS_INDEX_NAME).is_file():
        return _read_index(p / WEIGHTS_INDEX_NAME), p / WEIGHTS_INDEX_NAME
    if (p / WEIGHTS_NAME).is_file():
        return [p / WEIGHTS_NAME], None
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _read_index(indexes[0]), indexes[0]
    if len(indexes) > 1:
        raise CheckpointError(f"{p} holds several shard indexes ({_brief(i.name for i in indexes)}); pass one of them")
    shards = sorted(p.glob("diffusion_pytorch_model-*.safetensors"))
    if shards:
        return shards, None
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return files, None
    if len(files) > 1:
        raise CheckpointError(
            f"{p} holds several unrelated .safetensors files ({_brief(f.name for f in files)}); pass one of them"
        )
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{p} holds only pickle-based weights ({_brief(pickles)}); only .safetensors files are read"
        )
    raise CheckpointError(f"no safetensors weights found in {p} (expected {WEIGHTS_NAME} or a sharded index)")


def _files_of(source: Source) -> tuple[list[Path], Path | None]:
    if isinstance(source, (str, os.PathLike)):
        return _resolve(source)
    files = [Path(f).expanduser() for f in source]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} does not exist")
    return files, None


def _open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{file} is not a readable safetensors file (truncated or corrupt?): {reason}"
        ) from None


def is_float_dtype(name: str) -> bool:
    """Whether a safetensors dtype name (``F32``, ``BF16``, ``F8_E4M3``, ``I32``, ...) is floating point."""
    return name.startswith(("F", "BF"))


def refuse_integer_weights(header: dict[str, "TensorInfo"], where: str, what: str) -> None:
    """Refuse a checkpoint whose weights hold integer tensors: diffusers' ``from_pretrained`` would
    cast them to float without a word (a planted int32 tensor became 353.0 where 0.35 was).
    ``what`` names the checkpoint kind in the message ("a Wan2.1 checkpoint")."""
    integer = sorted(k for k, info in header.items() if not is_float_dtype(info.dtype))
    if integer:
        shown = ", ".join(integer[:3]) + (f", ... ({len(integer)} in all)" if len(integer) > 3 else "")
        raise CheckpointError(f"{where}: {len(integer)} tensor(s) hold integers ({shown}: "
                              f"{header[integer[0]].dtype}); {what}'s weights are floating point")


def read_header(source: Source, prefix_filter: str | None = None) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of every tensor, from the safetensors headers only (no data read).

    ``source`` is a file, a folder (see :func:`resolve_weight_files`) or a list of files.
    A tensor name found in two files is an error.
    """
    files, index = _files_of(source)
    infos: dict[str, TensorInfo] = {}
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                if prefix_filter is not None and not key.startswith(prefix_filter):
                    continue
                if key in infos:
                    raise CheckpointError(f"tensor {key!r} is stored twice: in {infos[key].file} and in {file}")
                sl = f.get_slice(key)
                infos[key] = TensorInfo(tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()), file)
    if index is not None:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        wrong = [
            k for k, shard in weight_map.items()
            if (prefix_filter is None or k.startswith(prefix_filter))
            and (k not in infos or infos[k].file.name != shard)
        ]
        if wrong:
            raise CheckpointError(f"{index} lists tensors that are not in the shard it names: {_brief(wrong)}")
    return infos


def read_state_dict(folder_or_file: Source, prefix_filter: str | None = None,
                    keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Load every tensor (on CPU, in its stored dtype) of a safetensors file, folder or sharded folder.

    ``prefix_filter``: keep only tensors whose name starts with it (names are returned unchanged);
    ``keep``: only the names it accepts (a file none of them is in is not opened).
    """
    header = read_header(folder_or_file, prefix_filter=prefix_filter)
    by_file: dict[Path, list[str]] = {}
    for key, info in header.items():
        if keep is None or keep(key):
            by_file.setdefault(info.file, []).append(key)
    state: dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        with _open(file) as f:
            for key in keys:
                try:
                    state[key] = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"cannot read tensor {key!r} from {file}: {e}") from None
    return state


def read_metadata(path: PathLike) -> dict[str, str]:
    """The ``__metadata__`` dict of a safetensors file ({} when it has none).

    For a folder or a shard index, the metadata of its first weight file.
    """
    files = resolve_weight_files(path)
    with _open(files[0]) as f:
        return dict(f.metadata() or {})


_DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def write_streamed(path: PathLike, layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                   tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of ``layout`` (name, shape, dtype per tensor, in file order), its data
    written as ``tensors`` yields it: one tensor in memory at a time (the header needs only the
    layout), where ``safetensors.torch.save_file`` needs them all at once."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in layout:
        nbytes = tensor_bytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        expected = iter(layout)
        for name, t in tensors:
            want, shape, dtype = next(expected)
            if name != want or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"write_streamed: got {name} {tuple(t.shape)} {t.dtype}, the layout says {want} "
                                 f"{tuple(shape)} {dtype}")
            f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if next(expected, None) is not None:
            raise ValueError("write_streamed: fewer tensors than the layout")
