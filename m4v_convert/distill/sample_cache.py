"""A resumable cache of calibration samples made one at a time (teacher samples of ``--prompts``,
VAE-encoded clips of ``--videos``).

One ``sample-00000.safetensors`` per sample (``latents`` + ``text_embeds``: the ``--calib`` / ``--data``
format, so the folder can be passed as either later) under ``manifest.json``, which records everything
the samples depend on. Each sample is written atomically as soon as it is made: a killed run keeps the
finished ones and the next run makes only the missing ones; a cache made with other settings is refused
rather than mixed or overwritten.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from m4v_convert.errors import M4VError

MANIFEST = "manifest.json"


class SampleCache:
    def __init__(self, folder: Path, key: dict, count: int, what: str):
        """Opens (or starts) the cache in ``folder`` for ``count`` samples made with ``key``; ``what``
        names the samples in messages ("prompt samples", "video clips")."""
        self.folder = check_cache(folder, key, what)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            save_text_atomic(json.dumps({"key": key, "num_samples": count}, indent=2), manifest)
        self.files = [self.folder / f"sample-{i:05d}.safetensors" for i in range(count)]

    def missing(self) -> list[int]:
        return [i for i, f in enumerate(self.files) if not f.is_file()]

    def save(self, i: int, latents: torch.Tensor, text_embeds: torch.Tensor) -> None:
        save_atomic({"latents": latents.float().cpu().contiguous(),
                     "text_embeds": text_embeds.float().cpu().contiguous()}, self.files[i])

    def load(self) -> list:
        from safetensors.torch import load_file

        from m4v_convert.distill.calibration import CleanSample

        samples = []
        for f in self.files:
            t = load_file(str(f))
            samples.append(CleanSample(t["latents"], t["text_embeds"]))
        return samples


def check_cache(folder: Path, key: dict, what: str) -> Path:
    """``folder`` resolved, refused when it holds samples made with another ``key`` or is some other
    folder with files in it (nothing is created: this also runs before any weight is read)."""
    folder = Path(folder).expanduser().resolve()
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            saved = json.loads(manifest.read_text()).get("key")
        except (json.JSONDecodeError, AttributeError):
            raise M4VError(f"--calib-cache {folder}: {MANIFEST} is not valid JSON; delete the folder to "
                           "regenerate") from None
        if saved != key:
            saved = saved if isinstance(saved, dict) else {}
            diff = sorted(k for k in set(key) | set(saved) if saved.get(k) != key.get(k))
            raise M4VError(f"--calib-cache {folder}: holds {what} made with other settings (differs in: "
                           f"{', '.join(diff)}); pass another folder or delete this one")
    elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise M4VError(f"--calib-cache {folder}: exists and is not a sample cache (no {MANIFEST}); refusing to "
                       "write into it")
    return folder


def save_atomic(tensors: dict, path: Path) -> None:
    """``tensors`` to ``path`` through a temporary file in the same folder (never half a file)."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_text_atomic(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def sample_progress(con, title: str, total: int):
    """A progress bar with ETA over ``total`` samples; yields ``advance()``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=con, transient=False)
    task = progress.add_task(title, total=total)
    progress.start()
    try:
        yield lambda: progress.update(task, advance=1)
    finally:
        progress.stop()
