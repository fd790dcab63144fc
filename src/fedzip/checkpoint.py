"""Checkpoints: the whole server state, written atomically, verified on load.

A checkpoint is one file, ``<logdir>/checkpoints/round-000010.ckpt``::

    b"FZCKPT1\\n" | sha256 of the payload, 64 hex digits | b"\\n" | payload

where the payload is ``torch.save`` of a plain structure (tensors, dicts,
lists, tuples, numbers, strings, None; nothing else is accepted on save) and
is read back with ``torch.load(weights_only=True)``: loading never unpickles
arbitrary objects. It holds the :class:`~fedzip.algorithms.ServerState`
(params, server optimizer ``state_dict``, aggregator state with the adaptive
norms and every client's codec state, round), the cumulative metric counters
(bits), the global RNG states (torch, numpy, Python) and the run's config and
versions.

Writes are atomic: a temporary file in the same folder, ``fsync``, rename,
``fsync`` of the folder, so a crash leaves either the old set of checkpoints
or the old set plus the new one, never a half-written file under a final
name. The newest :data:`KEEP` are kept. :func:`latest` returns the newest
checkpoint whose checksum and structure verify, and says which newer ones it
skipped and why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedzip.algorithms.state import ServerState
from fedzip.clientstate import ClientStates
from fedzip.errors import FedzipError
from fedzip.fileio import atomic_write, fsync_dir  # re-exported: run.py writes with atomic_write

MAGIC = b"FZCKPT1\n"
FORMAT = "fedzip.checkpoint"
VERSION = 2
KEEP = 3
_NAME = re.compile(r"^round-(\d{6,})\.ckpt$")
_HEAD = len(MAGIC) + 64 + 1


class CheckpointError(FedzipError):
    """A checkpoint that is missing, truncated, corrupt or of another run."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint, as loaded."""

    path: Path
    state: ServerState
    cumulative: dict[str, int]
    rng: dict[str, Any]
    config: dict[str, Any]
    versions: dict[str, str]

    @property
    def round(self) -> int:
        return self.state.round


def checkpoint_dir(logdir: str | Path) -> Path:
    return Path(logdir) / "checkpoints"


def checkpoint_path(directory: str | Path, round_num: int) -> Path:
    return Path(directory) / f"round-{round_num:06d}.ckpt"


# --------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """The global RNG states (torch, numpy, Python) as plain values.

    fedzip itself draws nothing from them (every draw is keyed by seed, round,
    client and purpose), but a user's model or loss may."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": _python_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the global RNG states from :func:`capture_rng`'s value."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["gauss"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


# --------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------


def save(
    directory: str | Path,
    state: ServerState,
    *,
    cumulative: Mapping[str, int] | None = None,
    config: Mapping[str, Any] | None = None,
    versions: Mapping[str, str] | None = None,
    rng: Mapping[str, Any] | None = None,
    keep: int = KEEP,
) -> Path:
    """Write ``state`` as ``directory/round-NNNNNN.ckpt`` atomically; keep the newest ``keep``.

    Raises :class:`CheckpointError` if the state holds anything but plain
    values (a codec that keeps an object as per-client state, say)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        # every field of the server state, walked (a new field is saved without listing it)
        "state": {f.name: _plain(_state_field(getattr(state, f.name)), f.name)
                  for f in dataclasses.fields(ServerState)},
        "cumulative": _plain(dict(cumulative or {}), "cumulative"),
        "rng": _plain(dict(rng if rng is not None else capture_rng()), "rng"),
        "config": _plain(dict(config or {}), "config"),
        "versions": _plain(dict(versions or {}), "versions"),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getbuffer()
    digest = hashlib.sha256(body).hexdigest().encode("ascii")
    path = checkpoint_path(directory, state.round)
    atomic_write(path, [MAGIC, digest, b"\n", body])
    prune(directory, keep)
    return path


def _state_field(value: Any) -> Any:
    """A server-state field as plain values: client-state stores become dicts."""
    if isinstance(value, Mapping) and any(isinstance(v, ClientStates) for v in value.values()):
        return {k: v.to_plain() if isinstance(v, ClientStates) else v for k, v in value.items()}
    return value


def prune(directory: str | Path, keep: int = KEEP) -> None:
    """Delete all but the newest ``keep`` checkpoints, and stale temporary files."""
    directory = Path(directory)
    for stale in directory.glob(".round-*.ckpt.*.tmp"):
        pid = stale.name.rsplit(".", 2)[-2]
        if pid != str(os.getpid()):
            stale.unlink(missing_ok=True)
    for old in list_checkpoints(directory)[: -keep if keep > 0 else None]:
        old.unlink(missing_ok=True)


def _plain(obj: Any, where: str) -> Any:
    """``obj`` as plain values ``torch.load(weights_only=True)`` reads back; tensors
    detached, on the CPU, and copied out of larger storages."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        return t
    if obj is None:
        return None
    for kind in (bool, int, float, str):  # subclasses (torch's version string, enums) as the base
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CheckpointError(f"{where}: key {k!r} is not a string or integer")
            out[str(k) if isinstance(k, str) else int(k)] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    raise CheckpointError(
        f"{where} is a {type(obj).__name__}: checkpoints hold only tensors, dicts, lists, numbers "
        "and strings (a codec's per-client state must be made of these)"
    )


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest round first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load(path: str | Path) -> Checkpoint:
    """Read and verify one checkpoint. Raises :class:`CheckpointError` if it is
    truncated, corrupt (checksum) or not a fedzip checkpoint."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path}: cannot read: {e.strerror or e}") from None
    if len(data) < _HEAD or not data.startswith(MAGIC) or data[_HEAD - 1 : _HEAD] != b"\n":
        raise CheckpointError(f"checkpoint {path}: not a fedzip checkpoint or truncated ({len(data)} bytes)")
    stored = data[len(MAGIC) : _HEAD - 1]
    body = memoryview(data)[_HEAD:]
    if hashlib.sha256(body).hexdigest().encode("ascii") != stored:
        raise CheckpointError(f"checkpoint {path}: checksum mismatch (truncated or corrupt)")
    try:
        p = torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
    except Exception as e:  # verified bytes that still do not load: another torch, a bug
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path}: cannot be loaded: {type(e).__name__}: {first}") from None
    if not isinstance(p, dict) or p.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a fedzip checkpoint")
    if p.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {p.get('version')!r}, this build reads {VERSION}")
    fields = p.get("state")
    if not isinstance(fields, dict):
        raise CheckpointError(f"checkpoint {path}: state missing or not a dict")
    names = {f.name for f in dataclasses.fields(ServerState)}
    required = {f.name for f in dataclasses.fields(ServerState)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if set(fields) - names or required - set(fields):
        raise CheckpointError(f"checkpoint {path}: state fields {sorted(fields)} do not match "
                              f"this build's {sorted(names)}")
    params, rnd = fields.get("params"), fields.get("round", 0)
    if not isinstance(rnd, int) or rnd < 0:
        raise CheckpointError(f"checkpoint {path}: invalid round {rnd!r}")
    if not isinstance(params, dict) or not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise CheckpointError(f"checkpoint {path}: params must be a dict of tensors")
    for key in ("optimizer_state", "aggregator_state"):
        if not isinstance(fields.get(key), dict):
            raise CheckpointError(f"checkpoint {path}: {key} missing or not a dict")
    for key in ("cumulative", "rng", "config", "versions"):
        if not isinstance(p.get(key), dict):
            raise CheckpointError(f"checkpoint {path}: {key} missing or not a dict")
    state = ServerState(**fields)
    return Checkpoint(path, state, p["cumulative"], p["rng"], p["config"], p["versions"])


def latest(directory: str | Path, log: Callable[[str], None] | None = print) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` that verifies, or None if there is none.

    Each newer checkpoint that fails verification is reported through ``log``
    and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load(path)
        except CheckpointError as e:
            if log is not None:
                log(f"fedzip: skipping {e}; trying the previous checkpoint")
    return None


__all__ = [
    "KEEP", "Checkpoint", "CheckpointError", "atomic_write", "capture_rng", "checkpoint_dir",
    "checkpoint_path", "fsync_dir", "latest", "list_checkpoints", "load", "prune", "restore_rng",
    "save",
]
