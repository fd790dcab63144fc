"""UNIPEN handwriting federated by writer: the offline stand-in for EMNIST.

The files live outside the repository, in ``../shared/data/unipen`` (see its
README): the full ``unipen_femnist_full.npz`` (105,382 characters by 429
writers, uint8 with 0 = background and 255 = ink), small TFF-layout ``.h5``
files, and a LEAF-layout JSON. Every reader here hands the model TFF's
convention: float32 ``[n, 28, 28]`` with 1.0 = background, 0.0 = ink.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedzip.data.federated import ClientExamples
from fedzip.data.h5 import H5ClientData, check_images
from fedzip.data.memory import ArrayClientData, NpzMember
from fedzip.errors import DataError

__all__ = ["LeafClientData", "UNIPEN_NPZ", "default_unipen_root", "load_unipen"]

UNIPEN_NPZ = "unipen_femnist_full.npz"


def default_unipen_root() -> Path:
    """``$FEDZIP_UNIPEN``, else ``<repo>/../shared/data/unipen`` (the repo's sibling)."""
    env = os.environ.get("FEDZIP_UNIPEN")
    if env:
        return Path(env).expanduser()
    # src/fedzip/data/unipen.py -> parents[3] is the repository root
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "unipen"


def load_unipen(
    root: str | os.PathLike[str] | None = None,
    only_digits: bool = False,
    tiny: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[H5ClientData | ArrayClientData, H5ClientData | ArrayClientData]:
    """UNIPEN as ``(train, test)`` populations with the same writer ids.

    Args:
        root: the folder with the files; default :func:`default_unipen_root`.
        only_digits: labels 0-9 only (writers without at least two digits are
            dropped); otherwise TFF's 62 classes (0-9, 'A'-'Z', 'a'-'z').
        tiny: read the small TFF-layout files ``fed_unipen[_digitsonly]_tiny_*.h5``
            (24 / 16 writers, already split) instead of the full npz.
        test_fraction: full npz only: each writer's held-out share, at least
            one example (writers with one example are dropped, as TFF does).
        seed: full npz only: the per-writer train/test split is a function of it.
    """
    folder = Path(root).expanduser() if root is not None else default_unipen_root()
    if not folder.is_dir():
        raise DataError(
            f"UNIPEN folder {folder} not found; set FEDZIP_UNIPEN or pass root= "
            "(the data lives in the repository's sibling shared/data/unipen)"
        )
    num_classes = 10 if only_digits else 62
    if tiny:
        stem = "fed_unipen_digitsonly_tiny" if only_digits else "fed_unipen_tiny"
        return (H5ClientData(folder / f"{stem}_train.h5", num_classes),
                H5ClientData(folder / f"{stem}_test.h5", num_classes))
    return _load_npz(folder / UNIPEN_NPZ, only_digits, test_fraction, seed)


def _load_npz(
    path: Path, only_digits: bool, test_fraction: float, seed: int
) -> tuple[ArrayClientData, ArrayClientData]:
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    # Only the small arrays now; the 82 MB of pixels load on the first client read.
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("pixels", "label", "writer", "writer_ids") if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing} (has {npz.files})")
            labels = npz["label"].astype(np.int64)
            writer = npz["writer"].astype(np.int64)
            writer_ids = [str(w) for w in npz["writer_ids"]]
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable npz: {e}") from None
    if labels.ndim != 1 or labels.shape != writer.shape:
        raise DataError(f"{path}: label {labels.shape} and writer {writer.shape} differ in shape")
    if labels.size and (labels.min() < 0 or labels.max() > 61):
        raise DataError(f"{path}: labels outside 0..61")
    if writer.size and (writer.min() < 0 or writer.max() >= len(writer_ids)):
        raise DataError(f"{path}: writer indices outside 0..{len(writer_ids) - 1}")

    keep = np.flatnonzero(labels < 10) if only_digits else np.arange(labels.size)
    # Group by writer once: a stable argsort, then each writer is a contiguous run.
    order = keep[np.argsort(writer[keep], kind="stable")]
    counts = np.bincount(writer[order], minlength=len(writer_ids))
    starts = np.concatenate([[0], np.cumsum(counts)])
    rng = np.random.default_rng(seed)
    train: dict[str, np.ndarray] = {}
    test: dict[str, np.ndarray] = {}
    for w, wid in enumerate(writer_ids):
        n = int(counts[w])
        if n < 2:  # cannot give both a train and a test example
            continue
        idx = rng.permutation(order[starts[w] : starts[w + 1]])
        n_test = min(n - 1, max(1, round(test_fraction * n)))
        test[wid] = np.sort(idx[:n_test])
        train[wid] = np.sort(idx[n_test:])
    kind = "digits (10 classes)" if only_digits else "digits and letters (62 classes)"
    description = (
        f"UNIPEN train_r01_v07 {kind}, {len(train)} writers as clients (a natural split by "
        f"writer); each writer's examples split {1 - test_fraction:.0%}/{test_fraction:.0%} "
        f"train/test (seed {seed})"
    )
    if only_digits:
        # only the rows the clients use (16 k of 105 k images), renumbered in the
        # same order: the same examples in the same order, a seventh of the memory
        rows = np.sort(np.concatenate([*train.values(), *test.values()]))
        position = np.full(labels.size, -1, dtype=np.int64)
        position[rows] = np.arange(rows.size)
        train = {wid: position[idx] for wid, idx in train.items()}
        test = {wid: position[idx] for wid, idx in test.items()}
        labels = labels[rows]
        pixels = NpzMember(path, "pixels", rows=rows)  # shared, so train and test load it once
    else:
        pixels = NpzMember(path, "pixels")  # shared, so train and test load it once
    num_classes = 10 if only_digits else 62
    return (ArrayClientData(pixels, labels, train, num_classes, description, path),
            ArrayClientData(pixels, labels, test, num_classes, description, path))


class LeafClientData:
    """LEAF's FEMNIST JSON layout: ``users``, ``num_samples``,
    ``user_data[u] = {"x": [[784 floats]], "y": [...]}``.

    The JSON is parsed once (``json`` cannot read part of a file); each user's
    lists become tensors only when that user is read. Pixels are handed on
    unchanged: LEAF's FEMNIST, like TFF's, has 1.0 = background.
    """

    def __init__(self, path: str | os.PathLike[str], num_classes: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{self.path}: not a LEAF JSON file: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("user_data"), dict):
            raise DataError(f"{self.path}: no 'user_data' object (LEAF layout expected)")
        users = doc.get("users", list(doc["user_data"]))
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise DataError(f"{self.path}: 'users' must be a list of strings")
        absent = [u for u in users if u not in doc["user_data"]]
        if absent:
            raise DataError(f"{self.path}: users {absent[:3]} have no user_data")
        sizes = doc.get("num_samples")
        if sizes is not None and (not isinstance(sizes, list) or len(sizes) != len(users)):
            raise DataError(f"{self.path}: 'num_samples' must list one count per user")
        self._data: dict[str, dict] = doc["user_data"]
        self._ids = tuple(users)
        self._known = frozenset(users)
        self._sizes = dict(zip(users, sizes, strict=True)) if sizes is not None else {}
        self._num_classes = num_classes
        self.reads = 0

    @property
    def client_ids(self) -> Sequence[str]:
        return self._ids

    def client(self, client_id: str) -> ClientExamples:
        """One user: ``x`` float32 ``[n, 28, 28]`` (1.0 = background), ``y`` int64 ``[n]``."""
        if client_id not in self._known:
            raise DataError(f"{self.path}: unknown client id {client_id!r}")
        where = f"{self.path}: user {client_id!r}"
        entry = self._data[client_id]
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            raise DataError(f"{where}: user_data needs 'x' and 'y'")
        try:
            x = np.asarray(entry["x"], dtype=np.float32)
            y = np.asarray(entry["y"])
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: 'x' is not a list of equal-length pixel lists: {e}") from None
        if x.ndim != 2 or (x.size and x.shape[1] != 784):
            raise DataError(f"{where}: 'x' rows must have 784 values, got shape {x.shape}")
        if y.size == 0:
            y = y.astype(np.int64)
        x = x.reshape(-1, 28, 28)
        check_images(x, y, where)
        expected = self._sizes.get(client_id)
        if expected is not None and expected != len(y):
            raise DataError(f"{where}: num_samples says {expected} but there are {len(y)}")
        if self._num_classes is not None and y.size and int(y.max()) >= self._num_classes:
            raise DataError(f"{where}: label {int(y.max())} is outside 0..{self._num_classes - 1}")
        self.reads += 1
        return ClientExamples(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))

    @property
    def num_classes(self) -> int:
        """Given, or ``max label + 1`` over all users."""
        if self._num_classes is None:
            tops = [max(d["y"]) for d in self._data.values() if isinstance(d, dict) and d.get("y")]
            if not tops:
                raise DataError(f"{self.path}: no labels to infer num_classes from")
            self._num_classes = int(max(tops)) + 1
        return self._num_classes
