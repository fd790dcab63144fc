"""Secure aggregation (Bonawitz et al. 2017) with clients that hold part of
the model: federated dropout (Caldas et al. 2018), random-mask and low-rank
updates (Konečný et al. 2016).

Masks cancel only position by position, so each client sends its update on
the model's coordinates (zeros where it held nothing, ``B·A`` for low rank)
and the server divides each coordinate's sum by the surviving clients that
held it. Checked through the real protocol against the same clients'
unmasked codes, decoded one by one and averaged per coordinate over the
holders computed here by explicit indexing; against the same round without
secure aggregation (to the codec's step); and in bits, against the whole
model's message."""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
import torch
from fakes import TensorClients, deterministic, two_worker_processes
from torch import nn

import fedzip
from fedzip import checkpoint
from fedzip.algorithms.dropout import federated_dropout, kept_units
from fedzip.algorithms.space import ModelCoordinates
from fedzip.algorithms.structured import lowrank_updates, random_mask_updates
from fedzip.bitpack import packed_size
from fedzip.codecs import SharedScaleQuantization
from fedzip.errors import ClientFailure, ConfigError, PayloadError
from fedzip.execution import LocalExecutor
from fedzip.privacy.secagg import mask_update, modulus_bits, secure_mean
from fedzip.seeding import torch_rng
from fedzip.wire import decode_message

SGD = functools.partial(torch.optim.SGD, lr=0.05)
SERVER = functools.partial(torch.optim.SGD, lr=1.0)
PRE = fedzip.Preprocess(batch_size=8, epochs=1, shuffle_buffer=100)
BOUND = 0.5
SEED = 4

#: (algorithm, its arguments): each way a client holds part of the model
SPACES = {
    "dropout": (federated_dropout, {"keep": 0.5}),
    "mask_per_coordinate": (random_mask_updates, {"fraction": 0.5, "per_coordinate": True}),
    "mask": (random_mask_updates, {"fraction": 0.5}),
    "lowrank": (lowrank_updates, {"fraction": 0.5}),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _tiny_image_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))


def _secure(bits: int = 8) -> fedzip.Aggregator:
    return fedzip.clipping(secure_mean(SharedScaleQuantization(bits, bound=BOUND), threshold=0.5), BOUND)


class TaskRecorder:
    """An in-process executor that keeps the round's tasks and results."""

    def __init__(self) -> None:
        self.inner = LocalExecutor()
        self.tasks: list = []
        self.results: list = []

    def map(self, work, data, tasks):
        tasks = list(tasks)
        self.tasks += tasks
        for res in self.inner.map(work, data, tasks):
            self.results.append(res)
            yield res


def _build(space: str, aggregator, executor=None, **kw):
    make, args = SPACES[space]
    return make(_tiny_image_mlp, SGD, SERVER, aggregator, seed=SEED, executor=executor, preprocess=PRE,
                **args, **kw)


def _held_by_hand(space: str, algo, cid: str, params) -> dict[str, torch.Tensor]:
    """The coordinates ``cid`` held in round 1, by explicit indexing."""
    held = {k: torch.ones(v.shape, dtype=torch.bool) for k, v in params.items()}
    if space == "dropout":  # unit j of layer 1: row j of 1.weight and 1.bias, column j of 3.weight
        idx = torch.from_numpy(kept_units(algo.space.inner.plan, algo.keep, SEED, 1, cid)["1"])
        for k in ("1.weight", "1.bias", "3.weight"):
            held[k][:] = False
        held["1.weight"][idx] = True
        held["1.bias"][idx] = True
        held["3.weight"][:, idx] = True
    elif space == "mask_per_coordinate":  # the mask of each matrix; biases whole
        for k, v in params.items():
            if v.dim() >= 2:
                flat = torch.zeros(v.numel(), dtype=torch.bool)
                flat[algo.space.inner.draw(k, tuple(v.shape), cid, 1, SEED)] = True
                held[k] = flat.reshape(v.shape)
    return held  # a plain mask or low rank: every coordinate (the mean over all clients)


# --------------------------------------------------------------------------
# The round, against the same clients' codes unmasked
# --------------------------------------------------------------------------


@pytest.mark.parametrize("space", sorted(SPACES))
def test_secure_round_is_the_per_coordinate_mean_of_the_same_codes(space):
    data = TensorClients(n_clients=6, per_client=8, poison={"c5"})  # c5's update is NaN: it drops
    ex = TaskRecorder()
    algo = _build(space, _secure(), ex, min_clients=5)
    assert isinstance(algo.space, ModelCoordinates)
    s0 = algo.init()
    s1, m = algo.next(s0, data, data.client_ids)
    assert m["clients/failed"] == 1 and m["aggregator/secagg/survivors"] == 5
    codec = algo.aggregator.policy.codec
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in s0.params.items()}
    holders = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in s0.params.items()}
    for task, res in zip(ex.tasks, ex.results, strict=True):
        if isinstance(res, ClientFailure):
            assert task.client_id == "c5"
            continue
        # the same client again without masks: the same keyed draws, so the same codes
        plain = decode_message(algo.work(data, replace(task, secagg=b"")).message).tensors
        plain = [t for t in plain if t.codec == codec.tag]
        masked = {t.name: bytes(t.body) for t in decode_message(res.message).tensors}
        again = mask_update(task.secagg, plain, algo.aggregator.policy, SEED, 1, task.client_id)
        assert {t.name: bytes(t.body) for t in again} == masked  # what it sent: these codes, masked
        held = _held_by_hand(space, algo, task.client_id, s0.params)
        for t in plain:
            assert t.shape == tuple(s0.params[t.name].shape)  # on the model's coordinates
            x = codec.decode(t.body, t.shape)
            # where it held nothing it encoded zeros (a zero rounds to one of the two codes around it)
            assert bool(((x[~held[t.name]].abs() - codec.step / 2).abs() < 1e-6).all())
            total[t.name] += x.double()
            holders[t.name] += held[t.name].double()
    if space in ("dropout", "mask_per_coordinate"):
        assert m["aggregator/secagg/fewest_per_coordinate"] == min(float(h[h > 0].min()) for h in holders.values())
    else:
        assert "aggregator/secagg/fewest_per_coordinate" not in m
    for k, p in s0.params.items():
        want = torch.where(holders[k] > 0, total[k] / holders[k].clamp_min(1), 0.0)
        torch.testing.assert_close(s1.params[k] - p, want.float(), rtol=0, atol=1e-6)
        assert torch.equal(s1.params[k][holders[k] == 0], p[holders[k] == 0])  # nobody held it: unmoved


@pytest.mark.parametrize("space", sorted(SPACES))
def test_secure_round_matches_the_round_without_it_to_the_codecs_step(space):
    """The same clients, the same survivors: with secure aggregation (16-bit
    codes) and without it (float32, each sub-update decoded and mapped back
    by the server) the model moves the same, to the rounding of the codes."""
    data = TensorClients(n_clients=6, per_client=8, poison={"c2"})
    s0 = _build(space, _secure(16)).init()
    secure, ms = _build(space, _secure(16), min_clients=5).next(s0, data, data.client_ids)
    plain, mp = _build(space, fedzip.clipping(fedzip.mean(weighted=False), BOUND), min_clients=5).next(
        s0, data, data.client_ids)
    assert ms["clients/succeeded"] == mp["clients/succeeded"] == 5
    assert ms["aggregator/clipping/clipped_count"] == mp["aggregator/clipping/clipped_count"] == 0
    moved = 0
    for k, p in s0.params.items():
        step = 2 * BOUND / (2**16 - 1)
        # each survivor's code is within one step of its value; a coordinate's mean divides by its
        # holders, at least one: at most 5 steps off
        torch.testing.assert_close(secure.params[k], plain.params[k], rtol=0, atol=5 * step)
        moved += int((plain.params[k] != p).sum())
    assert moved > 0


# --------------------------------------------------------------------------
# Bits: the uplink is the whole model's, the downlink still shrinks
# --------------------------------------------------------------------------


def test_secure_uplink_costs_the_whole_model_and_the_downlink_still_shrinks():
    data = TensorClients(n_clients=5, per_client=8)
    s0 = _build("dropout", _secure()).init()
    fedavg = fedzip.weighted_fedavg(_tiny_image_mlp, SGD, SERVER, _secure(), seed=SEED, preprocess=PRE)
    _, full = fedavg.next(s0, data, data.client_ids)
    m = modulus_bits(SharedScaleQuantization(8, bound=BOUND), 5)
    body = 5 * sum(8 * packed_size(v.numel(), m) for v in s0.params.values())  # masked codes, m bits each
    assert full["aggregator/secagg/bits/masked_input/up"] == body
    for space in SPACES:
        _, sub = _build(space, _secure()).next(s0, data, data.client_ids)
        assert sub["aggregator/secagg/bits/masked_input/up"] == body
        assert sub["aggregated_bits"] == full["aggregated_bits"]  # counted from the bytes: the same message
        assert sub["aggregated_bits/tensors"] == full["aggregated_bits/tensors"]
        if space == "dropout":  # each client still receives, and trains, its sub-model only
            assert sub["broadcasted_bits"] < 0.6 * full["broadcasted_bits"]
    # without secure aggregation the uplink is the sub-model's
    _, plain = _build("dropout", fedzip.clipping(fedzip.mean(weighted=False), BOUND)).next(s0, data, data.client_ids)
    assert plain["aggregated_bits/tensors"] < 0.6 * 5 * 32 * sum(v.numel() for v in s0.params.values())


# --------------------------------------------------------------------------
# The accumulator: per-coordinate counts of the survivors that held each
# --------------------------------------------------------------------------


def test_secure_sum_divides_each_coordinate_by_its_holders():
    codec = SharedScaleQuantization(bits=8, bound=1.0)
    agg = secure_mean(codec, threshold=0.5)
    shapes = {"b": (3,), "w": (4, 5)}
    g = torch.Generator().manual_seed(0)
    like = {k: torch.zeros(s) for k, s in shapes.items()}
    acc = agg.accumulator(like)
    ids = [f"c{i}" for i in range(5)]
    from fedzip.algorithms.client import ClientTask

    tasks = acc.setup(0, 1, [ClientTask(c, 1, b"") for c in ids])
    total = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    count = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    for i, task in enumerate(tasks[:4]):  # c4 never sends
        held = {"w": torch.rand(shapes["w"], generator=g) < 0.5}
        held["w"][0, 0] = False  # held by the first client (no coverage: everything) only
        update = {k: torch.rand(s, generator=g) - 0.5 for k, s in shapes.items()}
        update["w"] = update["w"] * held["w"]  # zeros where it held nothing
        recs, _, _ = agg.client_encode({}, update, torch_rng(0, 1, task.client_id, "codec"))
        masked = mask_update(task.secagg, recs, agg.policy, 0, 1, task.client_id)
        cover = None if i == 0 else held  # the first client held everything: no coverage
        if cover is None:
            held = {"w": torch.ones(shapes["w"], dtype=torch.bool)}
        with pytest.raises(PayloadError, match="coverage"):
            acc.fold_masked(task.client_id, masked, {"w": torch.ones(5, 4, dtype=torch.bool)})
        assert acc.count == i  # refused whole: nothing added
        acc.fold_masked(task.client_id, masked, cover)
        for r in recs:
            total[r.name] += codec.decode(r.body, r.shape).double()
            count[r.name] += held["w"].double() if r.name == "w" else 1.0
    agg_out = acc.result()
    assert torch.equal(agg_out.weight_sum["w"], count["w"]) and torch.equal(agg_out.weight_sum["b"], count["b"])
    mean = agg_out.mean({k: (s, torch.float32) for k, s in shapes.items()})
    for k in shapes:
        want = torch.where(count[k] > 0, total[k] / count[k].clamp_min(1), 0.0)
        torch.testing.assert_close(mean[k], want.float(), rtol=0, atol=1e-6)
    assert count["w"][0, 0] == 1 and acc.measurements()["secagg/fewest_per_coordinate"] == 1.0
    assert acc.decoded_individually == 0


# --------------------------------------------------------------------------
# What no longer refuses, and what still does
# --------------------------------------------------------------------------


@pytest.mark.parametrize("space", sorted(SPACES))
def test_secure_aggregation_is_no_longer_refused(space):
    algo = _build(space, _secure())
    assert isinstance(algo.space, ModelCoordinates)
    cheap = _build(space, fedzip.mean())
    assert not isinstance(cheap.space, ModelCoordinates)  # without it, clients send their own coordinates
    # a summable codec without the protocol adds code i of every client too: on the model's coordinates
    assert isinstance(_build(space, fedzip.mean(SharedScaleQuantization(4), weighted=False)).space,
                      ModelCoordinates)


@pytest.mark.parametrize("space", sorted(SPACES))
def test_an_encoded_sum_without_the_protocol_is_the_secure_round_bit_for_bit(space):
    """Distributed DP's ``secure=False`` path (:class:`~fedzip.aggregators.EncodedSum`):
    the same codes summed without masks, divided per coordinate by the same
    holders: the same model as through the protocol, bit for bit."""
    data = TensorClients(n_clients=6, per_client=8, poison={"c3"})
    s0 = _build(space, _secure(16)).init()
    secure, ms = _build(space, _secure(16), min_clients=5).next(s0, data, data.client_ids)
    summed = fedzip.clipping(fedzip.mean(SharedScaleQuantization(16, bound=BOUND), weighted=False), BOUND)
    plain, mp = _build(space, summed, min_clients=5).next(s0, data, data.client_ids)
    assert ms["clients/succeeded"] == mp["clients/succeeded"] == 5
    for k in s0.params:
        assert torch.equal(secure.params[k], plain.params[k]), k
    assert any(not torch.equal(plain.params[k], p) for k, p in s0.params.items())


def test_a_space_sending_its_own_coordinates_is_refused_by_the_secure_round():
    data = TensorClients(n_clients=4, per_client=8)
    algo = _build("dropout", _secure())
    algo.space = algo.space.inner  # the sub-model's tensors: masks would not cancel
    with pytest.raises(ConfigError, match="model's coordinates"):
        algo.next(algo.init(), data, data.client_ids)


# --------------------------------------------------------------------------
# Processes, checkpoints
# --------------------------------------------------------------------------


def test_secure_dropout_on_processes_and_through_a_checkpoint(tmp_path):
    data = TensorClients(n_clients=5, per_client=8)
    ids = data.client_ids
    local = _build("dropout", _secure(), LocalExecutor(threads=1))
    s1, m1 = local.next(local.init(), data, ids)
    with two_worker_processes() as ex:
        procs = _build("dropout", _secure(), ex)
        p1, pm1 = procs.next(procs.init(), data, ids)
    assert deterministic(pm1) == deterministic(m1)
    assert all(torch.equal(p1.params[k], v) for k, v in s1.params.items())
    loaded = checkpoint.load(checkpoint.save(tmp_path, s1)).state
    a, ma = local.next(s1, data, ids)
    b, mb = _build("dropout", _secure(), LocalExecutor(threads=1)).next(loaded, data, ids)
    assert deterministic(ma) == deterministic(mb)
    assert all(torch.equal(a.params[k], v) for k, v in b.params.items())
    assert np.isfinite([float(v.abs().sum()) for v in a.params.values()]).all()
