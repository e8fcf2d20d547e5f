"""A converted model written as a whole diffusers pipeline folder.

When ``--checkpoint`` is a pipeline folder (``model_index.json`` beside ``transformer/``,
``text_encoder/``, ``vae/``, ...), ``--out`` becomes the same pipeline with the converted
transformer: its other components hard-linked where the filesystem allows (else copied;
``--copy-components`` always copies), ``model_index.json`` naming the converted class, and in
the transformer's folder a one-line module that imports that class from the installed toolkit.

diffusers then loads it in either of two ways (README "Using a converted pipeline"):

* ``DiffusionPipeline.from_pretrained(out, trust_remote_code=True)``: no toolkit import in the
  caller's code; diffusers runs ``transformer/m4v_transformer.py`` (it needs m4v-convert installed).
* ``m4v_convert.load_pipeline(out)``: no remote code; the caller imports the toolkit. (diffusers'
  ``WanPipeline.from_pretrained(out, transformer=...)`` still checks the library model_index.json
  names for the transformer, which only remote code satisfies.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from m4v_convert.errors import CheckpointError, M4VError
from m4v_convert.models.converted import LOADER_MODULE

MODEL_INDEX = "model_index.json"
def check_video_shape(frames: int | None, size: tuple[int, int] | None, frames_flag: str, size_flag: str,
                      temporal: int = 4, side: int = 16) -> None:
    """A pipeline's video shape: ``temporal``·k+1 frames (its VAE compresses time ``temporal``x), height and
    width multiples of ``side`` (the VAE's spatial compression x the transformer's patch; Wan2.1: 8 x 2);
    None: not given."""
    if frames is not None and (frames < 1 or (frames - 1) % temporal):
        examples = ", ".join(str(temporal * k + 1) for k in (20, 12, 4, 1))
        raise M4VError(f"{frames_flag} {frames}: the video VAE compresses time {temporal}x; use {temporal}k+1 frames "
                       f"(e.g. {examples})")
    if size is not None and any(v % side for v in size):
        raise M4VError(f"{size_flag} {size[0]}x{size[1]}: height and width must be multiples of {side} "
                       "(the VAE's spatial compression x the transformer's patch)")


def pipeline_root(folder: Path, component: str | None) -> Path | None:
    """The pipeline folder a checkpoint's transformer was read from, or None (a bare transformer
    folder or file): ``folder`` holds ``model_index.json`` naming ``component``."""
    if component is None or folder is None:
        return None
    index = Path(folder) / MODEL_INDEX
    if not index.is_file():
        return None
    try:
        entries = json.loads(index.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return Path(folder) if isinstance(entries.get(component), list) else None


def read_model_index(root: Path) -> dict:
    path = Path(root) / MODEL_INDEX
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the pipeline's model index ({e})") from None


def components(index: dict) -> list[str]:
    """The component folders a model index names (entries ``[library, class]`` that are not null)."""
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
            and v[0] is not None and v[1] is not None]


def check_components(root: Path, converted: str) -> list[str]:
    """The components to carry over (all but ``converted``), each present; refused before loading."""
    index = read_model_index(root)
    others = [c for c in components(index) if c != converted]
    missing = [c for c in others if not (Path(root) / c).is_dir()]
    if missing:
        raise CheckpointError(f"{root}: {MODEL_INDEX} names component(s) {', '.join(missing)} but the folder has no "
                              f"such subfolder; a converted pipeline needs every component (or give the "
                              f"{converted}/ folder alone for the converted transformer only)")
    return others


def write_pipeline(root: Path, out: Path, converted: str, class_name: str,
                   copy_components: bool = False) -> dict[str, str]:
    """Complete ``out`` (which already holds ``out/converted/``) into a pipeline folder; returns
    ``{component: "linked" | "copied"}``."""
    root, out = Path(root), Path(out)
    index = read_model_index(root)
    how: dict[str, str] = {}
    for name in check_components(root, converted):
        how[name] = carry_tree(root / name, out / name, copy_components)
    index[converted] = [LOADER_MODULE, class_name]  # out/converted/m4v_transformer.py (io/converted.py)
    (out / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return how


def carry_tree(src: Path, dst: Path, copy: bool = False, skip: set[str] = frozenset()) -> str:
    """Hard-link every file of ``src`` under ``dst`` (copy where linking fails or ``copy``), but those
    named in ``skip``. A linked file is the source's own: write a new file in its place, never into it."""
    linked = not copy
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        if path.name in skip:
            continue
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()  # a Hugging Face cache snapshot holds links to its blobs
        if linked:
            try:
                os.link(real, target)
                continue
            except OSError:  # another filesystem, or links not allowed: copy from here on
                linked = False
        shutil.copy2(real, target)
    return "linked" if linked else "copied"


#: libraries :func:`load_pipeline` loads components from (as diffusers: a name in model_index.json
#: never makes it import anything else)
LOADABLE_LIBRARIES = ("diffusers", "transformers")


def load_pipeline(folder, *, dtype=None):
    """A converted pipeline folder as its diffusers pipeline (the class ``model_index.json`` names),
    with the converted transformer from ``load_converted``: no remote code runs. Each other
    component is loaded with its own class's ``from_pretrained``, as diffusers does."""
    import importlib

    import diffusers

    from m4v_convert.io.converted import load_converted

    folder = Path(folder).expanduser()
    index = read_model_index(folder)
    pipeline_cls = getattr(diffusers, str(index.get("_class_name")), None)
    if not isinstance(pipeline_cls, type) or not issubclass(pipeline_cls, diffusers.DiffusionPipeline):
        raise CheckpointError(f"{folder}/{MODEL_INDEX}: {index.get('_class_name')!r} is not a diffusers pipeline")
    parts = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(value, list):  # the pipeline's own settings (boundary_ratio, expand_timesteps, ...)
            parts[name] = value
            continue
        library, class_name = value
        if library is None:
            parts[name] = None
        elif library == LOADER_MODULE:
            parts[name] = load_converted(folder / name, dtype=dtype)
        elif library in LOADABLE_LIBRARIES:
            cls = getattr(importlib.import_module(library), class_name, None)
            if cls is None:
                raise CheckpointError(f"{folder}/{MODEL_INDEX}: {library} has no class {class_name!r} ({name})")
            kwargs = {"torch_dtype": dtype} if dtype is not None and hasattr(cls, "dtype") else {}
            parts[name] = cls.from_pretrained(folder / name, **kwargs)
        else:
            raise CheckpointError(f"{folder}/{MODEL_INDEX}: component {name} comes from {library!r}, which is not "
                                  f"loaded here (only {', '.join(LOADABLE_LIBRARIES)})")
    return pipeline_cls(**parts)
