import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from fakes import TensorClients, deterministic

import fedzip
from fedzip.errors import ConfigError, RoundFailedError

SGD = torch.optim.SGD


def _fedavg(aggregator=None, lr=0.02, **kw):
    return fedzip.weighted_fedavg(
        fedzip.fedavg_cnn,
        functools.partial(SGD, lr=lr),
        functools.partial(SGD, lr=1.0),
        aggregator,
        **kw,
    )


def test_model_parameter_counts_match_the_seed():
    assert sum(p.numel() for p in fedzip.fedavg_cnn(True).parameters()) == 1_663_370
    assert sum(p.numel() for p in fedzip.fedavg_cnn(False).parameters()) == 1_690_046


def test_one_client_one_batch_equals_one_sgd_step():
    data = TensorClients(n_clients=1, per_client=20)
    fa = _fedavg(preprocess=fedzip.Preprocess(batch_size=20, epochs=1, shuffle_buffer=1000))
    state = fa.init()
    new_state, metrics = fa.next(state, data, ["c0"])
    # the reference: one plain torch SGD step on the same batch from the same weights
    model = fedzip.fedavg_cnn()
    model.load_state_dict(state.params)
    opt = SGD(model.parameters(), lr=0.02)
    ex = data.client("c0")
    loss = F.cross_entropy(model(ex.x), ex.y)
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        assert torch.allclose(new_state.params[name], p.detach(), atol=1e-6, rtol=0), name
    assert metrics["train/num_batches"] == 1 and metrics["train/num_examples"] == 20
    assert metrics["train/loss"] == pytest.approx(float(loss.detach()), rel=1e-5)


def test_server_momentum_uses_torch_optimizer_state():
    data = TensorClients(n_clients=2, per_client=10)
    fa = fedzip.weighted_fedavg(
        fedzip.fedavg_cnn, functools.partial(SGD, lr=0.02), functools.partial(SGD, lr=1.0, momentum=0.9)
    )
    s0 = fa.init()
    s1, _ = fa.next(s0, data, ["c0", "c1"])
    s2, _ = fa.next(s1, data, ["c0", "c1"])
    assert s2.optimizer_state["state"], "momentum buffers are carried in the server state"
    assert s2.round == 2


def test_exact_bits_for_mean_and_compression():
    data = TensorClients(n_clients=3, per_client=20)
    _, m = _fedavg().next(_fedavg().init(), data, data.client_ids)
    assert m["aggregated_bits/tensors"] == 3 * 53_227_840
    assert m["broadcasted_bits/tensors"] == 3 * 53_227_840
    framing_per_client = m["aggregated_bits/framing"] / 3 / 8
    assert 0 < framing_per_client < 400  # a few hundred bytes of header, names, shapes
    assert m["aggregated_bits"] == sum(m[f"aggregated_bits/{k}"] for k in ("tensors", "scalars", "framing"))

    fa = _fedavg(fedzip.compression_aggregator())
    _, m = fa.next(fa.init(), data, data.client_ids)
    assert m["aggregated_bits/tensors"] == 3 * 13_464_000  # 8-bit codes, 6,538 f32, 2 ranges
    assert m["aggregated_bits/tensors"] / 3 <= 13_464_000


def test_runs_are_bit_identical_under_a_seed():
    data = TensorClients(n_clients=4, per_client=25)

    def go():
        fa = _fedavg(fedzip.compression_aggregator(), seed=7)
        s = fa.init()
        hist = []
        for r in range(2):
            s, m = fa.next(s, data, fedzip.sample_clients(data.client_ids, 3, r + 1, seed=7))
            hist.append(m)
        return s, hist

    (s1, h1), (s2, h2) = go(), go()
    assert deterministic(h1) == deterministic(h2)
    assert all(torch.equal(s1.params[k], s2.params[k]) for k in s1.params)
    s3, _ = _fedavg(seed=8).next(_fedavg(seed=8).init(), data, ["c0"])
    assert not torch.equal(s3.params["fc1.weight"], s1.params["fc1.weight"])


def test_non_finite_update_fails_round_and_keeps_state():
    data = TensorClients(n_clients=3, per_client=10, poison={"c1"})
    fa = _fedavg()
    state = fa.init()
    before = copy.deepcopy(state)
    with pytest.raises(RoundFailedError, match="c1.*NaN or Inf"):
        fa.next(state, data, data.client_ids)
    assert all(torch.equal(state.params[k], before.params[k]) for k in state.params)
    assert state.round == 0 and state.aggregator_state == before.aggregator_state


def test_zeroing_drops_non_finite_client_and_round_goes_on():
    data = TensorClients(n_clients=3, per_client=10, poison={"c1"})
    fa = _fedavg(fedzip.compression_aggregator())
    state, m = fa.next(fa.init(), data, data.client_ids)
    assert m["aggregator/zeroing/zeroed_count"] == 1
    assert all(torch.isfinite(v).all() for v in state.params.values())


def test_min_clients_lets_a_round_go_on_and_reports_failures():
    data = TensorClients(n_clients=3, per_client=10, poison={"c1"})
    fa = _fedavg(min_clients=2)
    state, m = fa.next(fa.init(), data, data.client_ids)
    assert m["clients/failed"] == 1 and m["failures"][0]["client_id"] == "c1"
    assert m["clients/succeeded"] == 2


def test_bad_inputs_name_the_problem():
    data = TensorClients(n_clients=3)
    with pytest.raises(ConfigError, match="clients_per_round=5 but the data set has only 3"):
        fedzip.sample_clients(data.client_ids, 5, 1, 0)
    with pytest.raises(ConfigError, match="client_optimizer"):
        fedzip.weighted_fedavg(fedzip.fedavg_cnn, "sgd", functools.partial(SGD, lr=1.0))
    fa = _fedavg(min_clients=1)
    _, m = fa.next(fa.init(), data, ["c0", "nobody"])
    assert "unknown client id 'nobody'" in m["failures"][0]["reason"]


def test_evaluate_reports_loss_and_accuracy():
    data = TensorClients(n_clients=2, per_client=10)
    fa = _fedavg()
    ev = fa.evaluate(fa.init().params, data)
    assert ev["num_examples"] == 20 and 0.0 <= ev["accuracy"] <= 1.0 and ev["loss"] > 0


def _two_rounds(**kw):
    data = TensorClients(n_clients=4, per_client=25)
    fa = _fedavg(fedzip.mean(fedzip.codecs.EDEN(2)), seed=5, **kw)
    s, hist = fa.init(), []
    for r in (1, 2):
        s, m = fa.next(s, data, fedzip.sample_clients(data.client_ids, 3, r, seed=5))
        hist.append(m)
    return s, hist, fa.evaluate(s.params, data)


def test_device_option_trains_on_the_device_and_keeps_the_server_on_the_cpu():
    s0, h0, e0 = _two_rounds()
    s1, h1, e1 = _two_rounds(device="cpu")
    assert deterministic(h0) == deterministic(h1) and e0 == e1  # the CPU device changes no bit
    assert all(torch.equal(s0.params[k], s1.params[k]) for k in s0.params)
    if torch.cuda.is_available():
        s2, h2, e2 = _two_rounds(device="cuda")
        assert all(v.device.type == "cpu" for v in s2.params.values())
        assert [m["aggregated_bits"] for m in h2] == [m["aggregated_bits"] for m in h0]
        assert abs(e2["loss"] - e0["loss"]) < 1e-2
    else:
        with pytest.raises(ConfigError, match="CUDA is not available"):
            _fedavg(device="cuda")
    with pytest.raises(ConfigError, match="not a torch device"):
        _fedavg(device="gpu please")
