"""Faulty and hostile clients, through the public API: non-finite updates,
absurd norms, tampered messages, rounds where every client fails.

The invariants: a bad client is dropped (zeroed) or rejected with its reason
in the round's metrics; the global model never becomes non-finite; a round
that cannot complete raises :class:`RoundFailedError`, says why, and leaves
the state it was given unchanged. (tests/test_fedavg.py covers the NaN client
with and without zeroing and ``min_clients``; these extend it.)
"""

from __future__ import annotations

import copy
import functools
import math
import struct
from types import SimpleNamespace

import pytest
import torch
from fakes import TensorClients
from torch import nn

import fedzip
from fedzip.algorithms.client import ClientResult
from fedzip.config import RunConfig
from fedzip.data.federated import ClientExamples
from fedzip.errors import DataError, FedzipError, RoundFailedError
from fedzip.metrics import read_jsonl
from fedzip.run import run
from fedzip.wire import Kind, TensorRecord, decode_message, encode_message

SGD = torch.optim.SGD


def _tiny_model():
    """A small model keeps these tests fast; the invariants do not depend on the model."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))


def _fedavg(aggregator=None, server_lr=1.0, **kw):
    return fedzip.weighted_fedavg(
        _tiny_model, functools.partial(SGD, lr=0.02), functools.partial(SGD, lr=server_lr),
        aggregator, **kw)


def _finite(state):
    return all(bool(torch.isfinite(v).all()) for v in state.params.values())


def _unchanged(state, before):
    assert state.round == before.round
    for k in state.params:
        assert torch.equal(state.params[k], before.params[k]), k
    assert state.aggregator_state == before.aggregator_state


class Scaled:
    """Clients whose pixels are multiplied by ``factor`` (an absurd-norm update)
    or replaced by ``fill`` for the ``bad`` clients."""

    def __init__(self, base: TensorClients, bad: set[str], factor: float = 1.0, fill: float | None = None):
        self.base, self.bad, self.factor, self.fill = base, bad, factor, fill

    @property
    def client_ids(self):
        return self.base.client_ids

    def client(self, cid):
        ex = self.base.client(cid)
        if cid not in self.bad:
            return ex
        x = torch.full_like(ex.x, self.fill) if self.fill is not None else ex.x * self.factor
        return ClientExamples(x, ex.y)


class Tamper:
    """An executor that runs clients locally, then rewrites the bytes one client sends."""

    def __init__(self, rewrite, victims=("c1",)):
        self.rewrite = rewrite
        self.victims = set(victims)
        self.inner = fedzip.LocalExecutor()

    def map(self, work, data, tasks):
        for res in self.inner.map(work, data, tasks):
            if isinstance(res, ClientResult) and res.client_id in self.victims:
                res = ClientResult(res.client_id, self.rewrite(res.message), res.client_state)
            yield res


def _rewrite(scalars=None, tensors=None, kind=None):
    def f(message: bytes) -> bytes:
        m = decode_message(message)
        ts = tensors(m.tensors) if tensors else m.tensors
        return encode_message(kind or m.kind, {**m.scalars, **(scalars or {})}, ts)

    return f


def _set_body(name, body_fn):
    def f(records):
        return [TensorRecord(t.name, t.codec, t.shape, body_fn(t)) if t.name == name else t for t in records]

    return f


def _reshape(name, shape):
    return lambda records: [TensorRecord(t.name, t.codec, shape, t.body) if t.name == name else t
                            for t in records]


# --------------------------------------------------------------------------
# Non-finite and absurd updates
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fill", [float("inf"), -float("inf"), 3e38])
def test_inf_or_overflowing_client_is_zeroed_and_counted(fill):
    data = Scaled(TensorClients(3, 10), {"c2"}, fill=fill)
    fa = _fedavg(fedzip.robust_aggregator())
    state, m = fa.next(fa.init(), data, data.client_ids)
    assert m["aggregator/zeroing/zeroed_count"] == 1 and m["clients/failed"] == 0
    assert _finite(state)


def test_absurd_norm_is_zeroed_with_a_fixed_bound_and_clipped_with_clipping():
    data = Scaled(TensorClients(3, 10), {"c0"}, factor=1e4)
    fa = _fedavg(fedzip.zeroing(fedzip.mean(), 5.0))
    state, m = fa.next(fa.init(), data, data.client_ids)
    assert m["aggregator/zeroing/zeroed_count"] >= 1 and _finite(state)
    fa = _fedavg(fedzip.clipping(fedzip.mean(), 1.0))
    s0 = fa.init()
    state, m = fa.next(s0, data, data.client_ids)
    assert m["aggregator/clipping/clipped_count"] >= 1
    moved = math.sqrt(sum(float(((state.params[k] - s0.params[k]) ** 2).sum()) for k in s0.params))
    assert moved <= 1.0 + 1e-4  # a weighted mean of updates each of norm <= 1


def test_inf_update_without_zeroing_is_a_counted_failure():
    data = Scaled(TensorClients(3, 10), {"c2"}, fill=float("inf"))
    fa = _fedavg(min_clients=2)
    state, m = fa.next(fa.init(), data, data.client_ids)
    assert m["clients/failed"] == 1
    assert m["failures"][0]["client_id"] == "c2" and "NaN or Inf" in m["failures"][0]["reason"]
    assert _finite(state)


def test_a_server_step_that_would_overflow_is_refused_and_the_state_kept():
    huge = struct.pack("<f", 3e38)
    tamper = Tamper(_rewrite(tensors=_set_body("3.bias", lambda t: huge * 10)), victims={"c0", "c1"})
    fa = _fedavg(server_lr=4.0, executor=tamper)
    s0 = fa.init()
    before = copy.deepcopy(s0)
    with pytest.raises(RoundFailedError, match="NaN or Inf; the state is unchanged"):
        fa.next(s0, TensorClients(2, 10), ["c0", "c1"])
    _unchanged(s0, before)


# --------------------------------------------------------------------------
# Every client fails
# --------------------------------------------------------------------------


def test_every_client_failing_leaves_the_state_unchanged_and_says_why():
    data = TensorClients(3, 10, poison={"c0", "c1", "c2"})
    fa = _fedavg(min_clients=1)
    s0 = fa.init()
    before = copy.deepcopy(s0)
    with pytest.raises(RoundFailedError) as e:
        fa.next(s0, data, data.client_ids)
    msg = str(e.value)
    assert "0 of 3 clients succeeded, 1 needed" in msg and "unchanged" in msg
    assert all(f"c{i}: NonFiniteUpdateError" in msg for i in range(3))
    _unchanged(s0, before)


def test_every_client_zeroed_keeps_the_model_and_counts_them():
    data = TensorClients(3, 10, poison={"c0", "c1", "c2"})
    fa = _fedavg(fedzip.zeroing(fedzip.mean(), 10.0))
    s0 = fa.init()
    state, m = fa.next(s0, data, data.client_ids)
    assert m["aggregator/zeroing/zeroed_count"] == 3
    for k in s0.params:
        assert torch.equal(state.params[k], s0.params[k])


def test_clients_without_examples_fail_the_round_cleanly():
    empty = SimpleNamespace(client_ids=["a", "b"],
                            client=lambda cid: ClientExamples(torch.zeros(0, 28, 28), torch.zeros(0, dtype=torch.long)))
    fa = _fedavg()
    s0 = fa.init()
    with pytest.raises(RoundFailedError, match="total weight is zero"):
        fa.next(s0, empty, ["a", "b"])


def test_a_client_whose_data_raises_is_a_counted_failure():
    class Broken(TensorClients):
        def client(self, cid):
            if cid == "c1":
                raise OSError("disk read error")
            return super().client(cid)

    fa = _fedavg(min_clients=1)
    state, m = fa.next(fa.init(), Broken(3, 10), ["c0", "c1", "c2"])
    assert m["failures"] == [{"client_id": "c1", "reason": "OSError: disk read error"}]
    assert m["clients/succeeded"] == 2


# --------------------------------------------------------------------------
# Tampered messages at the server
# --------------------------------------------------------------------------

TAMPERING = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "garbage": lambda b: bytes(range(256)) * 4,
    "trailing byte": lambda b: b + b"\0",
    "wrong version": lambda b: b[:4] + bytes([99]) + b[5:],
    "broadcast kind": _rewrite(kind=Kind.BROADCAST),
    "nan weight": _rewrite(scalars={"weight": float("nan")}),
    "negative weight": _rewrite(scalars={"weight": -1.0}),
    "inf weight": _rewrite(scalars={"weight": float("inf")}),
    "wrong shape": _rewrite(tensors=_reshape("3.bias", (5, 2))),
    "wrong codec tag": _rewrite(tensors=lambda rs: [TensorRecord(t.name, "uq", t.shape, t.body) for t in rs]),
    "missing tensor": _rewrite(tensors=lambda rs: rs[:-1]),
    "extra tensor": _rewrite(tensors=lambda rs: [*rs, TensorRecord("evil", "f32", (1,), bytes(4))]),
    "nan in body": _rewrite(tensors=_set_body("3.bias", lambda t: struct.pack("<f", math.nan) * 10)),
    "short body": _rewrite(tensors=_set_body("3.bias", lambda t: bytes(t.body)[:-4])),
    "huge body length": lambda b: _huge_length(b),
}


def _huge_length(message: bytes) -> bytes:
    m = decode_message(message)
    last = m.tensors[-1]
    at = len(message) - len(last.body) - 4  # the last body's u32 length field
    return message[:at] + struct.pack("<I", 0xFFFFFFFF) + message[at + 4 :]


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_tampered_update_is_rejected_and_counted(how):
    data = TensorClients(3, 10)
    fa = _fedavg(executor=Tamper(TAMPERING[how]), min_clients=2)
    state, m = fa.next(fa.init(), data, data.client_ids)
    assert m["clients/failed"] == 1 and m["clients/succeeded"] == 2
    assert m["failures"][0]["client_id"] == "c1"
    assert m["failures"][0]["reason"].startswith("PayloadError: ")
    assert _finite(state)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_counts_in_an_update_are_a_counted_failure(value):
    data = TensorClients(3, 10)
    fa = _fedavg(executor=Tamper(_rewrite(scalars={"train/num_examples": value})), min_clients=2)
    state, m = fa.next(fa.init(), data, data.client_ids)
    assert m["clients/failed"] == 1 and _finite(state)


def test_hostile_report_scalars_never_make_the_model_non_finite():
    """Stage reports and training sums are the client's word: non-finite ones
    are a counted rejection; finite lies are clamped (a stage report to one
    client's [0, 1]), so they move the adaptive norms no more than an honest
    client could and never make the model non-finite."""
    data = TensorClients(3, 10)
    cases = [({"zeroing/below": math.nan}, 1), ({"train/loss_sum": math.inf}, 0),
             ({"train/num_batches": -3.0}, 1), ({"clipping/below": 1e308, "clipping/clipped": -1.0}, 0),
             ({"weight": 1e300}, 0), ({"unknown/scalar": 1.0}, 0)]
    for scalars, rejected in cases:
        fa = _fedavg(fedzip.compression_aggregator(), executor=Tamper(_rewrite(scalars=scalars)),
                     min_clients=2)
        s = fa.init()
        for _ in (1, 2):
            s, m = fa.next(s, data, data.client_ids)
            assert m["clients/failed"] == rejected, scalars
            assert _finite(s), scalars
            for stage in ("zeroing", "clipping"):
                assert math.isfinite(s.aggregator_state[stage]["estimate"]), scalars
            assert 0 <= m["aggregator/clipping/clipped_count"] <= 3


# --------------------------------------------------------------------------
# Through run(): reasons land in metrics.jsonl; bad data fails before training
# --------------------------------------------------------------------------


def _info(num_classes=10):
    return SimpleNamespace(name="fake", description="fake", num_classes=num_classes, pixels="28x28")


def test_failures_and_their_reasons_are_in_the_metrics_file(tmp_path):
    train = TensorClients(3, 10, poison={"c1"})
    config = RunConfig(rounds=1, clients_per_round=3, min_clients=2, name="f")
    result = run(config, tmp_path, data=(train, TensorClients(1, 5), _info()), console=False)
    (line,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert line["clients/failed"] == 1 and line["failures"][0]["client_id"] == "c1"
    assert "NaN or Inf" in line["failures"][0]["reason"]
    assert _finite(result.state)


def test_a_failed_round_in_run_keeps_the_last_checkpoint_resumable(tmp_path):
    good, bad = TensorClients(3, 10), TensorClients(3, 10, poison={"c0", "c1", "c2"})

    class Flaky:  # fine for two rounds, then every client's data is NaN
        client_ids = good.client_ids
        broken = False

        def client(self, cid):
            return (bad if Flaky.broken else good).client(cid)

    def on_round(state, metrics):
        Flaky.broken = state.round == 2

    config = RunConfig(rounds=3, clients_per_round=2, min_clients=1, checkpoint_every=1, name="r")
    with pytest.raises(RoundFailedError, match="round 3: 0 of 2 clients succeeded"):
        run(config, tmp_path, data=(Flaky(), TensorClients(1, 5), _info()), console=False,
            on_round=on_round)
    assert [m["round"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    result = run(config, tmp_path, data=(good, TensorClients(1, 5), _info()), console=False, resume=True)
    assert [m["round"] for m in result.history] == [1, 2, 3] and _finite(result.state)


@pytest.mark.parametrize("x, y, num_classes, match", [
    (torch.rand(4, 32, 32), torch.zeros(4, dtype=torch.long), 10, r"shape \(32, 32\).*do not fit the model"),
    (torch.rand(4, 28, 28), torch.full((4,), 12), 10, r"labels outside 0\.\.9"),
    (torch.rand(4, 28, 28), torch.zeros(4, dtype=torch.long), 0, "num_classes=0"),
    (torch.rand(4, 28, 28), torch.zeros(4), 10, "labels must be integers"),
    (torch.randint(0, 255, (4, 28, 28), dtype=torch.uint8), torch.zeros(4, dtype=torch.long), 10,
     "float"),
])
def test_data_that_does_not_fit_the_model_fails_before_training(tmp_path, x, y, num_classes, match):
    data = SimpleNamespace(client_ids=["a"], client=lambda cid: ClientExamples(x, y))
    with pytest.raises(FedzipError, match=match):
        run(RunConfig(rounds=1, clients_per_round=1), tmp_path, data=(data, data, _info(num_classes)),
            console=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_test_set_that_does_not_fit_fails_before_training(tmp_path):
    test = SimpleNamespace(client_ids=["t"], client=lambda cid: ClientExamples(torch.rand(3, 20, 20),
                                                                                torch.zeros(3, dtype=torch.long)))
    with pytest.raises(DataError, match=r"test client 't'.*shape \(20, 20\)"):
        run(RunConfig(rounds=1, clients_per_round=1), tmp_path, data=(TensorClients(1, 5), test, _info()),
            console=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_unknown_client_id_names_it():
    with pytest.raises(DataError, match="unknown client id 'zz'"):
        TensorClients(2).client("zz")
