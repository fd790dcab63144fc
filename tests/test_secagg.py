"""Secure aggregation (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020) against
the plain encoded sum: the same integers, whoever drops, and never less than
the threshold."""

import functools
import itertools
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch.optim import SGD

import fedzip
from fedzip.algorithms.client import ClientTask
from fedzip.bitpack import packed_size, unpack_bits
from fedzip.codecs import SharedScaleQuantization, UniformQuantization
from fedzip.errors import ConfigError, PayloadError, RoundFailedError
from fedzip.privacy import shamir
from fedzip.privacy.secagg import (
    MASKED_TAG,
    SecAggConfig,
    SecureSum,
    mask_update,
    modulus_bits,
    neighbour_graph,
    secure_mean,
)
from fedzip.seeding import torch_rng
from fedzip.wire import Kind, TensorRecord, encode_message
from tests.fakes import TensorClients

CODEC = SharedScaleQuantization(bits=8, bound=1.0)
SHAPES = {"b": (7,), "w": (40, 25)}


def _updates(n, seed=0, value=None):
    g = torch.Generator().manual_seed(seed)
    if value is not None:
        return [{k: torch.full(s, value) for k, s in SHAPES.items()} for _ in range(n)]
    return [{k: torch.rand(s, generator=g) * 2 - 1 for k, s in SHAPES.items()} for _ in range(n)]


def _protocol(agg, updates, seed=0, round_num=1):
    """Keys advertised and shared; each client's plain records and masked records."""
    acc = agg.accumulator(updates[0])
    tasks = acc.setup(seed, round_num, [ClientTask(f"c{i}", round_num, b"") for i in range(len(updates))])
    plain, masked = {}, {}
    for t, u in zip(tasks, updates, strict=True):
        recs, _, _ = agg.client_encode({}, u, torch_rng(seed, round_num, t.client_id, "codec"))
        plain[t.client_id] = recs
        masked[t.client_id] = mask_update(t.secagg, recs, agg.policy, seed, round_num, t.client_id)
    return acc, plain, masked


def _plain_sum(plain, clients):
    acc = fedzip.mean(CODEC, weighted=False).accumulator({k: torch.zeros(s) for k, s in SHAPES.items()})
    for c in clients:
        acc.fold(plain[c], 1.0)
    return acc


def _fedavg(aggregator, **kw):
    return fedzip.weighted_fedavg(fedzip.fedavg_cnn, functools.partial(SGD, lr=0.05),
                                  functools.partial(SGD, lr=1.0), aggregator, **kw)


def test_one_client_gets_exactly_its_encoded_update_back():
    agg = secure_mean(CODEC, threshold=1)
    acc, plain, masked = _protocol(agg, _updates(1))
    assert all(r.codec == MASKED_TAG for r in masked["c0"])
    # the self mask is there: the masked bytes are not the codes
    assert all(m.body != p.body for m, p in zip(masked["c0"], plain["c0"], strict=True))
    acc.fold_masked("c0", masked["c0"])
    total = acc.result()
    for rec in plain["c0"]:
        codes = CODEC.parse_summand(rec.body, rec.shape)
        assert np.array_equal(acc.sums[rec.name].astype(np.int64), codes.numpy())
        assert torch.equal(total.sums[rec.name].to(torch.float32), CODEC.decode(rec.body, rec.shape))
    assert acc.decoded_individually == 0


@pytest.mark.parametrize("neighbours", [None, 4])
def test_secure_sum_is_the_plain_sum_for_any_survivors_above_the_threshold(neighbours):
    n, rng = 9, random.Random(0)
    agg = secure_mean(CODEC, threshold=0.5, neighbours=neighbours)
    outcomes = Counter()
    for trial in range(10):
        acc, plain, masked = _protocol(agg, _updates(n, seed=trial), round_num=trial + 1)
        ids = list(plain)
        before = set(rng.sample(ids, rng.randint(0, 2)))  # gone before sending a masked input
        survivors = [c for c in ids if c not in before]
        after = set(rng.sample(survivors, rng.randint(0, 2)))  # gone after it, before unmasking
        for c in survivors:
            acc.fold_masked(c, masked[c])
        # the oracle: every survivor's seed and every dropout's key (when a neighbour of it
        # survived) needs `threshold` shares among the clients still answering
        index = {c: i for i, c in enumerate(ids, 1)}
        answering = {index[c] for c in survivors if c not in after}
        alive = {index[c] for c in survivors}
        ok = len(alive) >= min(acc.thresholds.values())
        for u in range(1, n + 1):
            holders = (set(acc.graph[u]) | {u}) & answering
            needed = u in alive or bool(set(acc.graph[u]) & alive)
            ok &= not needed or len(holders) >= acc.thresholds[u]
        if not ok:
            with pytest.raises(RoundFailedError):
                acc.unmask(responding=[c for c in survivors if c not in after])
            outcomes["refused"] += 1
            continue
        acc.unmask(responding=[c for c in survivors if c not in after])
        reference = _plain_sum(plain, survivors)
        for name in SHAPES:
            assert np.array_equal(acc.sums[name].astype(np.int64), reference.int_sums[name].numpy())
        ours, theirs = acc.result(), reference.result()
        assert all(torch.equal(ours.sums[k], theirs.sums[k]) for k in SHAPES)
        assert ours.count == theirs.count == len(survivors)
        outcomes["equal", bool(before), bool(after)] += 1
    # both kinds of recovery were exercised: dropouts before the upload and after it
    assert any(k[1] and k[2] for k in outcomes if k != "refused")


def test_a_round_updates_the_model_as_the_encoded_sum_of_the_same_survivors():
    data = TensorClients(n_clients=5, per_client=8, poison={"c3"})  # c3's update is NaN: it drops
    ids = ["c0", "c1", "c2", "c3", "c4"]
    plain = _fedavg(fedzip.clipping(fedzip.mean(CODEC, weighted=False), 1.0), min_clients=3)
    secure = _fedavg(fedzip.clipping(secure_mean(CODEC, threshold=0.5, unmask_dropout=0.2), 1.0), min_clients=3)
    s0 = plain.init()
    s1, m1 = plain.next(s0, data, ids)
    s2, m2 = secure.next(s0, data, ids)
    assert all(torch.equal(s1.params[k], s2.params[k]) for k in s0.params)
    assert m2["clients/failed"] == 1 and m2["aggregator/secagg/survivors"] == 4
    assert m2["aggregator/secagg/dropped_before_upload"] == 1
    assert m2["aggregator/secagg/dropped_before_unmask"] == 1  # its seed recovered from the others
    assert m2["aggregator/clipping/clipped_count"] == m1["aggregator/clipping/clipped_count"]


def test_a_masked_input_is_uniform_whatever_the_input():
    n, numel = 3, 60_000
    agg = secure_mean(CODEC, threshold=2)
    lo = [{"w": torch.full((numel,), -1.0)}] * n  # every code 0
    hi = [{"w": torch.full((numel,), 1.0)}] * n  # every code 255
    m = modulus_bits(CODEC, n)
    assert m == 10
    samples = []
    for updates in (lo, hi):
        _, plain, masked = _protocol(agg, updates)
        samples.append(unpack_bits(masked["c1"][0].body, m, numel))
    for s in samples:
        counts = np.bincount(s, minlength=2**m)
        assert stats.chisquare(counts).pvalue > 1e-3  # uniform over Z_2^m
    both = np.stack([np.bincount(s, minlength=2**m) for s in samples])
    assert stats.chi2_contingency(both).pvalue > 1e-3  # and the same for both inputs
    codes = CODEC.parse_summand(plain["c1"][0].body, (numel,)).numpy()
    assert stats.chisquare(np.bincount(codes, minlength=2**m)).pvalue < 1e-12  # the test has power


def test_below_the_threshold_the_round_fails_and_the_state_is_unchanged():
    data = TensorClients(n_clients=5, per_client=8, poison={"c2"})
    algo = _fedavg(fedzip.clipping(secure_mean(CODEC, threshold=4), 1.0), min_clients=1)
    s0 = algo.init()
    before = {k: v.clone() for k, v in s0.params.items()}
    with pytest.raises(RoundFailedError, match="3 masked inputs, at least 4"):
        algo.next(s0, data, ["c0", "c1", "c2", "c3"])
    assert s0.round == 0 and all(torch.equal(before[k], s0.params[k]) for k in before)
    s1, m = algo.next(s0, data, ["c0", "c1", "c3", "c4"])  # the same state goes on with 4 survivors
    assert s1.round == 1 and m["aggregator/secagg/survivors"] == 4
    # too many gone before unmasking: the shares fall short, and the round fails the same way
    algo = _fedavg(fedzip.clipping(secure_mean(CODEC, threshold=4, unmask_dropout=0.5), 1.0))
    with pytest.raises(RoundFailedError, match="shares of client"):
        algo.next(s0, data, ["c0", "c1", "c3", "c4"])


def test_shamir_any_t_shares_reconstruct():
    secret = int.from_bytes(bytes(range(32)), "little")
    holders, t = [1, 2, 3, 4, 5, 6], 4
    shares = shamir.split(secret, holders, t, shamir.random_elements(b"k" * 32, t - 1))
    for subset in itertools.combinations(holders, t):
        assert shamir.reconstruct({x: shares[x] for x in subset}, t) == secret
    for subset in itertools.combinations(holders, t - 1):  # too few: refused, and alone they are wrong
        with pytest.raises(PayloadError):
            shamir.reconstruct({x: shares[x] for x in subset}, t)
        assert shamir.reconstruct({x: shares[x] for x in subset}, t - 1) != secret
    assert all(shamir.from_bytes(shamir.to_bytes(s)) == s for s in shares.values())


def test_shamir_t_minus_one_shares_reveal_nothing():
    # exhaustively over a small field: for every secret, t-1 shares take every value
    # exactly once as the coefficients range over the field, so their distribution
    # does not depend on the secret
    p, t, holders = 31, 3, [1, 2, 3, 4, 5]
    for seen in itertools.combinations(holders, t - 1):
        dists = []
        for secret in (0, 17):
            dist = Counter()
            for coeffs in itertools.product(range(p), repeat=t - 1):
                shares = shamir.split(secret, holders, t, coeffs, prime=p)
                dist[tuple(shares[x] for x in seen)] += 1
            dists.append(dist)
        assert dists[0] == dists[1] and set(dists[0].values()) == {1} and len(dists[0]) == p ** (t - 1)


def test_secagg_plus_graph_has_the_configured_degree_and_masks_cancel_over_it():
    for n, k in [(20, 6), (9, 4), (11, 2)]:
        g = neighbour_graph(n, k, seed=0, round_num=1)
        assert sorted(g) == list(range(1, n + 1))
        assert all(len(nb) == k and u not in nb for u, nb in g.items())
        assert all(u in g[v] for u, nb in g.items() for v in nb)  # symmetric: both ends mask
    assert neighbour_graph(20, 6, 0, 1) != neighbour_graph(20, 6, 0, 2)  # fresh each round
    assert all(len(nb) == 4 for nb in neighbour_graph(5, 4, 0, 1).values())  # k >= n - 1: complete
    # every code 0: after removing only the self masks (nobody dropped), the sum is 0
    agg = secure_mean(CODEC, threshold=0.5, neighbours=4)
    acc, _, masked = _protocol(agg, _updates(12, value=-1.0))
    for c, recs in masked.items():
        acc.fold_masked(c, recs)
    acc.unmask()
    assert all(not acc.sums[name].any() for name in SHAPES)
    assert acc.measurements()["secagg/neighbours"] == 4


def _expected_protocol_bits(n, neighbours):
    """Bits per client of the protocol messages, from the layout alone (no dropouts)."""
    def msg(kind, records, scalars=None):
        return 8 * len(encode_message(kind, scalars or {}, [TensorRecord(*r) for r in records]))

    k = n - 1 if neighbours is None or neighbours >= n - 1 else neighbours
    ct = 8 + 2 * shamir.SHARE_BYTES + 16
    advertise = msg(Kind.UPDATE, [("secagg/public_keys", "x25519", (1, 2, 32), bytes(64))]) + msg(
        Kind.BROADCAST, [("secagg/neighbours", "u32", (k,), bytes(4 * k)),
                         ("secagg/public_keys", "x25519", (k, 2, 32), bytes(64 * k))],
        {"secagg/index": 1, "secagg/cohort": n, "secagg/threshold": 1})
    share_keys = msg(Kind.UPDATE, [("secagg/recipients", "u32", (k,), bytes(4 * k)),
                                   ("secagg/shares", "chacha20poly1305", (k, ct), bytes(ct * k))]) + msg(
        Kind.BROADCAST, [("secagg/senders", "u32", (k,), bytes(4 * k)),
                         ("secagg/shares", "chacha20poly1305", (k, ct), bytes(ct * k))])
    s = shamir.SHARE_BYTES
    unmask = msg(Kind.BROADCAST, [("secagg/survivors", "u32", (k + 1,), bytes(4 * (k + 1)))]) + msg(
        Kind.UPDATE, [("secagg/seed_owners", "u32", (k + 1,), bytes(4 * (k + 1))),
                      ("secagg/seed_shares", "shamir", (k + 1, s), bytes(s * (k + 1))),
                      ("secagg/key_owners", "u32", (0,), b""), ("secagg/key_shares", "shamir", (0, s), b"")])
    return {"advertise": advertise, "share_keys": share_keys, "unmask": unmask}


@pytest.mark.parametrize("neighbours", [None, 4])
def test_every_protocol_message_is_counted_and_reported_per_client(neighbours):
    n = 7
    data = TensorClients(n_clients=n, per_client=6)
    algo = _fedavg(fedzip.clipping(secure_mean(CODEC, threshold=0.5, neighbours=neighbours), 1.0))
    s0 = algo.init()
    _, m = algo.next(s0, data, data.client_ids)
    expected = _expected_protocol_bits(n, neighbours)
    for phase, bits in expected.items():
        assert m[f"aggregator/secagg/bits_per_client/{phase}"] == bits
    assert m["aggregator/secagg/bits_per_client/protocol"] == sum(expected.values())
    # the masked input: m = 8 + ceil(log2 7) = 11 bits per coordinate, what the update's tensors cost
    mbits = 8 + math.ceil(math.log2(n))
    assert m["aggregator/secagg/modulus_bits"] == mbits
    masked = 8 * sum(packed_size(v.numel(), mbits) for v in s0.params.values())
    assert m["aggregator/secagg/bits_per_client/masked_input"] == masked
    assert m["aggregated_bits/tensors"] == n * masked


def test_secagg_plus_costs_less_per_client_than_secagg_in_a_large_cohort():
    n, updates = 40, _updates(40)
    per_client = {}
    for k in (None, 6):
        acc, _, masked = _protocol(secure_mean(CODEC, threshold=0.5, neighbours=k), updates)
        for c, recs in masked.items():
            acc.fold_masked(c, recs)
        acc.result()
        per_client[k] = acc.measurements()["secagg/bits_per_client/protocol"]
        assert per_client[k] == sum(_expected_protocol_bits(n, k).values())
    assert per_client[6] < per_client[None] / 4


def test_the_server_never_decodes_an_individual_update():
    calls = Counter()

    class Spy(SharedScaleQuantization):
        def parse_summand(self, data, shape):
            calls["parse_summand"] += 1
            return super().parse_summand(data, shape)

        def decode(self, data, shape):
            calls["decode"] += 1
            return super().decode(data, shape)

        def decode_sum(self, total, count, shape):
            calls["decode_sum", count] += 1
            return super().decode_sum(total, count, shape)

    agg = secure_mean(Spy(8, 1.0), threshold=0.5)
    acc, _, masked = _protocol(agg, _updates(5))
    calls.clear()  # the clients parsed their own codes to mask them; from here on, the server
    for c in ["c0", "c1", "c3", "c4"]:
        acc.fold_masked(c, masked[c])
    agg.finalize(agg.init(), acc, {})
    assert calls == Counter({("decode_sum", 4): len(SHAPES)})  # the sums, once each; nothing else
    assert acc.decoded_individually == 0


def test_sums_of_the_largest_codes_do_not_wrap():
    for n in (4, 5):  # a power of two: n * 255 = 1020 < 2^10, the tightest case
        acc, plain, masked = _protocol(secure_mean(CODEC, threshold=1), _updates(n, value=1.0))
        for c, recs in masked.items():
            acc.fold_masked(c, recs)
        acc.unmask()
        assert all((acc.sums[name] == n * 255).all() for name in SHAPES)
    assert modulus_bits(CODEC, 4) == 10 and modulus_bits(CODEC, 5) == 11
    with pytest.raises(ConfigError, match="at most 65536 clients"):
        modulus_bits(SharedScaleQuantization(16, 1.0), 2**16 + 1)


def test_misconfigurations_are_named():
    with pytest.raises(ConfigError, match="SummableCodec"):
        secure_mean(UniformQuantization(bits=8))
    with pytest.raises(ConfigError, match="even"):
        SecAggConfig(neighbours=3)
    with pytest.raises(ConfigError, match="threshold"):
        SecAggConfig(threshold=0)
    agg = secure_mean(CODEC, threshold=5)
    acc = agg.accumulator({k: torch.zeros(s) for k, s in SHAPES.items()})
    assert isinstance(acc, SecureSum)
    with pytest.raises(ConfigError, match="exceeds the 3 holders"):
        acc.setup(0, 1, [ClientTask(f"c{i}", 1, b"") for i in range(3)])
    with pytest.raises(ConfigError):
        agg.accumulator({"w": torch.zeros(3)}, decode_each=True)


def test_a_masked_input_is_taken_once_and_only_from_the_cohort():
    acc, _, masked = _protocol(secure_mean(CODEC, threshold=2), _updates(3))
    acc.fold_masked("c0", masked["c0"])
    with pytest.raises(PayloadError, match="twice"):
        acc.fold_masked("c0", masked["c0"])
    with pytest.raises(PayloadError, match="not in the cohort"):
        acc.fold_masked("c9", masked["c1"])
    short = [TensorRecord(r.name, r.codec, r.shape, r.body[:-1]) for r in masked["c1"]]
    with pytest.raises(PayloadError):
        acc.fold_masked("c1", short)
    assert acc.count == 1


def test_fedzip_imports_and_trains_without_cryptography_until_secure_aggregation_is_asked_for():
    """cryptography loads with secure aggregation, not with fedzip: a machine
    without it (a GPU image) still runs everything else."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['cryptography'] = None\n"  # as if it were not installed
        "import functools, torch, fedzip\n"
        "from tests.fakes import TensorClients\n"
        "assert 'fedzip.privacy.secagg' not in sys.modules\n"
        "data = TensorClients(n_clients=3)\n"
        "fa = fedzip.weighted_fedavg(fedzip.fedavg_cnn, functools.partial(torch.optim.SGD, lr=0.1),\n"
        "                            functools.partial(torch.optim.SGD, lr=1.0), fedzip.compression_aggregator())\n"
        "_, m = fa.next(fa.init(), data, data.client_ids)\n"
        "assert m['clients/succeeded'] == 3\n"
        "try:\n"
        "    fedzip.secure_mean\n"
        "except ImportError:\n"
        "    print('secure aggregation needs cryptography')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    assert "secure aggregation needs cryptography" in out.stdout
