"""TFF's federated EMNIST (Caldas et al.'s LEAF split by writer), from local
files or downloaded once.

Where the files are looked for, in order:

1. an explicit directory: ``cache_dir``, else the ``FEDZIP_DATA`` environment
   variable (the two ``.h5`` files directly in it or one folder down);
2. the Keras/TFF cache that ``tff.simulation.datasets.emnist.load_data``
   (TFF <= 0.19, the tar.bz2 era) fills: ``$KERAS_HOME`` or ``~/.keras``,
   ``datasets/`` and the folders Keras extracts archives into
   (``datasets/<archive>_extracted/``, ``datasets/<name>/``);
3. fedzip's own cache (``$XDG_CACHE_HOME/fedzip/emnist`` or
   ``~/.cache/fedzip/emnist``);
4. otherwise the archive is downloaded once from TFF's public bucket into the
   explicit directory or fedzip's cache, checked, and its two ``.h5`` files
   extracted there.

Integrity: the sha256 digests of TFF's two archives are the ones TFF itself
checked (``file_hash=`` in TFF's ``emnist.load_data``, before it moved to
SQLite); a download whose digest differs is deleted and raises
:class:`DataError`. For any other ``url`` the digest is checked when
``sha256`` is given; when it is not, the digest of the first download is
recorded in ``<archive name>.sha256`` beside the cache and every later download
into that cache must match it (trust on first use).

Writes are atomic: the archive goes to a temporary file in the cache directory
(fsynced, digest-checked, then deleted), each ``.h5`` to its own temporary file
that is fsynced and renamed into place, so an interrupted download never
leaves a half file where a loader would find it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from fedzip.data.h5 import H5ClientData
from fedzip.errors import DataError
from fedzip.fileio import atomic_file, atomic_write

__all__ = ["EMNIST_SHA256", "EMNIST_URLS", "emnist_prefix", "find_emnist", "load_emnist"]

_BUCKET = "https://storage.googleapis.com/tff-datasets-public/"
#: archive URL per ``only_digits``.
EMNIST_URLS = {
    True: _BUCKET + "fed_emnist_digitsonly.tar.bz2",
    False: _BUCKET + "fed_emnist.tar.bz2",
}
#: sha256 of each archive, as checked by TFF's own ``emnist.load_data``
#: (tensorflow_federated/python/simulation/datasets/emnist.py, TFF <= 0.19).
EMNIST_SHA256 = {
    EMNIST_URLS[True]: "55333deb8546765427c385710ca5e7301e16f4ed8b60c1dc5ae224b42bd5b14b",
    EMNIST_URLS[False]: "fe1ed5a502cea3a952eb105920bff8cffb32836b5173cb18a57a32c3606f3ea0",
}
_CHUNK = 1 << 20


def emnist_prefix(only_digits: bool) -> str:
    """The file name stem TFF uses: ``fed_emnist_digitsonly`` or ``fed_emnist``."""
    return "fed_emnist_digitsonly" if only_digits else "fed_emnist"


def _pair_in(folder: Path, prefix: str) -> tuple[Path, Path] | None:
    """The train/test files in ``folder`` or one level below it, if both exist."""
    if not folder.is_dir():
        return None
    candidates = [folder]
    with contextlib.suppress(OSError):
        candidates += sorted(p for p in folder.iterdir() if p.is_dir())
    for d in candidates:
        train, test = d / f"{prefix}_train.h5", d / f"{prefix}_test.h5"
        if train.is_file() and test.is_file():
            return train, test
    return None


def _keras_dirs() -> list[Path]:
    home = os.environ.get("KERAS_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".keras"
    return [base / "datasets"]


def _fedzip_cache() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fedzip" / "emnist"


def _explicit_dir(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FEDZIP_DATA")
    return Path(env).expanduser() if env else None


def find_emnist(
    only_digits: bool = True, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[Path, Path] | None:
    """The local ``(train.h5, test.h5)`` by the search order above, or ``None``."""
    prefix = emnist_prefix(only_digits)
    explicit = _explicit_dir(cache_dir)
    folders = [explicit] if explicit is not None else []
    folders += _keras_dirs() + [_fedzip_cache()]
    for folder in folders:
        found = _pair_in(folder, prefix)
        if found:
            return found
    return None


def load_emnist(
    only_digits: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
    sha256: str | None = None,
) -> tuple[H5ClientData, H5ClientData]:
    """TFF's federated EMNIST as ``(train, test)`` :class:`H5ClientData`.

    Args:
        only_digits: 10 digit classes (3,383 writers) or all 62 (3,400 writers).
        cache_dir: where to look first and where to download to; default
            ``$FEDZIP_DATA``, else fedzip's cache (see the module docstring).
        url: the archive to download when no local copy is found; default TFF's.
        sha256: the archive's expected digest; default: TFF's published digest
            for TFF's URLs, trust-on-first-use for other URLs.

    Pixels are float32 ``[n, 28, 28]``, 1.0 = background, as TFF hands them.
    """
    num_classes = 10 if only_digits else 62
    found = find_emnist(only_digits, cache_dir)
    if found is None:
        target = _explicit_dir(cache_dir) or _fedzip_cache()
        found = download_emnist(only_digits, target, url, sha256)
    train, test = found
    return H5ClientData(train, num_classes), H5ClientData(test, num_classes)


def download_emnist(
    only_digits: bool,
    target: Path,
    url: str | None = None,
    sha256: str | None = None,
) -> tuple[Path, Path]:
    """Download the archive into ``target``, check it, extract the two ``.h5``."""
    prefix = emnist_prefix(only_digits)
    url = url or EMNIST_URLS[only_digits]
    archive_name = Path(urllib.parse.urlparse(url).path).name or f"{prefix}.tar.bz2"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data cache {target}: {e}") from None
    record = target / f"{archive_name}.sha256"
    expected = (sha256 or EMNIST_SHA256.get(url) or _read_record(record) or "").lower() or None
    print(f"fedzip: downloading {url} to {target} (once)", file=sys.stderr)
    with _temp_file(target, archive_name) as tmp:
        digest = _fetch(url, tmp, f"{prefix}_train.h5 and {prefix}_test.h5")
        if expected is not None and digest != expected:
            raise DataError(
                f"{url}: sha256 {digest} does not match the expected {expected}; "
                "the download was deleted"
            )
        outputs = _extract(tmp, url, prefix, target)
        if expected is None:
            atomic_write(record, f"{digest}  {archive_name}\n".encode())
    return outputs


def _read_record(record: Path) -> str | None:
    try:
        text = record.read_text().split()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DataError(f"{record}: cannot read the recorded digest: {e}") from None
    if not text or len(text[0]) != 64:
        raise DataError(f"{record}: not a sha256 record")
    return text[0]


@contextlib.contextmanager
def _temp_file(folder: Path, name: str) -> Iterator[Path]:
    """A temporary file in ``folder`` (so a rename is atomic), removed on exit."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fetch(url: str, dest: Path, files: str) -> str:
    """Stream ``url`` into ``dest`` (fsynced); return its sha256."""
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            while chunk := response.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(
            f"cannot download {url}: {e}; to work offline put {files} in a folder "
            "and set FEDZIP_DATA to it"
        ) from None
    return h.hexdigest()


def _extract(archive: Path, url: str, prefix: str, target: Path) -> tuple[Path, Path]:
    """Copy the archive's ``<prefix>_{train,test}.h5`` (wherever they sit in it)
    into ``target``. Only those two regular files are written, under names we
    choose, so a hostile archive cannot write elsewhere."""
    wanted = {f"{prefix}_train.h5": target / f"{prefix}_train.h5",
              f"{prefix}_test.h5": target / f"{prefix}_test.h5"}
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in wanted if n not in members]
            if missing:
                raise DataError(f"{url}: the archive lacks {missing} (has {sorted(members)[:6]})")
            for name, dest in wanted.items():
                src = tar.extractfile(members[name])
                assert src is not None  # a regular file always has content
                # refuse what the loader would reject before it takes the final name
                with atomic_file(dest, check=functools.partial(_check_h5, url=url, name=name)) as out:
                    shutil.copyfileobj(src, out, _CHUNK)
    except (tarfile.TarError, EOFError, OSError, DataError) as e:
        # Never leave one of the pair behind: a lone file would look like a cache.
        for dest in wanted.values():
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
        if isinstance(e, DataError):
            raise
        raise DataError(f"{url}: cannot extract the archive: {e}") from None
    return wanted[f"{prefix}_train.h5"], wanted[f"{prefix}_test.h5"]


def _check_h5(path: Path, url: str, name: str) -> None:
    try:
        H5ClientData(path).close()
    except DataError as e:
        raise DataError(f"{url}: {name} in the archive is unusable: {e}") from None
