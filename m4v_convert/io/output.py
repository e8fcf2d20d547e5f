"""Atomic output folders: everything is written to a temporary sibling, then renamed into place.

A crash, an exception or Ctrl-C leaves no partial ``--out`` folder (the temporary one is removed);
an existing folder is only replaced when ``overwrite`` is set, and only once the new one is
complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from m4v_convert.errors import M4VError


def check_output_dir(out: Path, overwrite: bool, inputs: dict[str, Path | str | None] | None = None) -> Path:
    """``out`` resolved, refused when it exists (without ``overwrite``), cannot be written, or is,
    contains or lies inside one of ``inputs`` (``{flag: path}``): replacing it would delete that input."""
    out = Path(out).expanduser().resolve()
    for flag, path in (inputs or {}).items():
        if path is None:
            continue
        src = Path(path).expanduser().resolve()
        how = ("is" if out == src else "contains" if out in src.parents
               else "lies inside" if src in out.parents else None)
        if how is not None:
            raise M4VError(f"--out {out} {how} the {flag} {src}; writing it would overwrite that input: choose an "
                           "output folder apart from every input (nothing was written)")
    if out.exists() and not overwrite:
        raise M4VError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise M4VError(f"--out {out} exists and is not a folder")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise M4VError(f"--out: cannot create parent folder {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise M4VError(f"--out: cannot write to {parent}")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder; on success it becomes ``out`` (replacing it if ``overwrite``)."""
    out = check_output_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
