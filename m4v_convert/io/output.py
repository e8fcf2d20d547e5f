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


def check_apart(path: Path, flag: str, inputs: dict[str, Path | str | None], why: str) -> Path:
    """``path`` resolved, refused when it is, contains or lies inside one of ``inputs`` (``{flag: path}``);
    ``why`` ends the message (what writing there would do to the input, and what to do instead)."""
    path = Path(path).expanduser().resolve()
    for input_flag, source in inputs.items():
        if source is None:
            continue
        src = Path(source).expanduser().resolve()
        how = ("is" if path == src else "contains" if path in src.parents
               else "lies inside" if src in path.parents else None)
        if how is not None:
            raise M4VError(f"{flag} {path} {how} the {input_flag} {src}; {why}")
    return path


def check_output_dir(out: Path, overwrite: bool, inputs: dict[str, Path | str | None] | None = None) -> Path:
    """``out`` resolved, refused when it exists (without ``overwrite``), cannot be written, or is,
    contains or lies inside one of ``inputs`` (``{flag: path}``): replacing it would delete that input."""
    out = check_apart(out, "--out", inputs or {}, "writing it would overwrite that input: choose an output folder "
                      "apart from every input (nothing was written)")
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


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary folders an earlier write of ``out`` left beside it when its process was
    killed (SIGKILL, power loss) before the rename: ``.<out>.tmp-<pid>-*`` of processes that are gone.
    Only this output's, only of dead processes; returns what was removed."""
    out = Path(out).expanduser().resolve()
    removed = []
    for tmp in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        pid = tmp.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if not tmp.is_dir() or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder; on success it becomes ``out`` (replacing it if ``overwrite``)."""
    out = check_output_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
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


def check_output_file(path: Path, flag: str) -> Path:
    """An output file's path, refused up front when it names a folder or its folder cannot be made."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise M4VError(f"{flag} {path}: a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise M4VError(f"{flag}: cannot create the folder {path.parent} ({e.strerror})") from None
    return path


def write_output_file(path: Path, text: str, flag: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary sibling renamed into place); one
    ``error:`` line when it cannot be written, the earlier file (if any) kept."""
    path = check_output_file(path, flag)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise M4VError(f"{flag} {path}: cannot write it ({e.strerror})") from None

