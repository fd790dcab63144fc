"""Federated dropout (Caldas et al. 2018) and structured updates (Konečný et al. 2016).

Each test checks against a plain reference: the full model with units
zeroed, a per-coordinate mean by hand, bits from a hand count of the
tensors, autograd on the full product."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fakes import RecordingExecutor, TensorClients, VectorClients, deterministic, tiny_mlp
from torch import nn
from torch.func import functional_call

import fedzip
from fedzip.algorithms.client import join_groups
from fedzip.algorithms.dropout import (
    DropoutSpace,
    FederatedDropout,
    dropout_plan,
    federated_dropout,
    kept_units,
    step_macs,
    sub_module,
    sub_params,
)
from fedzip.algorithms.structured import (
    LowRankSpace,
    RandomMaskSpace,
    lowrank_updates,
    random_mask_updates,
)
from fedzip.codecs import CodecPolicy, UniformQuantization, kashin_uniform
from fedzip.config import RunConfig, build_algorithm_spec
from fedzip.errors import ConfigError
from fedzip.execution import LocalExecutor
from fedzip.models import CharLSTM, FedAvgCNN
from fedzip.payload import encode_params
from fedzip.run import run
from fedzip.seeding import torch_rng
from fedzip.wire import Kind, decode_message, encode_message

SGD = functools.partial(torch.optim.SGD, lr=0.05)
SERVER = functools.partial(torch.optim.SGD, lr=1.0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------
# Federated dropout: the sub-model
# --------------------------------------------------------------------------


def test_cnn_submodel_equals_the_full_model_with_dropped_filters_and_units_zeroed():
    torch.manual_seed(0)
    model = FedAvgCNN(62)
    space = DropoutSpace(dropout_plan(model), {"fc": 0.5, "conv": 0.75, "lstm": 1.0})
    kept = space.kept("c7", 3, seed=11)
    assert [len(kept[g]) for g in ("conv1", "conv2", "fc1")] == [24, 48, 256]
    sub = sub_module(model, space.client_model(_params(model), "c7", 3, 11))
    assert (sub.conv1.out_channels, sub.conv2.out_channels, sub.fc1.out_features, sub.fc2.out_features) == \
        (24, 48, 256, 62)  # a real smaller module; the classes are never dropped

    def zero_units(name):  # the dropped units' outputs are zero (before the ReLU: ReLU(0) = 0)
        drop = torch.ones(getattr(model, name).weight.shape[0], dtype=torch.bool)
        drop[torch.from_numpy(kept[name])] = False
        return lambda mod, inp, out: out.masked_fill(drop.view(1, -1, *[1] * (out.dim() - 2)), 0.0)

    handles = [getattr(model, n).register_forward_hook(zero_units(n)) for n in ("conv1", "conv2", "fc1")]
    x = torch.rand(5, 28, 28)
    with torch.no_grad():
        zeroed = model(x)
        for h in handles:
            h.remove()
        full = model(x)
        got = sub(x)
    torch.testing.assert_close(got, zeroed, rtol=1e-5, atol=1e-5)
    assert (got - full).abs().max() > 1e-3  # dropping units changed something
    # the client's compute shrinks, measured: conv2 and fc1 lose 1 - 0.75·0.75 and 1 - 0.75·0.5
    y = torch.randint(0, 62, (5,))
    ratio = step_macs(sub, x, y, nn.functional.cross_entropy) / step_macs(model, x, y, nn.functional.cross_entropy)
    assert 0.5 < ratio < 0.62, ratio


def test_lstm_submodel_equals_the_full_model_with_dropped_hidden_units_zeroed():
    torch.manual_seed(0)
    model = CharLSTM(vocab_size=20, hidden=16)
    space = DropoutSpace(dropout_plan(model), {"fc": 1.0, "conv": 1.0, "lstm": 0.5})
    params = _params(model)
    kept = space.kept("c1", 2, seed=5)
    assert sorted(kept) == ["lstm.l0", "lstm.l1"] and all(len(v) == 8 for v in kept.values())
    sub = sub_module(model, space.client_model(params, "c1", 2, 5))
    assert sub.lstm.hidden_size == 8 and sub.fc.in_features == 8 and sub.fc.out_features == 20
    # zero a hidden unit's four gate rows: its gates sit at sigmoid(0), tanh(0) = 0, so its
    # cell state and output stay 0 at every step and no other unit sees it
    zeroed = {k: v.clone() for k, v in params.items()}
    for layer in (0, 1):
        drop = np.setdiff1d(np.arange(16), kept[f"lstm.l{layer}"])
        rows = torch.from_numpy(np.concatenate([drop + 16 * g for g in range(4)]))
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            zeroed[f"lstm.{name}_l{layer}"][rows] = 0.0
    x = torch.randint(0, 20, (3, 12))
    with torch.no_grad():
        ref = functional_call(model, zeroed, (x,))
        torch.testing.assert_close(sub(x), ref, rtol=1e-5, atol=1e-5)


def test_dropout_refuses_models_it_does_not_understand_naming_the_layer():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 8)
            self.out = nn.Linear(8, 2)

    with pytest.raises(ConfigError, match="GRU"):
        dropout_plan(Recurrent())
    with pytest.raises(ConfigError, match="BatchNorm1d"):
        dropout_plan(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)))
    with pytest.raises(ConfigError, match="GRU"):
        federated_dropout(Recurrent, SGD, SERVER)
    with pytest.raises(ConfigError, match="keep"):
        federated_dropout(fedzip.fedavg_cnn, SGD, SERVER, keep=0.0)
    # low rank redraws A every round: a residual has no coordinates to carry over (dropout and
    # random masks keep it on the model's: tests/test_readings_feedback.py)
    with pytest.raises(ConfigError, match="error feedback"):
        lowrank_updates(fedzip.fedavg_cnn, SGD, SERVER, aggregator=fedzip.mean(fedzip.codecs.topk_ef(0.1)))
    cls, opts = build_algorithm_spec("fed_dropout:keep=0.5,keep_conv=0.75")
    assert cls is FederatedDropout and opts == {"keep": 0.5, "keep_conv": 0.75}


# --------------------------------------------------------------------------
# Federated dropout: the round
# --------------------------------------------------------------------------


def test_sub_updates_map_back_and_average_per_coordinate_over_the_clients_that_held_them():
    ex = RecordingExecutor()
    algo = federated_dropout(tiny_mlp, SGD, SERVER, keep=0.5, seed=4, executor=ex)
    data = VectorClients()
    s0 = algo.init()
    s1, m = algo.next(s0, data, ["a", "b"])
    kept = {cid: kept_units(algo.work.space.plan, algo.keep, 4, 1, cid)["0"] for cid in ("a", "b")}
    ka, kb = set(kept["a"].tolist()), set(kept["b"].tolist())
    assert len(ka) == len(kb) == 3 and ka & kb and ka != kb  # overlapping, not the same
    # by hand: each client's float32 sub-update on the full coordinates, its weight (examples)
    sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in s0.params.items()}
    weights = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in s0.params.items()}
    for res in ex.results:
        msg = decode_message(res.message)
        d = {t.name: torch.frombuffer(bytearray(t.body), dtype=torch.float32).reshape(t.shape) for t in msg.tensors}
        w = float(msg.scalars["weight"])
        units = kept[res.client_id].tolist()
        rows = torch.tensor(units)
        assert d["0.weight"].shape == (3, 4) and d["2.weight"].shape == (3, 3)
        sums["0.weight"][rows] += w * d["0.weight"]
        weights["0.weight"][rows] += w
        sums["0.bias"][rows] += w * d["0.bias"]
        weights["0.bias"][rows] += w
        sums["2.weight"][:, rows] += w * d["2.weight"]
        weights["2.weight"][:, rows] += w
        sums["2.bias"] += w * d["2.bias"]
        weights["2.bias"] += w
    assert [float(decode_message(r.message).scalars["weight"]) for r in ex.results] == [7.0, 12.0]
    for k in s0.params:
        mean = torch.where(weights[k] > 0, sums[k] / weights[k].clamp_min(1e-300), torch.zeros_like(sums[k]))
        torch.testing.assert_close(s1.params[k], (s0.params[k] + mean).float(), rtol=1e-6, atol=1e-7)
    held_by_none = sorted(set(range(6)) - ka - kb)
    for u in held_by_none:  # a unit no client held does not move
        assert torch.equal(s1.params["0.weight"][u], s0.params["0.weight"][u])


def test_keeping_every_unit_is_fedavg():
    data = TensorClients(n_clients=3, per_client=6)
    fa = fedzip.weighted_fedavg(fedzip.fedavg_cnn, SGD, SERVER, seed=1)
    fd = federated_dropout(fedzip.fedavg_cnn, SGD, SERVER, keep=1.0, seed=1)
    sa, sd = fa.init(), fd.init()
    for _ in range(2):
        sa, ma = fa.next(sa, data, data.client_ids)
        sd, md = fd.next(sd, data, data.client_ids)
    assert md["broadcasted_bits/tensors"] == ma["broadcasted_bits/tensors"]
    for k in sa.params:  # the mean per coordinate over everyone is the mean, up to rounding
        torch.testing.assert_close(sd.params[k], sa.params[k], rtol=0, atol=1e-7)


def _cnn_sub_numel(c: int, k1: int, k2: int, h: int) -> int:
    """FedAvgCNN's tensors with k1, k2 filters and h fc1 units, c classes (by hand)."""
    return (k1 * 25 + k1) + (k2 * k1 * 25 + k2) + (h * k2 * 49 + h) + (c * h + c)


def test_the_broadcast_holds_only_each_clients_submodel_and_is_counted_per_client():
    data = TensorClients(n_clients=3, per_client=6)
    algo = federated_dropout(fedzip.fedavg_cnn, SGD, SERVER, keep=0.5, seed=2)
    s0 = algo.init()
    ids = data.client_ids
    _, m = algo.next(s0, data, ids)
    sub_numel = _cnn_sub_numel(10, 16, 32, 256)
    assert m["broadcasted_bits/tensors"] == len(ids) * 32 * sub_numel
    assert m["aggregated_bits/tensors"] == len(ids) * 32 * sub_numel  # the sub-update only
    # total = per client: the shared broadcast (scalars, no tensors) + its personal message
    shared = 8 * len(encode_message(Kind.BROADCAST, algo.aggregator.broadcast_scalars(s0.aggregator_state), []))
    personal = 0
    for cid in ids:
        sub = sub_params(s0.params, algo.work.space.plan, algo.work.space.kept(cid, 1, 2))
        recs = encode_params(join_groups({"model": sub}), CodecPolicy(), torch_rng(0))
        personal += 8 * len(encode_message(Kind.BROADCAST, {}, recs))
    assert m["broadcasted_bits"] == len(ids) * shared + personal
    assert m["broadcasted_bits"] < 0.26 * len(ids) * 32 * _cnn_sub_numel(10, 32, 64, 512)

    # with Kashin's representation and 4-bit quantization on the downlink (Caldas et al.)
    kashin = federated_dropout(fedzip.fedavg_cnn, SGD, SERVER, keep=0.5, seed=2,
                               broadcast_codec=fedzip.codecs.above_threshold(kashin_uniform(4), 20_000))
    _, mk = kashin.next(kashin.init(), data, ids)
    assert mk["clients/succeeded"] == 3
    # fc1 (the only tensor over 20,000 entries) at redundancy 2 × 4 bits: a quarter of its float32 bits
    assert mk["broadcasted_bits/tensors"] < 0.33 * m["broadcasted_bits/tensors"]


# --------------------------------------------------------------------------
# Structured updates
# --------------------------------------------------------------------------


def _grad_of_full(model, params, name, weight, x, y):
    """Autograd's gradient of the loss in the full tensor ``name`` at ``weight``."""
    w = weight.detach().requires_grad_(True)
    loss = nn.functional.cross_entropy(functional_call(model, {**params, name: w}, (x,)), y)
    (g,) = torch.autograd.grad(loss, [w])
    return g


def test_lowrank_trains_exactly_b_and_its_gradient_is_autograds_on_the_product():
    torch.manual_seed(0)
    model = FedAvgCNN(10)
    params = _params(model)
    r = 3
    space = LowRankSpace(seed=9, rank=r)
    sub, trainable = space.prepare(model, params, SimpleNamespace(client_id="c2", round=5))
    # B (out × r) of every weight with fan_in > r; biases whole
    expected = (32 * r + 64 * r + 512 * r + 10 * r) + (32 + 64 + 512 + 10)
    assert sum(p.numel() for p in trainable) == expected
    assert not {id(p) for p in trainable} & {id(p) for p in model.parameters()}  # W itself is not trained
    with torch.no_grad():
        for p in sub.small.values():
            p.normal_(0, 0.01)  # away from B = 0, so the product matters
    x, y = torch.rand(4, 28, 28), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(sub(x), y).backward()
    at = {k: v.detach() for k, v in sub.effective().items()}  # W0 + B·A for every weight
    for name in ("fc1.weight", "conv2.weight"):
        a = space.draw(name, tuple(params[name].shape), "c2", 5, 9)
        b = sub.small[name.replace(".", "__")]
        torch.testing.assert_close(at[name], params[name] + (b.detach() @ a).reshape(params[name].shape))
        g_w = _grad_of_full(model, at, name, at[name], x, y).reshape(params[name].shape[0], -1)
        torch.testing.assert_close(b.grad, g_w @ a.T, rtol=1e-4, atol=1e-6)
    # what is sent: B, and the biases' deltas
    sent = space.update(sub, model, params, None)
    assert sent["fc1.weight"].shape == (512, r) and sent["fc1.bias"].shape == (512,)


def test_random_mask_trains_exactly_the_masked_entries():
    torch.manual_seed(0)
    model = FedAvgCNN(10)
    params = _params(model)
    space = RandomMaskSpace(seed=9, fraction=0.1)
    sub, trainable = space.prepare(model, params, SimpleNamespace(client_id="c1", round=2))
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    k = {n: int(np.floor(0.1 * np.prod(s) + 0.5)) for n, s in shapes.items() if len(s) > 1}
    assert sum(p.numel() for p in trainable) == sum(k.values()) + 32 + 64 + 512 + 10
    x, y = torch.rand(4, 28, 28), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(trainable, lr=0.5)
    nn.functional.cross_entropy(sub(x), y).backward()
    g_w = _grad_of_full(model, params, "fc1.weight", params["fc1.weight"], x, y)
    idx = space.draw("fc1.weight", shapes["fc1.weight"], "c1", 2, 9)
    torch.testing.assert_close(sub.small["fc1__weight"].grad, g_w.reshape(-1)[idx])
    opt.step()
    eff = sub.effective()
    for name, n in k.items():
        changed = (eff[name] != params[name]).reshape(-1).nonzero().reshape(-1)
        mask = space.draw(name, shapes[name], "c1", 2, 9)
        assert len(mask) == n and set(changed.tolist()) <= set(mask.tolist()) and len(changed) > 0
    # the server maps it back onto those entries only
    full, cov = space.expand(space.update(sub, model, params, None), shapes, "c1", 2, 9)
    torch.testing.assert_close(full["fc1.weight"], eff["fc1.weight"].detach() - params["fc1.weight"])
    assert cov is None and RandomMaskSpace(9, 0.1, per_coordinate=True).expand(
        space.update(sub, model, params, None), shapes, "c1", 2, 9)[1]["fc1.weight"].sum() == k["fc1.weight"]


@pytest.mark.parametrize("kind", ["lowrank", "randmask"])
def test_structured_updates_send_only_what_they_claim_and_compose_with_quantization(kind):
    data = TensorClients(n_clients=2, per_client=6)
    make = lowrank_updates if kind == "lowrank" else random_mask_updates
    shapes = {k: tuple(v.shape) for k, v in FedAvgCNN(10).named_parameters()}
    if kind == "lowrank":
        algo = make(fedzip.fedavg_cnn, SGD, SERVER, rank=4, seed=1)
        sent = sum(s[0] * 4 if len(s) > 1 else s[0] for s in shapes.values())
    else:
        algo = make(fedzip.fedavg_cnn, SGD, SERVER, fraction=0.05, seed=1)
        sent = sum(int(np.floor(0.05 * np.prod(s) + 0.5)) if len(s) > 1 else s[0] for s in shapes.values())
    s0 = algo.init()
    s1, m = algo.next(s0, data, data.client_ids)
    assert m["aggregated_bits/tensors"] == 2 * 32 * sent
    assert m["broadcasted_bits/tensors"] == 2 * 32 * sum(int(np.prod(s)) for s in shapes.values())
    assert any(not torch.equal(s0.params[k], s1.params[k]) for k in ("fc1.weight", "conv1.weight"))
    # 8-bit quantization of what is sent: a quarter of the bits, nearly the same model
    q = make(fedzip.fedavg_cnn, SGD, SERVER, aggregator=fedzip.mean(UniformQuantization(8)), seed=1,
             **({"rank": 4} if kind == "lowrank" else {"fraction": 0.05}))
    q1, mq = q.next(q.init(), data, data.client_ids)
    assert 0.24 < mq["aggregated_bits/tensors"] / m["aggregated_bits/tensors"] < 0.27
    for k in s0.params:
        torch.testing.assert_close(q1.params[k], s1.params[k], rtol=0, atol=5e-3)


# --------------------------------------------------------------------------
# Backends, checkpoints, resume
# --------------------------------------------------------------------------


ALGOS = {"fed_dropout": "fed_dropout:keep=0.5", "lowrank": "lowrank:fraction=0.05",
         "randmask": "randmask:fraction=0.05,per_coordinate=true"}


@pytest.mark.parametrize("name", sorted(ALGOS))
def test_runs_are_identical_across_executors_and_resume_bit_identically(tmp_path, name):
    info = SimpleNamespace(name="fake", description="fake clients", num_classes=10, pixels="28x28")
    data = (TensorClients(5, 8, seed=1), TensorClients(2, 8, seed=2), info)
    cfg = RunConfig(rounds=3, clients_per_round=3, batch_size=4, algorithm=ALGOS[name],
                    aggregator="eden:bits=2,threshold=0", seed=3, checkpoint_every=1, eval_every=1)
    whole = run(cfg, tmp_path / "whole", data=data, console=False)
    threads = run(cfg.replace(threads=1), tmp_path / "threads", data=data, console=False)  # LocalExecutor(1)
    part = run(cfg.replace(rounds=2), tmp_path / "resumed", data=data, console=False)
    resumed = run(cfg, tmp_path / "resumed", data=data, console=False, resume=True)
    assert part.state.round == 2 and [m["round"] for m in resumed.history] == [1, 2, 3]
    for other in (threads, resumed):
        assert deterministic(other.history) == deterministic(whole.history)
        assert all(torch.equal(other.state.params[k], v) for k, v in whole.state.params.items())
    assert whole.history[-1]["clients/succeeded"] == 3 and "accuracy" in whole.final_eval


def _ray_available() -> bool:
    from fedzip.execution import ray_available

    return ray_available()


@pytest.fixture(scope="module")
def ray_executor():
    if not _ray_available():
        pytest.skip("Ray is not installed")
    from pathlib import Path

    from fedzip.execution import RayExecutor

    # the workers unpickle tests/fakes.py's data by name
    ex = RayExecutor(num_workers=2, threads=1,
                     runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent)}})
    yield ex
    ex.close()


@pytest.mark.slow
def test_ray_and_local_rounds_are_bit_identical(ray_executor):
    """The spaces travel inside the client work (pickled to the actors); each
    client's sub-model and A are regenerated there from the keyed seed (the
    random mask shares the low-rank's machinery)."""
    data = TensorClients(n_clients=6, per_client=8)
    makers = {"fed_dropout": lambda ex: federated_dropout(fedzip.fedavg_cnn, SGD, SERVER, keep=0.5, seed=3,
                                                         executor=ex),
              "lowrank": lambda ex: lowrank_updates(fedzip.fedavg_cnn, SGD, SERVER, rank=2, seed=3, executor=ex)}
    for name, make in makers.items():
        out = {}
        for backend, ex in (("local", LocalExecutor(threads=1)), ("ray", ray_executor)):
            algo = make(ex)
            s = algo.init()
            hist = []
            for r in (1, 2):
                s, m = algo.next(s, data, fedzip.seeding.sample_clients(data.client_ids, 4, r, 3))
                hist.append(m)
            out[backend] = (s, hist)
        (sl, hl), (sr, hr) = out["local"], out["ray"]
        assert deterministic(hl) == deterministic(hr), name
        assert all(torch.equal(sl.params[k], sr.params[k]) for k in sl.params), name
