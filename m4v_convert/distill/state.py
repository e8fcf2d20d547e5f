"""Training state on disk: one resumable checkpoint per run folder, written atomically.

A run folder (``<out>.train/`` or ``--run-dir``) holds:

* ``state.pt``: the last good checkpoint: student weights that training changes, optimizer and
  LR-scheduler state of the stage in progress, RNG states (torch, CUDA, the stage's batch
  generator), stage and step, the results of finished stages, and the run's *identity* (recipe,
  layers, schedule, ...), which a resume must match;
* ``state.json``: the same minus tensors, for people;
* ``train_log.jsonl``: one JSON record per step and event (trimmed back to the checkpoint on resume);
* ``shards-*/``: a sharded run's (``--fsdp``) weights and optimizer state, each process's part, written
  with ``torch.distributed.checkpoint``; ``state.pt`` names the folder and holds the rest;
* ``teacher_calib/``: teacher-generated calibration samples, when used (see ``teacher_samples``).

Files are written to a temporary sibling and renamed into place, so a kill at any moment leaves
either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from m4v_convert.errors import M4VError, error_reason

STATE_FILE = "state.pt"
SUMMARY_FILE = "state.json"
LOG_FILE = "train_log.jsonl"
SHARDS_TMP = ".shards-tmp"
FORMAT = "m4v-convert-train-state"
VERSION = 1


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        _fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        _fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _plain(value):
    """``value`` without tensors (for state.json)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not isinstance(v, torch.Tensor)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value if not isinstance(v, torch.Tensor)]
    return value


class RunDir:
    """The folder of one training run (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path).expanduser().resolve()

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    def has_checkpoint(self) -> bool:
        return self.state_path.is_file()

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise M4VError(f"run folder {self.path}: cannot create it ({e.strerror})") from None

    def progress_text(self) -> str:
        """`` (stage2, step 40)`` from the checkpoint's summary, or nothing where it cannot be read."""
        try:
            summary = json.loads((self.path / SUMMARY_FILE).read_text())
            return f" ({summary['stage']}, step {summary['step']})"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def clear(self) -> None:
        """Forget the log and summary a run folder without a checkpoint may hold; other files stay."""
        for name in (STATE_FILE, SUMMARY_FILE, LOG_FILE):
            (self.path / name).unlink(missing_ok=True)
        self.remove_shards()

    # a sharded run (--fsdp): every process writes its part of the tensors into SHARDS_TMP, which
    # becomes a ``shards-*`` folder that state.pt then names; the folder it named before is removed
    # last, so a kill at any moment leaves state.pt and the folder it names

    @property
    def shards_tmp(self) -> Path:
        return self.path / SHARDS_TMP

    def new_shards_name(self, stage: str, step: int) -> str:
        """A name for the next sharded checkpoint folder, unlike any in the run folder."""
        base = f"shards-{stage}-step{step}"
        n = 0
        while (self.path / (base if n == 0 else f"{base}-{n}")).exists():
            n += 1
        return base if n == 0 else f"{base}-{n}"

    def remove_shards(self, keep: str | None = None, unfinished_only: bool = False) -> None:
        """Remove the sharded checkpoint folders other than ``keep``, and any unfinished one
        (``unfinished_only``: that one alone)."""
        import shutil

        if not self.path.is_dir():
            return
        for p in self.path.iterdir():
            if p.is_dir() and p.name != keep and (p.name == SHARDS_TMP or
                                                   (p.name.startswith("shards-") and not unfinished_only)):
                shutil.rmtree(p, ignore_errors=True)

    def save(self, state: dict) -> None:
        """Write the checkpoint (atomically: a failed write keeps the previous one)."""
        self.create()
        try:
            atomic_torch_save(state, self.state_path)
            summary = {k: v for k, v in state.items() if k not in ("weights", "optimizer", "scheduler", "rng")}
            atomic_write_text(self.path / SUMMARY_FILE, json.dumps(_plain(summary), indent=2))
        except (OSError, RuntimeError) as e:  # disk full: torch raises RuntimeError from its zip writer
            raise M4VError(f"run folder {self.path}: cannot write the checkpoint ({error_reason(e)}); the previous "
                           "checkpoint, if any, is kept") from None

    def load(self, flag: str = "--resume") -> dict:
        if not self.path.is_dir():
            raise M4VError(f"{flag} {self.path}: not a folder")
        if not self.has_checkpoint():
            raise M4VError(f"{flag} {self.path}: no training checkpoint ({STATE_FILE}) in this folder")
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (any unreadable file is the same user problem)
            # torch's own text on a refused pickle suggests loading it unsafely: never pass that on
            why = ("it holds objects beyond tensors and plain data, which m4v-convert never writes"
                   if "weights" in str(e).lower() and "only" in str(e).lower() else error_reason(e))
            raise M4VError(f"{flag} {self.state_path}: cannot read the checkpoint ({why}); it is damaged or was "
                           "not written by m4v-convert: start a new run (another --run-dir)") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise M4VError(f"{flag} {self.state_path}: not an m4v-convert training checkpoint")
        if state.get("version") != VERSION:
            raise M4VError(f"{flag} {self.state_path}: checkpoint format version {state.get('version')}, "
                           f"this m4v-convert reads version {VERSION}")
        return state

    # ------------------------------------------------------------------ log

    def append_log(self, records: list[dict]) -> None:
        if not records:
            return
        self.create()
        with open(self.log_path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    def read_log(self) -> list[dict]:
        if not self.log_path.is_file():
            return []
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a kill: everything after it is not trusted either
        return out

    def rewrite_log(self, records: list[dict]) -> None:
        atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in records))


def log_until(records: list[dict], stage: str, step: int) -> list[dict]:
    """The log records up to the last one of ``stage`` at ``step`` (what a checkpoint has seen);
    records a killed run wrote after its last checkpoint are dropped."""
    cut = None
    for i, r in enumerate(records):
        if r.get("stage") == stage and r.get("step") == step:
            cut = i
    return records if cut is None else records[: cut + 1]


_IDENTITY_WORDS = {
    "recipe": "recipe", "layers": "converted layers", "train": "--train", "stages": "--stages",
    "schedules": "stage schedule", "seed": "--seed", "world_size": "number of processes",
    "calibration": "calibration data (source and contents)", "data": "--data contents",
    "model": "checkpoint architecture", "dtype": "--dtype", "teacher": "teacher (its weights)",
    "lora": "LoRA settings", "loss": "loss weights", "sharded": "--fsdp (sharded weights)",
    "layer_selection": "--layers auto selection",
}

FINGERPRINT_VALUES = 4096  # values sampled per tensor


def fingerprint(named_tensors) -> str:
    """A digest of ``(name, tensor)`` pairs: names, shapes and an evenly strided sample of at most
    4096 values per tensor (as float64, so the digest does not depend on the device). Cheap on a 14B
    model, and different for another teacher or other data of the same shapes, which a run's
    identity must tell apart (a path's spelling cannot)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in named_tensors:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_VALUES)].to("cpu", torch.float64)
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:20]


def samples_fingerprint(samples: list) -> str:
    """:func:`fingerprint` of calibration / data samples (dataclasses of tensors)."""
    import dataclasses

    return fingerprint((f"{i}.{f.name}", getattr(s, f.name)) for i, s in enumerate(samples)
                       for f in dataclasses.fields(s) if isinstance(getattr(s, f.name), torch.Tensor))


def check_identity(saved: dict, current: dict, where: Path) -> None:
    """Refuse to resume a run whose recipe, layers, schedule, ... differ from this one."""
    for key in current:
        if saved.get(key) != current[key]:
            what = _IDENTITY_WORDS.get(key, key)
            raise M4VError(f"--resume {where}: that run has a different {what} ({key}: {_short(saved.get(key))}) "
                           f"than this one ({_short(current[key])}); resume it with the same settings, or pass "
                           "another --run-dir to start a new run")


def _short(value, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
