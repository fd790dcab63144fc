"""TFF's federated EMNIST HDF5 layout, read lazily.

Layout (``fed_emnist_{train,test}.h5``, ``fed_emnist_digitsonly_*.h5`` and the
UNIPEN stand-ins in ``../shared/data/unipen``)::

    /examples/<client_id>/pixels   float32 [n, 28, 28]   1.0 = background, 0.0 = ink
    /examples/<client_id>/label    int32   [n]

The pixels are handed to the model unchanged (TFF's convention, see
:mod:`fedzip.data.federated`); labels become int64 because that is what
``torch.nn.functional.cross_entropy`` takes.

The file is opened once and a client's datasets are read only when that client
is asked for, so sampling ten clients of EMNIST's 3,400 reads ten clients.

:class:`H5Examples` is that file handling alone (open once, reopen after a
fork or unpickling, list the client ids); :class:`H5ClientData` adds the image
datasets, and :class:`fedzip.data.shakespeare.ShakespeareH5ClientData` TFF's
Shakespeare ``snippets``. :func:`h5_client_datasets` says which a file holds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import h5py
import numpy as np
import torch

from fedzip.data.federated import ClientExamples
from fedzip.errors import DataError

__all__ = ["H5ClientData", "H5Examples", "check_images", "check_pixel_meta", "h5_client_datasets"]


def check_pixel_meta(
    dtype: np.dtype, shape: tuple[int, ...], where: str, image_shape: tuple[int, ...] = (28, 28)
) -> None:
    """Raise :class:`DataError` (naming ``where``) unless ``dtype``/``shape`` are
    those of float images ``[n, *image_shape]``. Works on metadata, so an HDF5
    dataset can be rejected before it is read."""
    if dtype.kind != "f":
        # An integer array here almost always means 0..255 pixels in the other
        # convention (0 = background); passing them on would train on garbage.
        raise DataError(
            f"{where}: pixels have dtype {dtype}, expected float32 in [0, 1] "
            "(1.0 = background, 0.0 = ink)"
        )
    if len(shape) != 1 + len(image_shape) or tuple(shape[1:]) != tuple(image_shape):
        want = ", ".join(["n", *map(str, image_shape)])
        raise DataError(f"{where}: pixels have shape {tuple(shape)}, expected [{want}]")


def check_images(
    pixels: np.ndarray, labels: np.ndarray, where: str, image_shape: tuple[int, ...] = (28, 28)
) -> None:
    """Raise :class:`DataError` (naming ``where``) unless ``pixels`` / ``labels``
    are float images of ``image_shape`` in [0, 1] and integer labels of the same
    length. Shared by the readers so every format fails the same way."""
    check_pixel_meta(pixels.dtype, pixels.shape, where, image_shape)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels have dtype {labels.dtype}, expected integers")
    if labels.ndim != 1:
        raise DataError(f"{where}: labels have shape {tuple(labels.shape)}, expected [n]")
    if labels.shape[0] != pixels.shape[0]:
        raise DataError(
            f"{where}: {pixels.shape[0]} images but {labels.shape[0]} labels (lengths differ)"
        )
    if pixels.size:
        if not np.isfinite(pixels).all():
            raise DataError(f"{where}: pixels hold NaN or Inf")
        lo, hi = float(pixels.min()), float(pixels.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{where}: pixel values span [{lo}, {hi}], expected [0, 1]")
    if labels.size and int(labels.min()) < 0:
        raise DataError(f"{where}: negative label {int(labels.min())}")


class H5Examples:
    """The file handling shared by readers of TFF's HDF5 client layout,
    ``/examples/<client_id>/<dataset>``: opened once, a client's group looked
    up only when asked for.

    It pickles without its open file handle and reopens the file on first use
    after unpickling, so it can be shipped to Ray workers (the path must then
    be readable there too). It also reopens after a ``fork``: HDF5 handles
    must not be shared between processes.

    Attributes:
        reads: how many clients subclasses have read (they count it), so tests
            (and curious users) can check that sampling reads only what it samples.
    """

    #: the datasets each client holds, for error messages
    layout = "/examples/<client_id>/..."

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.reads = 0
        self._file: h5py.File | None = None
        self._pid: int | None = None
        # Validate eagerly (missing file, not HDF5, no /examples) and list the ids:
        # group keys are metadata, so this stays cheap for thousands of clients.
        self._ids: tuple[str, ...] = tuple(sorted(self._examples().keys()))

    # -- file handling ------------------------------------------------------

    def _h5(self) -> h5py.File:
        if self._file is not None and self._pid == os.getpid() and self._file.id.valid:
            return self._file
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise DataError(f"{self.path}: not a regular file")
        try:
            is_h5 = h5py.is_hdf5(self.path)
        except OSError as e:
            raise DataError(f"{self.path}: cannot read: {e}") from None
        if not is_h5:
            raise DataError(f"{self.path}: not an HDF5 file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise DataError(f"{self.path}: cannot open as HDF5: {e}") from None
        self._pid = os.getpid()
        return self._file

    def _examples(self) -> h5py.Group:
        f = self._h5()
        group = f.get("examples")
        if not isinstance(group, h5py.Group):
            raise DataError(
                f"{self.path}: no /examples group (top level has {sorted(f.keys())[:5]}); "
                f"expected TFF's layout {self.layout}"
            )
        return group

    def close(self) -> None:
        """Close the file; a later :meth:`client` reopens it."""
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # An h5py.File cannot be pickled; drop it and reopen lazily.
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, clients={len(self._ids)})"

    # -- clients ------------------------------------------------------------

    @property
    def client_ids(self) -> Sequence[str]:
        """The client ids, sorted (the group keys of ``/examples``)."""
        return self._ids

    def _group(self, client_id: str) -> h5py.Group:
        if client_id not in self._ids:
            raise DataError(f"{self.path}: unknown client id {client_id!r}")
        group = self._examples().get(client_id)
        if not isinstance(group, h5py.Group):
            raise DataError(f"{self.path}: /examples/{client_id} is not a group")
        return group

    def _dataset(self, group: h5py.Group, client_id: str, name: str) -> h5py.Dataset:
        ds = group.get(name)
        if not isinstance(ds, h5py.Dataset):
            raise DataError(
                f"{self.path}: client {client_id!r} has no {name!r} dataset "
                f"(found {sorted(group.keys())})"
            )
        return ds


def h5_client_datasets(path: str | os.PathLike[str]) -> frozenset[str]:
    """The dataset names the first client of a TFF-layout file holds, from
    metadata (``{"pixels", "label"}`` for EMNIST, ``{"snippets"}`` for
    Shakespeare; empty for a file without clients). Raises :class:`DataError`
    like the readers for a missing or malformed file."""
    with H5Examples(path) as h5:
        if not h5.client_ids:
            return frozenset()
        group = h5._group(h5.client_ids[0])
        return frozenset(k for k in group.keys() if isinstance(group.get(k), h5py.Dataset))


class H5ClientData(H5Examples):
    """Clients of one HDF5 file in TFF's federated EMNIST layout.

    Args:
        path: the ``.h5`` file.
        num_classes: the number of classes; if ``None`` it is inferred on first
            use as ``max label + 1`` over all clients (this reads every client's
            label dataset, not its pixels, and does not count in :attr:`reads`).
        image_shape: the shape of one image; TFF's EMNIST is 28x28.

    Attributes:
        reads: how many clients have been read by :meth:`client`, so tests
            (and curious users) can check that sampling reads only what it samples.

    The object pickles without its open file handle and reopens the file on
    first use after unpickling, so it can be shipped to Ray workers (the path
    must then be readable there too). It also reopens after a ``fork``: HDF5
    handles must not be shared between processes.
    """

    layout = "/examples/<client_id>/{pixels,label}"

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_classes: int | None = None,
        image_shape: tuple[int, ...] = (28, 28),
    ) -> None:
        self.image_shape = tuple(image_shape)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise DataError(f"{Path(path)}: num_classes must be a positive integer, got {num_classes!r}")
        self._num_classes = num_classes
        super().__init__(path)

    # -- FederatedData ------------------------------------------------------

    def num_examples(self, client_id: str) -> int:
        """A client's example count, from the label dataset's shape (no data read)."""
        group = self._group(client_id)
        return int(self._dataset(group, client_id, "label").shape[0])

    def client(self, client_id: str) -> ClientExamples:
        """Read one client: ``x`` float32 ``[n, 28, 28]`` (1.0 = background), ``y`` int64 ``[n]``."""
        group = self._group(client_id)
        pixels_ds = self._dataset(group, client_id, "pixels")
        label_ds = self._dataset(group, client_id, "label")
        where = f"{self.path}: client {client_id!r}"
        # Check dtype and shape from metadata before reading, so a huge wrong
        # dataset fails fast; check_images repeats them on the arrays for values.
        check_pixel_meta(pixels_ds.dtype, pixels_ds.shape, where, self.image_shape)
        if len(label_ds.shape) == 1 and label_ds.shape[0] != pixels_ds.shape[0]:
            raise DataError(
                f"{where}: {pixels_ds.shape[0]} images but {label_ds.shape[0]} labels (lengths differ)"
            )
        pixels = np.asarray(pixels_ds[()])
        labels = np.asarray(label_ds[()])
        self.reads += 1
        check_images(pixels, labels, where, self.image_shape)
        if self._num_classes is not None and labels.size and int(labels.max()) >= self._num_classes:
            raise DataError(
                f"{where}: label {int(labels.max())} is outside 0..{self._num_classes - 1}"
            )
        return ClientExamples(
            torch.from_numpy(pixels.astype(np.float32, copy=False)),
            torch.from_numpy(labels.astype(np.int64)),
        )

    @property
    def num_classes(self) -> int:
        """Given, or ``max label + 1`` over the file (computed once, labels only)."""
        if self._num_classes is None:
            top = -1
            examples = self._examples()
            for cid in self._ids:
                labels = np.asarray(self._dataset(examples[cid], cid, "label")[()])
                if labels.size:
                    top = max(top, int(labels.max()))
            if top < 0:
                raise DataError(f"{self.path}: no labels to infer num_classes from")
            self._num_classes = top + 1
        return self._num_classes
