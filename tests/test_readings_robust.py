"""Byzantine-robust rules (fedzip.robust) with clients that hold part of the
model: federated dropout (Caldas et al. 2018) and structured updates
(Konečný et al. 2016).

Each rule is taken over the clients that held a coordinate: checked against
references written here (numpy / scipy per coordinate, loops over pairs for
Krum, a plain Weiszfeld iteration for the geometric median) and one Krum
example computed by hand. What a client did not hold is filled with garbage
in the rule-level tests, so any leak of it shows. Without coverage, and with
a coverage that holds everything, every rule gives the numbers it gave
before, bit for bit."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from fakes import (
    RecordingExecutor,
    TensorClients,
    deterministic,
    small_fedavg,
    two_worker_processes,
)
from scipy import stats
from torch import nn

import fedzip
from fedzip import checkpoint, robust
from fedzip.algorithms.dropout import federated_dropout, kept_units
from fedzip.algorithms.structured import lowrank_updates, random_mask_updates
from fedzip.execution import LocalExecutor
from fedzip.seeding import torch_rng
from fedzip.wire import decode_message

SGD = functools.partial(torch.optim.SGD, lr=0.05)
SERVER = functools.partial(torch.optim.SGD, lr=1.0)
PRE = fedzip.Preprocess(batch_size=8, epochs=1, shuffle_buffer=100)
GARBAGE = 1e6  # in a coordinate a client did not hold: a rule that reads it is visibly wrong

RULES = {"median": robust.CoordinateMedian(), "trimmed": robust.TrimmedMean(0.2), "krum": robust.Krum(1),
         "multikrum": robust.Krum(1, 3), "geomedian": robust.GeometricMedian(iterations=500, nu=1e-9,
                                                                             ftol=1e-15)}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _case(n: int = 9, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points and the coordinates each client held: random, plus a coordinate
    every client held, one nobody held, one with one holder, one with two."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(n, d, generator=g) * 3
    held = torch.rand(n, d, generator=g) < 0.6
    held[:, 0] = True
    held[:, 1] = False
    held[:, 2] = False
    held[3, 2] = True
    held[:, 3] = False
    held[[1, 4], 3] = True
    held[:, 4:].logical_or_(torch.eye(n, d - 4, dtype=torch.bool))  # every client holds something
    # garbage of both signs: it would sort among the holders' values, not only after them
    garbage = torch.where(torch.rand(n, d, generator=g) < 0.5, GARBAGE, -GARBAGE)
    return torch.where(held, points, garbage), held


def _columns(points: torch.Tensor, held: torch.Tensor):
    x, h = points.double().numpy(), held.numpy()
    return [x[h[:, j], j] for j in range(x.shape[1])]


def _ref_median(points, held):
    return np.array([np.median(v) if len(v) else 0.0 for v in _columns(points, held)])


def _ref_trimmed(points, held, beta):
    return np.array([stats.trim_mean(v, beta) if len(v) else 0.0 for v in _columns(points, held)])


def _ref_krum_scores(points, held, f):
    x, h = points.double().numpy(), held.numpy()
    n, d = x.shape
    dist = np.full((n, n), np.inf)
    for i in range(n):
        for j in range(n):
            common = h[i] & h[j]
            if i != j and common.any():
                dist[i, j] = ((x[i, common] - x[j, common]) ** 2).sum() * d / common.sum()
    return np.array([np.sort(dist[i])[: n - f - 2].sum() for i in range(n)])


def _ref_krum(points, held, f, m):
    scores = _ref_krum_scores(points, held, f)
    chosen = np.argsort(scores, kind="stable")[:m]
    x, h = points.double().numpy()[chosen], held.numpy()[chosen]
    count = h.sum(0)
    return np.where(count > 0, np.where(h, x, 0).sum(0) / np.maximum(count, 1), 0.0), list(chosen)


def _ref_geomedian(points, held, steps=5000):
    """Weiszfeld on Σ_i ‖P_i(z − w_i)‖: distances over each client's coordinates,
    each step the weighted mean of a coordinate over its holders."""
    x, h = points.double().numpy(), held.numpy().astype(float)
    xh = np.where(h > 0, x, 0.0)

    def step(beta):
        den = beta @ h
        return np.where(den > 0, (beta @ xh) / np.where(den > 0, den, 1), 0.0)

    z = step(np.ones(len(x)))
    for _ in range(steps):
        dist = np.sqrt((((xh - z) * h) ** 2).sum(1))
        z = step(1 / np.maximum(dist, 1e-12))
    return z


# --------------------------------------------------------------------------
# The rules with coverage, against the references
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_median_and_trimmed_mean_per_coordinate_over_its_holders(seed):
    points, held = _case(seed=seed)
    est, _ = robust.CoordinateMedian().estimate(points, held)
    np.testing.assert_allclose(est.numpy(), _ref_median(points, held), rtol=0, atol=1e-12)
    assert est[1] == 0 and est[2] == points[3, 2]  # nobody: no update; one holder: its value
    for beta in (0.1, 0.2, 0.34, 0.49):
        est, info = robust.TrimmedMean(beta).estimate(points, held)
        np.testing.assert_allclose(est.numpy(), _ref_trimmed(points, held, beta), rtol=0, atol=1e-12)
        assert info["trimmed_each_side"] == math.floor(beta * len(points))


def test_krum_by_hand_distances_over_common_coordinates_rescaled():
    g = 100.0  # what a client did not hold
    x = torch.tensor([[0, 0], [3, g], [0, 1], [g, 1], [5, 5]], dtype=torch.float32)
    held = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    # squared distances over the common coordinates times d / |common| (d = 2); c1, c3 share none:
    #   c0: c1 9·2=18, c2 1, c3 1·2=2, c4 50     c1: c2 18, c3 inf, c4 4·2=8
    #   c2: c3 0·2=0, c4 41                      c3: c4 16·2=32
    # scores, the n - f - 2 = 2 nearest: c0 1+2, c1 8+18, c2 0+1, c3 0+2, c4 8+32
    rule = robust.Krum(f=1)
    assert rule.scores(x, held).tolist() == [3, 26, 1, 2, 40]
    est, info = rule.estimate(x, held)
    assert info["selected"] == [2] and est.tolist() == [0.0, 1.0]
    # multi-Krum: c2, c3, c0; coordinate 0 over c2 and c0 (c3 did not hold it), 1 over all three
    est, info = robust.Krum(f=1, m=3).estimate(x, held)
    assert info["selected"] == [2, 3, 0] and est.tolist() == [0.0, 2 / 3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_krum_against_pairwise_reference(seed):
    points, held = _case(seed=seed)
    for f, m in ((1, 1), (2, 1), (1, 4), (3, 2)):
        want, chosen = _ref_krum(points, held, f, m)
        rule = robust.Krum(f, m)
        np.testing.assert_allclose(rule.scores(points, held).numpy(), _ref_krum_scores(points, held, f),
                                   rtol=1e-12)
        est, info = rule.estimate(points, held)
        assert info["selected"] == chosen
        np.testing.assert_allclose(est.numpy(), want, rtol=0, atol=1e-12)


def test_krum_pair_with_nothing_in_common_is_infinitely_far():
    x = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    # client 1 holds coordinate 1 only; clients 0 and 2 coordinate 0 only: 1 shares nothing with them
    held = torch.tensor([[1, 0], [0, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)
    scores = robust.Krum(f=0).scores(x, held)  # the n - f - 2 = 3 nearest
    assert math.isinf(scores[1])  # only 2 clients at a finite distance
    assert torch.isfinite(scores[[0, 2, 3, 4]]).all()
    np.testing.assert_allclose(scores.numpy(), _ref_krum_scores(x, held, 0))
    # nothing in common anywhere: every score infinite, the first folded is chosen
    est, info = robust.Krum(f=0).estimate(torch.arange(1.0, 26.0).reshape(5, 5), torch.eye(5, dtype=torch.bool))
    assert info["selected"] == [0] and est.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # its own coordinate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_geometric_median_minimizes_over_each_clients_coordinates(seed):
    points, held = _case(seed=seed)
    est, info = RULES["geomedian"].estimate(points, held)
    np.testing.assert_allclose(est.numpy(), _ref_geomedian(points, held), rtol=0, atol=1e-6)
    assert est[1] == 0 and abs(float(est[2]) - float(points[3, 2])) < 1e-12  # nobody; its only holder

    def objective(z):
        return float(sum(torch.linalg.norm((z - points.double()[i])[held[i]]) for i in range(len(points))))

    base = objective(est)
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):  # a local minimum: no small step does better
        assert objective(est + 1e-3 * torch.randn(est.shape, generator=g, dtype=torch.float64)) >= base - 1e-9
    assert info["iterations"] >= 1


# --------------------------------------------------------------------------
# Without coverage: what it was, bit for bit
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RULES))
def test_coverage_holding_everything_is_bit_identical_to_none(name):
    g = torch.Generator().manual_seed(7)
    for n, d in ((5, 1), (6, 33), (9, 200), (16, 1000)):
        points = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 10
        a, _ = RULES[name].estimate(points)
        b, _ = RULES[name].estimate(points, torch.ones(n, d, dtype=torch.bool))
        assert torch.equal(a, b), (n, d)


def _robust_run(agg, data):
    fa = small_fedavg(agg)
    state = fa.init()
    for r in (1, 2):
        state, _ = fa.next(state, data, fedzip.sample_clients(data.client_ids, 5, r, 0))
    return state.params


def test_fedavg_robust_runs_unchanged_by_an_all_held_coverage(monkeypatch):
    """The FedAvg path keeps no coverage; forcing one that holds everything
    into every fold changes no bit of the model (the masked computation
    reduces exactly to the plain one)."""
    data = TensorClients(n_clients=6, per_client=8)
    aggs = (robust.median(), robust.trimmed_mean(beta=0.2), robust.krum(f=1, m=2), robust.geometric_median())
    plain = [_robust_run(agg, data) for agg in aggs]
    original = robust.KeptUpdates.fold_decoded

    def all_held(self, update, weight, coverage=None):
        assert coverage is None  # FedAvg sends none
        original(self, update, weight, {k: torch.ones(v.shape, dtype=torch.bool) for k, v in update.items()})
        assert self.held is not None  # the masked computation is the one that runs

    monkeypatch.setattr(robust.KeptUpdates, "fold_decoded", all_held)
    forced = [_robust_run(agg, data) for agg in aggs]
    for p, q in zip(plain, forced, strict=True):
        assert all(torch.equal(p[k], q[k]) for k in p)


def test_kept_updates_keeps_coverage_only_when_given():
    agg = robust.median()
    like = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    acc = agg.accumulator(like)
    acc.fold_decoded({"w": torch.full((2, 3), 1.0), "b": torch.full((2,), 1.0)}, 1.0)
    assert acc.held is None  # FedAvg: no mask kept
    acc.fold_decoded({"w": torch.full((2, 3), 5.0), "b": torch.full((2,), 5.0)}, 1.0,
                     {"w": torch.tensor([[True, False, True], [False, False, False]])})  # "b": held whole
    acc.fold_decoded({"w": torch.full((2, 3), 3.0), "b": torch.full((2,), 3.0)}, 1.0)
    assert acc.held_matrix().tolist() == [[True] * 8, [True, False, True, False, False, False, True, True],
                                          [True] * 8]
    out = agg.finalize(agg.init(), acc, {})[0]
    # held by all three: median 3; by clients 0 and 2: (1 + 3) / 2 = 2
    assert out["w"].tolist() == [[3.0, 2.0, 3.0], [2.0, 2.0, 2.0]] and out["b"].tolist() == [3.0, 3.0]


# --------------------------------------------------------------------------
# Through the algorithms
# --------------------------------------------------------------------------


def _tiny_image_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))


def _sent(ex: RecordingExecutor, algo) -> dict[str, dict[str, torch.Tensor]]:
    codec = algo.aggregator.policy.codec  # float32: the sub-updates as trained
    return {r.client_id: {t.name: codec.decode(t.body, t.shape) for t in decode_message(r.message).tensors}
            for r in ex.results}


def _dropout_by_hand(sub: dict[str, torch.Tensor], idx: torch.Tensor, params):
    """A dropout client's sub-update on the model's coordinates (by explicit
    indexing: unit j of layer 1 owns row j of 1.weight and 1.bias, column j of
    3.weight) and the coordinates it held."""
    full = {k: torch.full_like(v, GARBAGE) for k, v in params.items()}
    held = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in params.items()}
    full["1.weight"][idx] = sub["1.weight"]
    held["1.weight"][idx] = True
    full["1.bias"][idx] = sub["1.bias"]
    held["1.bias"][idx] = True
    full["3.weight"][:, idx] = sub["3.weight"]
    held["3.weight"][:, idx] = True
    full["3.bias"] = sub["3.bias"]
    held["3.bias"][:] = True
    return full, held


def _rule_by_hand(rule: str, fulls, helds, names):
    """The rule on the clients' flattened updates (in task order) with the references above."""
    points = torch.stack([torch.cat([f[k].reshape(-1) for k in names]) for f in fulls])
    held = torch.stack([torch.cat([h[k].reshape(-1) for k in names]) for h in helds])
    if rule == "median":
        return _ref_median(points, held)
    if rule == "trimmed":
        return _ref_trimmed(points, held, 0.2)
    if rule == "krum":
        return _ref_krum(points, held, 1, 2)[0]
    return _ref_geomedian(points, held, steps=3000)


def _unflatten(flat: np.ndarray, params) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for k, v in params.items():
        out[k] = torch.from_numpy(flat[offset:offset + v.numel()]).reshape(v.shape)
        offset += v.numel()
    return out


AGGS = {"median": robust.median(), "trimmed": robust.trimmed_mean(beta=0.2), "krum": robust.krum(f=1, m=2),
        "geomedian": robust.geometric_median(iterations=500, nu=1e-9, ftol=1e-15)}


@pytest.mark.parametrize("rule", sorted(AGGS))
def test_dropout_round_takes_each_rule_over_the_holders(rule):
    data = TensorClients(n_clients=6, per_client=8)
    ex = RecordingExecutor()
    algo = federated_dropout(_tiny_image_mlp, SGD, SERVER, AGGS[rule], keep=0.5, seed=4, executor=ex,
                             preprocess=PRE)
    s0 = algo.init()
    s1, m = algo.next(s0, data, data.client_ids)
    assert m["clients/succeeded"] == 6
    sent = _sent(ex, algo)
    fulls, helds = [], []
    for cid in data.client_ids:  # task order: the order the rule's ties follow
        idx = torch.from_numpy(kept_units(algo.space.plan, algo.keep, 4, 1, cid)["1"])
        assert len(idx) == 4
        f, h = _dropout_by_hand(sent[cid], idx, s0.params)
        fulls.append(f)
        helds.append(h)
    want = _unflatten(_rule_by_hand(rule, fulls, helds, list(s0.params)), s0.params)
    tol = 1e-5 if rule == "geomedian" else 1e-7
    for k, p in s0.params.items():
        torch.testing.assert_close(s1.params[k] - p, want[k].float(), rtol=0, atol=tol)
    nobody = ~torch.stack([h["1.bias"] for h in helds]).any(0)
    assert torch.equal(s1.params["1.bias"][nobody], s0.params["1.bias"][nobody])  # no holder: unmoved


def test_random_mask_per_coordinate_trimmed_mean_over_the_holders():
    data = TensorClients(n_clients=6, per_client=8)
    ex = RecordingExecutor()
    algo = random_mask_updates(_tiny_image_mlp, SGD, SERVER, robust.trimmed_mean(beta=0.2), fraction=0.5,
                               per_coordinate=True, seed=4, executor=ex, preprocess=PRE)
    s0 = algo.init()
    s1, _ = algo.next(s0, data, data.client_ids)
    sent = _sent(ex, algo)
    fulls, helds = [], []
    for cid in data.client_ids:
        f, h = {}, {}
        for k, v in s0.params.items():
            if v.dim() < 2:  # biases: sent whole
                f[k], h[k] = sent[cid][k], torch.ones(v.shape, dtype=torch.bool)
                continue
            idx = algo.space.draw(k, tuple(v.shape), cid, 1, 4)
            f[k] = torch.full((v.numel(),), GARBAGE)
            f[k][idx] = sent[cid][k]
            h[k] = torch.zeros(v.numel(), dtype=torch.bool)
            h[k][idx] = True
        fulls.append(f)
        helds.append(h)
    want = _unflatten(_rule_by_hand("trimmed", fulls, helds, list(s0.params)), s0.params)
    for k, p in s0.params.items():
        torch.testing.assert_close(s1.params[k] - p, want[k].float(), rtol=0, atol=1e-7)


def test_lowrank_median_of_the_products():
    """Low rank holds every coordinate (B·A is dense): the median of the clients' B·A."""
    data = TensorClients(n_clients=5, per_client=8)
    ex = RecordingExecutor()
    algo = lowrank_updates(_tiny_image_mlp, SGD, SERVER, robust.median(), seed=4, executor=ex, preprocess=PRE)
    s0 = algo.init()
    s1, _ = algo.next(s0, data, data.client_ids)
    sent = _sent(ex, algo)
    for k, p in s0.params.items():
        rows = []
        for cid in data.client_ids:
            if p.dim() < 2:
                rows.append(sent[cid][k])
                continue
            fan_in = p.shape[1]
            r = sent[cid][k].shape[1]
            a = torch.randn(r, fan_in, generator=torch_rng(4, 1, cid, "lowrank", k)) / float(np.sqrt(fan_in))
            rows.append(sent[cid][k] @ a)
        want = torch.from_numpy(np.median(torch.stack(rows).double().numpy(), axis=0))
        torch.testing.assert_close(s1.params[k] - p, want.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [federated_dropout, lowrank_updates, random_mask_updates])
def test_the_robust_refusals_are_gone(make):
    data = TensorClients(n_clients=5, per_client=8)
    for agg in AGGS.values():
        algo = make(_tiny_image_mlp, SGD, SERVER, agg, seed=1, preprocess=PRE)
        _, m = algo.next(algo.init(), data, data.client_ids)
        assert m["clients/succeeded"] == 5


# --------------------------------------------------------------------------
# Processes, checkpoints
# --------------------------------------------------------------------------


def _dropout_krum(executor) -> fedzip.FederatedAlgorithm:
    return federated_dropout(_tiny_image_mlp, SGD, SERVER, robust.krum(f=1, m=2), keep=0.5, seed=4,
                             executor=executor, preprocess=PRE)


def _rounds(algo, data, state, rounds):
    history = []
    for r in rounds:
        state, m = algo.next(state, data, fedzip.sample_clients(data.client_ids, 5, r, 4))
        history.append(m)
    return state, history


def test_dropout_with_krum_on_processes_and_through_a_checkpoint(tmp_path):
    data = TensorClients(n_clients=6, per_client=8)
    local = _dropout_krum(LocalExecutor(threads=1))
    s, hist = _rounds(local, data, local.init(), (1, 2))
    with two_worker_processes() as ex:
        procs = _dropout_krum(ex)
        sp, hp = _rounds(procs, data, procs.init(), (1, 2))
    assert deterministic(hp) == deterministic(hist)
    assert all(torch.equal(sp.params[k], v) for k, v in s.params.items())
    loaded = checkpoint.load(checkpoint.save(tmp_path, s)).state
    a, ma = _rounds(local, data, s, (3,))
    b, mb = _rounds(_dropout_krum(LocalExecutor(threads=1)), data, loaded, (3,))
    assert deterministic(ma) == deterministic(mb)
    assert all(torch.equal(a.params[k], v) for k, v in b.params.items())
