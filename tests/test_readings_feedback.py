"""Error feedback (Seide et al. 2014; Karimireddy et al. 2019) with federated
dropout (Caldas et al. 2018) and random-mask updates (Konečný et al. 2016).

A client sends other coordinates every round, so its residual is kept on the
model's coordinates: the entries sent this round are gathered before
encoding and the new residual is scattered back; the others keep theirs.
Each test checks against a hand computation: the sub-update's layout by
explicit indexing, ``r = x + r_old − C(x + r_old)`` with the inner codec."""

from __future__ import annotations

import functools

import pytest
import torch
from fakes import (
    RecordingExecutor,
    TensorClients,
    VectorClients,
    deterministic,
    tiny_mlp,
    two_worker_processes,
)
from torch import nn

import fedzip
from fedzip import checkpoint
from fedzip.algorithms import client as client_mod
from fedzip.algorithms.dropout import federated_dropout, kept_units
from fedzip.algorithms.structured import lowrank_updates, random_mask_updates
from fedzip.codecs import ErrorFeedback, RandomRotation, UniformQuantization, sign_ef
from fedzip.codecs.summable import SharedScaleQuantization
from fedzip.errors import ConfigError
from fedzip.execution import LocalExecutor
from fedzip.seeding import torch_rng
from fedzip.wire import decode_message

SGD = functools.partial(torch.optim.SGD, lr=0.05)
SERVER = functools.partial(torch.optim.SGD, lr=1.0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _round(make, aggregator, state, data, **kw):
    """One round of ``make(...)`` from ``state``: the new state and each client's sent tensors,
    decoded by the policy's codec (the inner codec under error feedback: the same bytes)."""
    ex = RecordingExecutor()
    algo = make(tiny_mlp, SGD, SERVER, aggregator, executor=ex, **kw)
    new, _ = algo.next(state if state is not None else algo.init(), data, data.client_ids)
    sent = {}
    for res in ex.results:
        codec = algo.aggregator.policy.codec
        sent[res.client_id] = {t.name: codec.decode(t.body, t.shape) for t in decode_message(res.message).tensors}
    return new, sent


def _compress(v: torch.Tensor) -> torch.Tensor:
    """C(v): the scaled sign (deterministic), decoded."""
    inner = sign_ef().inner
    return inner.decode(inner.encode(v, torch.Generator().manual_seed(0)), tuple(v.shape))


def _two_rounds_by_hand(make, sub, put, **kw):
    """Two rounds with sign + error feedback against the hand computation;
    ``sub(name, t, round)`` is client a's sent layout of ``t`` (model's shape),
    ``put(name, full, value, round)`` writes it back. Returns the residuals."""
    data = VectorClients()
    ef = fedzip.mean(sign_ef())
    _, x1 = _round(make, None, None, data, **kw)  # float32: the sub-updates themselves
    s1, c1 = _round(make, ef, None, data, **kw)
    _, x2 = _round(make, None, s1, data, **kw)  # round 2's sub-updates, from the same model
    s2, c2 = _round(make, ef, s1, data, **kw)
    r1 = {k: v["residual"] for k, v in s1.client_states["codec"]["a"].items()}
    r2 = {k: v["residual"] for k, v in s2.client_states["codec"]["a"].items()}
    for name, p in s1.params.items():
        assert r1[name].shape == r2[name].shape == p.shape  # on the full model's coordinates
        # round 1: no residual yet; C(x) sent, x − C(x) kept where held, zero elsewhere
        x = x1["a"][name]
        assert torch.equal(c1["a"][name], _compress(x))
        assert torch.equal(r1[name], put(name, torch.zeros_like(p), x - _compress(x), 1))
        # round 2: the standard step on the coordinates held in round 2, with round 1's residual there
        v = x2["a"][name] + sub(name, r1[name], 2)
        assert torch.equal(c2["a"][name], _compress(v))  # the gathered residual was sent
        assert torch.equal(r2[name], put(name, r1[name], v - _compress(v), 2))
    return r1, r2


# --------------------------------------------------------------------------
# Federated dropout
# --------------------------------------------------------------------------


DROPOUT = {"keep": 0.5, "seed": 1}


def _units(round_num: int) -> torch.Tensor:
    """Client a's kept hidden units in ``round_num`` (layer "0" of the MLP)."""
    plan = federated_dropout(tiny_mlp, SGD, SERVER, **DROPOUT).space.plan
    return torch.from_numpy(kept_units(plan, {"fc": 0.5, "conv": 0.5, "lstm": 0.5}, 1, round_num, "a")["0"])


def _dropout_sub(name, t, round_num):  # a hidden unit owns a row of layer 0, a column of layer 2
    idx = _units(round_num)
    return t[:, idx] if name == "2.weight" else t if name == "2.bias" else t[idx]


def _dropout_put(name, full, value, round_num):
    idx, out = _units(round_num), full.clone()
    if name == "2.weight":
        out[:, idx] = value
    elif name == "2.bias":
        out = value.clone()
    else:
        out[idx] = value
    return out


def test_dropout_keeps_residuals_on_the_model_coordinates_across_rounds():
    k1, k2 = set(_units(1).tolist()), set(_units(2).tolist())
    assert k1 & k2 and k1 - k2  # units held in both rounds, and held in round 1 only
    r1, r2 = _two_rounds_by_hand(federated_dropout, _dropout_sub, _dropout_put, **DROPOUT)
    only1 = sorted(k1 - k2)
    never = sorted(set(range(6)) - k1 - k2)
    for rows in (only1,):  # held in round 1, not in round 2: the residual waits, untouched
        assert r1["0.weight"][rows].abs().sum() > 0
        assert torch.equal(r2["0.weight"][rows], r1["0.weight"][rows])
        assert torch.equal(r2["0.bias"][rows], r1["0.bias"][rows])
        assert torch.equal(r2["2.weight"][:, rows], r1["2.weight"][:, rows])
    for rows in (never,):  # never held: nothing to carry
        assert not r2["0.weight"][rows].any() and not r2["2.weight"][:, rows].any()


# --------------------------------------------------------------------------
# Random-mask structured updates
# --------------------------------------------------------------------------


MASK = {"fraction": 0.5, "seed": 1}


def _mask(name: str, shape, round_num: int) -> torch.Tensor | None:
    """Client a's mask of ``name`` (flat indices; None: sent whole)."""
    if len(shape) < 2:
        return None
    return random_mask_updates(tiny_mlp, SGD, SERVER, **MASK).space.draw(name, tuple(shape), "a", round_num, 1)


def _mask_sub(name, t, round_num):
    idx = _mask(name, t.shape, round_num)
    return t if idx is None else t.reshape(-1)[idx]


def _mask_put(name, full, value, round_num):
    idx = _mask(name, full.shape, round_num)
    if idx is None:
        return value.clone()
    out = full.clone().reshape(-1)
    out[idx] = value
    return out.reshape(full.shape)


def test_random_mask_keeps_residuals_on_the_model_coordinates_across_rounds():
    r1, r2 = _two_rounds_by_hand(random_mask_updates, _mask_sub, _mask_put, **MASK)
    for name in ("0.weight", "2.weight"):
        m1, m2 = (set(_mask(name, r1[name].shape, r).tolist()) for r in (1, 2))
        assert m1 & m2 and m1 - m2
        only1 = torch.tensor(sorted(m1 - m2))
        assert r1[name].reshape(-1)[only1].abs().sum() > 0
        assert torch.equal(r2[name].reshape(-1)[only1], r1[name].reshape(-1)[only1])
        never = torch.tensor(sorted(set(range(r1[name].numel())) - m1 - m2))
        assert not r2[name].reshape(-1)[never].any()


# --------------------------------------------------------------------------
# FedAvg: the path is the one it was
# --------------------------------------------------------------------------


def test_fedavg_with_error_feedback_is_error_feedback_alone(monkeypatch):
    """The full space moves nothing: the residuals and the bytes after two
    rounds are ``ErrorFeedback.encode_stateful``'s, replayed with the
    client's codec generator (stochastic rounding: the generator matters)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the full update space must leave the codec state alone")

    monkeypatch.setattr(client_mod, "gather_codec_state", refuse)
    monkeypatch.setattr(client_mod, "scatter_codec_state", refuse)
    data = VectorClients()
    codec = ErrorFeedback(UniformQuantization(bits=2))
    make = functools.partial(fedzip.weighted_fedavg, seed=2)
    state = None
    expected = {cid: {} for cid in data.client_ids}
    for round_num in (1, 2):
        _, x = _round(make, None, state, data)  # the updates, from the same model
        ex = RecordingExecutor()
        algo = make(tiny_mlp, SGD, SERVER, fedzip.mean(codec), executor=ex)
        state, _ = algo.next(state if state is not None else algo.init(), data, data.client_ids)
        for res in ex.results:
            cid = res.client_id
            rng = torch_rng(2, round_num, cid, "codec")  # one generator for the tensors, in order
            bodies = {}
            for name, value in x[cid].items():
                prev = expected[cid].get(name) or codec.init_client_state(tuple(value.shape))
                bodies[name], expected[cid][name] = codec.encode_stateful(value, rng, prev)
            assert {t.name: bytes(t.body) for t in decode_message(res.message).tensors} == bodies
    for cid in data.client_ids:
        got = state.client_states["codec"][cid]
        for name, e in expected[cid].items():
            assert torch.equal(got[name]["residual"], e["residual"])


# --------------------------------------------------------------------------
# What stays refused
# --------------------------------------------------------------------------


def test_lowrank_and_unreachable_residuals_stay_refused_with_the_reason():
    ef = fedzip.mean(sign_ef())
    with pytest.raises(ConfigError, match="A is redrawn every round"):
        lowrank_updates(tiny_mlp, SGD, SERVER, ef)
    for make in (federated_dropout, random_mask_updates):
        make(tiny_mlp, SGD, SERVER, ef)  # composes now
        # under a rotation the residual would be on the rotated coordinates: nothing can carry it
        with pytest.raises(ConfigError, match="put ErrorFeedback outermost"):
            make(tiny_mlp, SGD, SERVER, fedzip.mean(RandomRotation(ErrorFeedback(UniformQuantization(4)))))
        # robust rules (per coordinate over its holders), secure aggregation and encoded sums (clients
        # send on the model's coordinates) compose now: tests/test_readings_robust.py, _secure.py
        make(tiny_mlp, SGD, SERVER, fedzip.mean(SharedScaleQuantization(4), weighted=False))
        make(tiny_mlp, SGD, SERVER, fedzip.median())
        make(tiny_mlp, SGD, SERVER, fedzip.secure_mean(SharedScaleQuantization(4)))


# --------------------------------------------------------------------------
# Processes, checkpoints
# --------------------------------------------------------------------------


def _tiny_image_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))


def _dropout_ef(executor) -> fedzip.FederatedAlgorithm:
    return federated_dropout(_tiny_image_mlp, SGD, SERVER, fedzip.mean(ErrorFeedback(UniformQuantization(2))),
                             keep=0.5, seed=4, executor=executor,
                             preprocess=fedzip.Preprocess(batch_size=8, epochs=1, shuffle_buffer=100))


def _rounds(algo, data, state, rounds):
    history = []
    for r in rounds:
        state, m = algo.next(state, data, fedzip.sample_clients(data.client_ids, 3, r, 4))
        history.append(m)
    return state, history


def _residuals(state) -> dict:
    return {cid: {k: v["residual"] for k, v in s.items()} for cid, s in state.client_states["codec"].items()}


def _assert_same_residuals(a, b):
    ra, rb = _residuals(a), _residuals(b)
    assert ra and sorted(ra) == sorted(rb)
    for cid in ra:
        assert ra[cid].keys() == rb[cid].keys()
        assert all(torch.equal(ra[cid][k], rb[cid][k]) for k in ra[cid]), cid


def test_dropout_with_feedback_on_processes_and_through_a_checkpoint(tmp_path):
    data = TensorClients(n_clients=4, per_client=8)
    local = _dropout_ef(LocalExecutor(threads=1))
    s, hist = _rounds(local, data, local.init(), (1, 2))
    shapes = {k: tuple(v.shape) for k, v in s.params.items()}
    assert all(tuple(r.shape) == shapes[k] for rs in _residuals(s).values() for k, r in rs.items())
    with two_worker_processes() as ex:
        procs = _dropout_ef(ex)
        sp, hp = _rounds(procs, data, procs.init(), (1, 2))
    assert deterministic(hp) == deterministic(hist)
    assert all(torch.equal(sp.params[k], v) for k, v in s.params.items())
    _assert_same_residuals(s, sp)  # the states went to the workers and back, unchanged
    # a checkpoint keeps every residual; the next round from it is the same bits
    loaded = checkpoint.load(checkpoint.save(tmp_path, s)).state
    _assert_same_residuals(s, loaded)
    a, ma = _rounds(local, data, s, (3,))
    b, mb = _rounds(_dropout_ef(LocalExecutor(threads=1)), data, loaded, (3,))
    assert deterministic(ma) == deterministic(mb)
    assert all(torch.equal(a.params[k], v) for k, v in b.params.items())
    _assert_same_residuals(a, b)
