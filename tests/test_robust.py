"""Byzantine-robust aggregation (fedzip.robust) against hand computations, and
against attacks (fedzip.attacks) by 2 of 10 clients on a small linear model."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import fedzip
from fedzip import attacks, robust
from fedzip.aggregators import Aggregator
from fedzip.codecs import CodecPolicy, SharedScaleQuantization, UniformQuantization
from fedzip.config import build_aggregator
from fedzip.data.federated import ClientExamples, Preprocess
from fedzip.errors import ConfigError, PayloadError, RoundFailedError
from fedzip.payload import encode_params
from fedzip.tasks.base import Task
from fedzip.wire import TensorRecord

# --------------------------------------------------------------------------
# The rules, on points given by hand
# --------------------------------------------------------------------------


def pts(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_median_odd_and_even():
    est, _ = robust.CoordinateMedian().estimate(pts([1, 10], [2, -5], [100, 0]))
    assert est.tolist() == [2.0, 0.0]
    est, _ = robust.CoordinateMedian().estimate(pts([1], [2], [3], [100]))
    assert est.tolist() == [2.5]  # the mean of the two middle values


def test_trimmed_mean_drops_floor_beta_n_at_each_end():
    est, info = robust.TrimmedMean(0.2).estimate(pts([-50, 7], [1, 7], [2, 7], [3, 7], [1000, 7]))
    assert info["trimmed_each_side"] == 1 and est.tolist() == [2.0, 7.0]
    est, info = robust.TrimmedMean(0.24).estimate(pts([1], [2], [3], [100]))  # floor(0.96) = 0
    assert info["trimmed_each_side"] == 0 and est.tolist() == [26.5]
    est, _ = robust.TrimmedMean(0.25).estimate(pts([1], [2], [3], [100]))
    assert est.tolist() == [2.5]
    est, _ = robust.TrimmedMean(0.0).estimate(pts([1], [2], [3], [100]))
    assert est.tolist() == [26.5]  # beta 0 is the mean


def test_krum_scores_and_choice_by_hand():
    # 1-D points, n = 7, f = 2: each score sums the n - f - 2 = 3 smallest squared distances
    x = pts([0], [1], [3], [4], [10], [50], [-40])
    # 0: 1+9+16   1: 1+4+9   3: 1+4+9   4: 1+9+16   10: 36+49+81
    # 50: 1600+2116+2209   -40: 1600+1681+1849
    want = [26, 14, 14, 26, 166, 5925, 5130]
    rule = robust.Krum(f=2)
    assert rule.scores(x).tolist() == want
    est, info = rule.estimate(x)
    assert info["selected"] == [1] and est.tolist() == [1.0]  # a tie goes to the first folded
    est, info = robust.Krum(f=2, m=4).estimate(x)
    assert info["selected"] == [1, 2, 0, 3] and est.tolist() == [2.0]  # mean of 1, 3, 0, 4


def test_krum_on_vectors_picks_from_the_honest_cluster():
    g = torch.Generator().manual_seed(1)
    honest = torch.randn(8, 50, generator=g) * 0.1 + 1.0
    evil = torch.full((2, 50), -30.0)
    est, info = robust.Krum(f=2).estimate(torch.cat([evil, honest]))
    assert info["selected"][0] >= 2
    assert torch.equal(est.float(), honest[info["selected"][0] - 2])


def test_krum_needs_n_above_2f_plus_2():
    with pytest.raises(RoundFailedError, match="at least 7"):
        robust.Krum(f=2).estimate(pts([0], [1], [2], [3], [4], [5]))
    with pytest.raises(RoundFailedError, match="m=4"):
        robust.Krum(f=0, m=4).estimate(pts([0], [1], [2]))


def test_weiszfeld_finds_the_fermat_point_of_a_triangle():
    # isosceles triangle (-1, 0), (1, 0), (0, 3): the geometric median is the
    # Fermat point, where the sides subtend 120 degrees: (0, 1/sqrt(3)); the mean is (0, 1)
    x = pts([-1, 0], [1, 0], [0, 3])
    est, info = robust.GeometricMedian(iterations=1000, nu=1e-12, ftol=1e-15).estimate(x)
    assert est[0].abs() < 1e-9
    assert est[1].item() == pytest.approx(1 / math.sqrt(3), abs=1e-6)
    assert info["iterations"] > 1


def test_weiszfeld_on_symmetric_sets_and_an_outlier():
    # a symmetric cross about (3, -2): the median is its centre, which the mean also is
    c = torch.tensor([3.0, -2.0])
    cross = torch.stack([c + d for d in pts([1, 0], [-1, 0], [0, 2], [0, -2])])
    est, _ = robust.GeometricMedian().estimate(cross)
    assert torch.allclose(est, c.double(), atol=1e-9)
    # add the centre and one far point: the unit vectors from the centre to the
    # others sum to norm 1, so the centre stays optimal while the mean moves far off
    far = c + torch.tensor([60.0, 80.0])
    x = torch.cat([cross, c[None], far[None]])
    est, _ = robust.GeometricMedian(iterations=2000, nu=1e-9, ftol=1e-14).estimate(x)
    assert (est - c.double()).norm() < 1e-2
    assert (x.double().mean(0) - c.double()).norm() > 15


def test_weiszfeld_stops_at_the_iteration_cap():
    x = pts([-1, 0], [1, 0], [0, 3])
    _, info = robust.GeometricMedian(iterations=3, ftol=1e-15).estimate(x)
    assert info["iterations"] == 3


@pytest.mark.parametrize("bad", [
    lambda: robust.TrimmedMean(0.5), lambda: robust.TrimmedMean(-0.1), lambda: robust.Krum(f=-1),
    lambda: robust.Krum(f=1, m=0), lambda: robust.GeometricMedian(iterations=0),
    lambda: robust.GeometricMedian(nu=0.0), lambda: robust.GeometricMedian(ftol=float("nan")),
])
def test_bad_arguments_are_config_errors(bad):
    with pytest.raises(ConfigError):
        bad()


# --------------------------------------------------------------------------
# The accumulator
# --------------------------------------------------------------------------

TEMPLATE = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}


def records(update, policy=None, seed=0):
    return encode_params(update, policy or CodecPolicy(), torch.Generator().manual_seed(seed))


def updates(values):
    return [{"w": torch.full((2, 3), float(v)), "b": torch.tensor([float(v), -float(v)])} for v in values]


# Krum (f=1): 2 and 3 tie at the best score 1 + 1; the first folded wins
@pytest.mark.parametrize("agg,want", [
    (robust.median(), 3.0), (robust.trimmed_mean(beta=0.2), 3.0),
    (robust.krum(f=1), 2.0), (robust.geometric_median(), 3.0), (fedzip.mean(weighted=False), 22.0),
])
def test_through_the_accumulator(agg, want):
    acc = agg.accumulator(TEMPLATE)
    for u in updates([1, 2, 3, 4, 100]):
        acc.fold(records(u), weight=1.0)
    out = agg.finalize(agg.init(), acc, {})[0]
    assert torch.allclose(out["w"], torch.full((2, 3), want))
    assert torch.allclose(out["b"], torch.tensor([want, -want]))


def test_robust_rules_ignore_weights():
    agg = robust.median()
    results = []
    for weights in ([1, 1, 1, 1, 1], [0, 5, 1e9, 2, 1]):
        acc = agg.accumulator(TEMPLATE)
        for u, w in zip(updates([1, 2, 3, 4, 100]), weights, strict=True):
            acc.fold(records(u), weight=float(w))
        results.append(agg.finalize(agg.init(), acc, {})[0])
    assert all(torch.equal(results[0][k], results[1][k]) for k in TEMPLATE)


def test_accumulator_keeps_every_update_and_checks_each():
    agg = robust.median()
    acc = agg.accumulator(TEMPLATE)
    assert isinstance(acc, robust.KeptUpdates)
    good = records(updates([1])[0])
    acc.fold(good, 1.0)
    bad = [TensorRecord(t.name, t.codec, (3, 2), t.body) if t.name == "w" else t for t in good]
    with pytest.raises(PayloadError):
        acc.fold(bad, 1.0)
    with pytest.raises(PayloadError):
        acc.fold(good, float("nan"))
    with pytest.raises(PayloadError, match="coverage"):  # coverage is kept now, checked first
        acc.fold(good, 1.0, coverage={"w": torch.ones(3, 2, dtype=torch.bool)})
    assert acc.count == 1 and len(acc.rows) == 1  # nothing kept from a rejected update
    acc.fold(good, 1.0)
    with pytest.raises(PayloadError, match="does not match"):
        acc.fold_decoded({"w": torch.zeros(2, 3)}, 1.0)
    acc.fold_decoded(updates([5])[0], 1.0)  # already decoded (algorithms with their own update space)
    assert acc.matrix().shape == (3, 8)  # O(cohort x model): one row per client


def test_robust_rules_compose_with_lossy_codecs():
    codec = UniformQuantization(bits=8)
    agg = robust.median(codec)
    acc = agg.accumulator(TEMPLATE)
    for i, u in enumerate(updates([1, 2, 3, 4, 100])):
        acc.fold(records(u, agg.policy, seed=i), 1.0)
    out = agg.finalize(agg.init(), acc, {})[0]
    assert torch.allclose(out["w"], torch.full((2, 3), 3.0), atol=0.5)


def test_secure_aggregation_policies_are_refused():
    ssq = SharedScaleQuantization(bits=8, bound=10.0)
    for make in (robust.median, robust.trimmed_mean, robust.krum, robust.geometric_median):
        with pytest.raises(ConfigError, match="summable"):
            make(ssq)
    # an aggregator edited by hand into that combination is refused when the round starts
    agg = Aggregator((), CodecPolicy(codec=ssq, small=ssq), weighted=False, accumulator_kind=robust.CoordinateMedian())
    with pytest.raises(ConfigError, match="secure aggregation"):
        agg.accumulator(TEMPLATE)


def test_stages_compose_around_a_rule():
    agg = fedzip.clipping(robust.median(), 1.0)
    assert agg.accumulator_kind == robust.CoordinateMedian()
    state = agg.init()
    scalars = agg.broadcast_scalars(state)
    acc = agg.accumulator(TEMPLATE)
    reports: dict[str, float] = {}
    for u in updates([0.1, 0.2, 0.3, 5.0, 100.0]):
        recs, rep, _ = agg.client_encode(scalars, u, torch.Generator().manual_seed(0))
        acc.fold(recs, 1.0)
        agg.fold_reports(reports, rep)
    out, _, meas = agg.finalize(state, acc, reports)
    assert meas["clipping/clipped_count"] == 2
    assert torch.allclose(out["w"], torch.full((2, 3), 0.3))


def test_config_dict_names():
    assert build_aggregator({"type": "median"}).accumulator_kind == robust.CoordinateMedian()
    agg = build_aggregator({"type": "trimmed_mean", "beta": 0.2, "codec": {"type": "uniform", "bits": 8},
                            "threshold": 0})
    assert agg.accumulator_kind == robust.TrimmedMean(0.2) and isinstance(agg.policy.codec, UniformQuantization)
    assert build_aggregator({"type": "krum", "f": 2, "m": 3}).accumulator_kind == robust.Krum(2, 3)
    agg = build_aggregator({"type": "geometric_median", "iterations": 5, "nu": 1e-5})
    assert agg.accumulator_kind == robust.GeometricMedian(5, 1e-5)
    agg = build_aggregator({"type": "clipping", "norm": 1.0, "inner": {"type": "median"}})
    assert agg.stages[0].key == "clipping" and agg.accumulator_kind == robust.CoordinateMedian()
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_aggregator({"type": "krum", "byzantine": 2})
    with pytest.raises(ConfigError, match="beta"):
        build_aggregator({"type": "trimmed_mean", "beta": 0.7})


# --------------------------------------------------------------------------
# Attacks, 2 of 10 clients, on a linear model over Gaussian blobs
# --------------------------------------------------------------------------

D, C = 20, 4


def linear_model():
    return nn.Linear(D, C)


TASK = Task(name="blobs", model_fn=linear_model)


class Blobs:
    """``n`` clients of ``per`` examples from the same ``C`` Gaussian blobs (IID)."""

    def __init__(self, n: int = 10, per: int = 40, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(C, D, generator=g) * 2
        self.examples = {}
        for i in range(n):
            y = torch.randint(0, C, (per,), generator=g)
            self.examples[f"c{i}"] = ClientExamples(centers[y] + torch.randn(per, D, generator=g), y)

    @property
    def client_ids(self):
        return list(self.examples)

    def client(self, cid):
        return self.examples[cid]


DATA = Blobs()
IDS = DATA.client_ids
ATTACKERS = IDS[:2]


def algorithm(aggregator):
    return fedzip.weighted_fedavg(
        task=TASK, client_optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        server_optimizer=functools.partial(torch.optim.SGD, lr=1.0), aggregator=aggregator,
        preprocess=Preprocess(batch_size=20, epochs=5, shuffle_buffer=100))


def round_delta(fa, data=DATA, ids=IDS):
    s0 = fa.init()
    s1, metrics = fa.next(s0, data, ids)
    assert metrics["clients/failed"] == 0
    return torch.cat([(s1.params[k] - s0.params[k]).reshape(-1) for k in s0.params])


@pytest.fixture(scope="module")
def honest_mean():
    """The unweighted mean update of the 8 honest clients alone."""
    return round_delta(algorithm(fedzip.mean(weighted=False)), ids=IDS[2:])


ROBUST = {
    "median": robust.median, "trimmed_mean": functools.partial(robust.trimmed_mean, beta=0.2),
    "krum": functools.partial(robust.krum, f=2), "multi_krum": functools.partial(robust.krum, f=2, m=5),
    "geometric_median": robust.geometric_median,
}


def off(delta, honest):
    """Distance to the honest mean, relative to its norm."""
    return float((delta - honest).norm() / honest.norm())


@pytest.mark.parametrize("attack", [attacks.SignFlip(10.0), attacks.ScaleUpdate(20.0)], ids=["sign_flip", "scaled"])
def test_update_attacks_pull_the_mean_off_but_not_robust_rules(attack, honest_mean):
    mean_off = off(round_delta(attacks.attacked(algorithm(fedzip.mean(weighted=False)), ATTACKERS, attack)),
                   honest_mean)
    assert mean_off > 2.0
    for name, make in ROBUST.items():
        robust_off = off(round_delta(attacks.attacked(algorithm(make()), ATTACKERS, attack)), honest_mean)
        # a robust rule stays about as close as one honest client's update is (Krum picks one)
        assert robust_off < 0.2, name
        assert mean_off > 10 * robust_off, name


def test_attacks_change_nothing_for_honest_clients_and_clipping_does_not_bind_attackers(honest_mean):
    # the attackers' chain ends with the attack: client-side clipping does not bind them
    agg = fedzip.clipping(fedzip.mean(weighted=False), 0.05)
    fa = attacks.attacked(algorithm(agg), ATTACKERS, attacks.ScaleUpdate(1000.0))
    s0 = fa.init()
    _, metrics = fa.next(s0, DATA, IDS)
    assert metrics["aggregator/clipping/clipped_count"] == 10  # everyone clipped...
    moved = round_delta(fa)
    assert moved.norm() > 5  # ...and still two clients of norm 50 each: (2 x 50) / 10
    # honest clients run the algorithm's own work: the same bits as without attackers
    plain = algorithm(fedzip.mean(weighted=False))
    fa = attacks.attacked(plain, [], attacks.SignFlip(10.0))
    assert torch.equal(round_delta(fa), round_delta(plain))
    assert not isinstance(plain.work, attacks.AttackedWork)  # the original is left as it was


def test_label_flip(honest_mean):
    flipped = attacks.LabelFlip(DATA, ATTACKERS, num_classes=C)
    assert torch.equal(flipped.client("c0").y, C - 1 - DATA.client("c0").y)
    assert flipped.client("c5") is DATA.client("c5")
    mean_off = off(round_delta(algorithm(fedzip.mean(weighted=False)), flipped), honest_mean)
    assert mean_off > 0.2
    for name, make in ROBUST.items():
        robust_off = off(round_delta(algorithm(make()), flipped), honest_mean)
        limit = 0.6 if name == "krum" else 0.3  # Krum returns one client's update: its own spread
        assert mean_off * limit > robust_off, name


def test_lying_about_the_weight_moves_a_weighted_mean_not_a_robust_rule(honest_mean):
    attack = attacks.SignFlip(1.0)
    lie = dict(update=attack, weight=1e6)
    weighted = off(round_delta(attacks.attacked(algorithm(fedzip.mean()), ATTACKERS, **lie)), honest_mean)
    honest_weight = off(round_delta(attacks.attacked(algorithm(fedzip.mean()), ATTACKERS, attack)), honest_mean)
    assert weighted > 1.9 and honest_weight < 0.6  # the liars' flipped update is nearly the whole mean
    for name, make in ROBUST.items():
        told = round_delta(attacks.attacked(algorithm(make()), ATTACKERS, attack))
        lied = round_delta(attacks.attacked(algorithm(make()), ATTACKERS, **lie))
        assert torch.equal(told, lied), name  # the weight counts nowhere: the same bits


def test_weight_lie_rewrites_only_the_weight():
    fa = attacks.attacked(algorithm(fedzip.mean()), ["c1"], weight=lambda w: 3 * w)
    seen = {}

    class Spy:
        def map(self, work, data, tasks):
            for res in fedzip.LocalExecutor().map(work, data, tasks):
                from fedzip.wire import decode_message

                seen[res.client_id] = decode_message(res.message).scalars["weight"]
                yield res

    fa.executor = Spy()
    fa.next(fa.init(), DATA, ["c0", "c1"])
    assert seen == {"c0": 200.0, "c1": 600.0}  # examples trained on: 5 epochs of 40


def test_attack_arguments_are_checked():
    plain = algorithm(fedzip.mean())
    with pytest.raises(ConfigError):
        attacks.attacked(plain, ["c0"], update="flip")
    with pytest.raises(ConfigError):
        attacks.attacked(plain, ["c0"], weight=float("inf"))
    with pytest.raises(ConfigError):
        attacks.SignFlip(float("nan"))
    with pytest.raises(ConfigError):
        attacks.LabelFlip(DATA, ["c0"], num_classes=4, permutation=[0, 1, 1, 2])


def test_attacked_work_pickles():
    import pickle

    fa = attacks.attacked(algorithm(fedzip.mean()), ATTACKERS, attacks.SignFlip(2.0), weight=5.0)
    round_delta(fa)  # builds the attackers' copy
    back = pickle.loads(pickle.dumps(fa.work))
    assert back._evil is None and back.attackers == frozenset(ATTACKERS)
