"""SCAFFOLD, Mime-lite, FedSGD and the adaptive servers, against reference computations."""

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fakes import TensorClients, deterministic
from torch import nn

import fedzip
from fedzip import checkpoint, optim
from fedzip.algorithms.adaptive import FedAdagradAlgorithm, FedAdamAlgorithm, FedYogiAlgorithm
from fedzip.algorithms.fedsgd import FedSGD, fedsgd
from fedzip.algorithms.mime import MimeLite, full_gradient
from fedzip.algorithms.scaffold import Scaffold
from fedzip.codecs import UniformQuantization
from fedzip.config import RunConfig, build_algorithm_spec
from fedzip.data.federated import ClientExamples, Preprocess
from fedzip.errors import ConfigError
from fedzip.run import run
from fedzip.tasks.base import Task

SGD = torch.optim.SGD


# --------------------------------------------------------------------------
# A least-squares problem with heterogeneous clients
# --------------------------------------------------------------------------


class SquaredError:
    """Mergeable metrics for a regression task: the mean squared error."""

    def batch_sums(self, logits, y, loss):
        return {"loss_sum": loss.detach().double() * len(y),
                "count": torch.tensor(float(len(y)), dtype=torch.float64)}

    def summarize(self, sums):
        return {"loss": sums.get("loss_sum", 0.0) / max(sums.get("count", 0.0), 1.0)}


def least_squares_task(d: int) -> Task:
    return Task("least-squares", functools.partial(nn.Linear, d, 1, bias=False), F.mse_loss, SquaredError())


class Regression:
    """Clients whose features have their own scales and whose targets come from
    their own weights: the local optima, and the local curvatures, all differ."""

    def __init__(self, d: int = 4, n_clients: int = 4, per_client: int = 16, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.examples = {}
        for i in range(n_clients):
            scale = torch.rand(d, generator=g) * 1.5 + 0.3
            x = torch.randn(per_client, d, generator=g) * scale
            w = torch.randn(d, 1, generator=g) * 2
            self.examples[f"c{i}"] = ClientExamples(x, x @ w)

    @property
    def client_ids(self):
        return list(self.examples)

    def client(self, client_id):
        return self.examples[client_id]

    def optimum(self) -> torch.Tensor:
        """The minimizer of the pooled squared error (clients of equal size: also of the mean of their losses)."""
        x = torch.cat([e.x for e in self.examples.values()]).double()
        y = torch.cat([e.y for e in self.examples.values()]).double()
        return torch.linalg.solve(x.T @ x, x.T @ y).T.float()


@dataclass(frozen=True)
class FullBatchSteps(Preprocess):
    """``epochs`` full-batch steps: local gradient descent, no sampling noise."""

    def batches(self, examples, generator):
        for _ in range(self.epochs):
            yield examples.x, examples.y


def _grad(ex: ClientExamples, w: torch.Tensor) -> torch.Tensor:
    """The gradient of F.mse_loss(x @ w.T, y) in w ([1, d])."""
    return 2.0 / len(ex) * ((ex.x @ w.T - ex.y).T @ ex.x)


def _algo(cls, d=4, lr=0.05, steps=10, server_lr=1.0, preprocess=None, **kw):
    return cls(task=least_squares_task(d), client_optimizer=functools.partial(SGD, lr=lr),
               server_optimizer=functools.partial(SGD, lr=server_lr),
               preprocess=preprocess or FullBatchSteps(batch_size=16, epochs=steps), **kw)


def _rel(w, star):
    return float((w - star).norm() / star.norm())


# --------------------------------------------------------------------------
# SCAFFOLD
# --------------------------------------------------------------------------


def test_scaffold_reaches_the_optimum_where_fedavg_stalls():
    data = Regression()
    star = data.optimum()
    ids = data.client_ids
    runs = {}
    for name, algo in (("scaffold", _algo(Scaffold, num_clients=4)), ("fedavg", _algo(fedzip.WeightedFedAvg))):
        s = algo.init()
        dist = []
        for _ in range(30):
            s, _ = algo.next(s, data, ids)
            dist.append(_rel(s.params["weight"], star))
        runs[name] = dist
    print(f"relative distance to the optimum after 30 rounds: SCAFFOLD {runs['scaffold'][-1]:.2e}, "
          f"FedAvg {runs['fedavg'][-1]:.2e}")
    assert runs["scaffold"][-1] < 1e-3
    # FedAvg has stalled (not merely slow): a fixed point far from the optimum
    assert runs["fedavg"][-1] > 0.1
    assert abs(runs["fedavg"][-1] - runs["fedavg"][-10]) < 1e-3
    assert runs["fedavg"][-1] > 100 * runs["scaffold"][-1]


def test_scaffold_matches_a_hand_written_round_with_partial_participation():
    """Algorithm 1, option II, written out in torch: N = 4 clients, 2 per round,
    so the server's c moves by |S|/N = 1/2 of the mean control delta."""
    data = Regression()
    lr, steps, n = 0.05, 10, 4
    algo = _algo(Scaffold, lr=lr, steps=steps, num_clients=n)
    s = algo.init()
    x = s.params["weight"].clone()
    c = torch.zeros_like(x)
    ci = {k: torch.zeros_like(x) for k in data.client_ids}
    for cohort in (["c0", "c1"], ["c2", "c3"], ["c1", "c2"], ["c0", "c3"]):
        s, _ = algo.next(s, data, cohort)
        dys, dcs = [], []
        for k in cohort:
            y = x.clone()
            for _ in range(steps):
                y = y - lr * (_grad(data.client(k), y) - ci[k] + c)
            new = ci[k] - c + (x - y) / (steps * lr)
            dys.append(y - x)
            dcs.append(new - ci[k])
            ci[k] = new
        x = x + torch.stack(dys).mean(0)
        c = c + len(cohort) / n * torch.stack(dcs).mean(0)
        assert torch.allclose(s.params["weight"], x, atol=1e-5, rtol=1e-5)
        assert torch.allclose(s.groups["control"]["weight"], c, atol=1e-5, rtol=1e-5)
        store = s.client_states["algorithm"]
        for k in cohort:
            assert torch.allclose(store[k]["weight"], ci[k], atol=1e-5, rtol=1e-5)


def test_scaffold_bits_count_the_control_variates_and_shrink_with_a_codec():
    d = 64
    data = Regression(d=d, n_clients=3, per_client=8)
    ids = data.client_ids
    plain = _algo(Scaffold, d=d, lr=0.01, steps=2, num_clients=3)
    _, m = plain.next(plain.init(), data, ids)
    f32 = 32 * d  # one float32 control tensor of d entries
    assert m["broadcasted_bits/group/control"] == 3 * f32
    assert m["aggregated_bits/group/control"] == 3 * f32
    assert m["broadcasted_bits/group/model"] == m["aggregated_bits/group/model"] == 3 * f32
    q = _algo(Scaffold, d=d, lr=0.01, steps=2, num_clients=3, control_codec=UniformQuantization(8))
    _, mq = q.next(q.init(), data, ids)
    assert mq["aggregated_bits/group/control"] == 3 * (8 * d + 64)  # 8-bit codes and a float32 range
    assert mq["broadcasted_bits/group/control"] == 3 * f32  # the downlink is the broadcast policy's
    assert mq["aggregated_bits/group/model"] == 3 * f32
    # a spec string works as the codec too (as in a config)
    s = _algo(Scaffold, d=d, lr=0.01, steps=2, num_clients=3, control_codec="uniform:bits=4")
    _, ms = s.next(s.init(), data, ids)
    assert ms["aggregated_bits/group/control"] == 3 * (4 * d + 64)


def test_scaffold_with_compressed_control_variates_keeps_c_the_mean_of_the_clients():
    """Error feedback by construction: each client keeps c_i + Q(Δc_i), so the
    server's c is exactly (1/N) Σ c_i however lossy the codec (2-bit here), and
    SCAFFOLD converges as with float32 control variates."""
    data = Regression(n_clients=4)
    n = 4
    algo = _algo(Scaffold, num_clients=n, control_codec=UniformQuantization(2))
    s = algo.init()
    for r in range(30):
        cohort = data.client_ids if r % 3 == 0 else [data.client_ids[r % 4], data.client_ids[(r + 1) % 4]]
        s, _ = algo.next(s, data, cohort)
        store = s.client_states["algorithm"]
        total = sum(store[k]["weight"] for k in store)
        assert torch.allclose(s.groups["control"]["weight"], total / n, atol=1e-5)
    # as close as with float32 control variates (5e-4); keeping c_i⁺ instead, 2 bits end at 0.12
    dist = _rel(s.params["weight"], data.optimum())
    assert dist < 5e-3, dist


def test_scaffold_client_states_are_kept_checkpointed_and_work_on_disk(tmp_path):
    data = Regression(n_clients=6, per_client=8)
    cohorts = [["c0", "c1"], ["c2", "c0"], ["c3", "c4"], ["c1", "c3"]]

    def go(algo, rounds, state=None):
        state = state or algo.init()
        for cohort in rounds:
            state, m = algo.next(state, data, cohort)
        return state, m

    mem = _algo(Scaffold, steps=3, num_clients=6)
    s_mem, m = go(mem, cohorts)
    assert len(s_mem.client_states["algorithm"]) == 5  # c0..c4: every client sampled, none dropped
    assert m["client_states/algorithm"] == 5
    assert set(s_mem.client_states["algorithm"]) == {"c0", "c1", "c2", "c3", "c4"}

    disk = _algo(Scaffold, steps=3, num_clients=6, client_states=fedzip.DiskStates(tmp_path / "states"))
    s_disk, _ = go(disk, cohorts)
    assert isinstance(s_disk.client_states["algorithm"], fedzip.DiskStates)
    assert len(s_disk.client_states["algorithm"]) == 5
    assert torch.equal(s_disk.params["weight"], s_mem.params["weight"])
    assert torch.equal(s_disk.groups["control"]["weight"], s_mem.groups["control"]["weight"])
    for k in s_mem.client_states["algorithm"]:
        assert torch.equal(s_disk.client_states["algorithm"][k]["weight"],
                           s_mem.client_states["algorithm"][k]["weight"])

    # a checkpoint round trip after two rounds, then two more: the same as straight through
    half, _ = go(mem, cohorts[:2])
    path = checkpoint.save(tmp_path / "ck", half)
    loaded = checkpoint.load(path)
    restored = mem.restore(loaded.state)
    assert set(restored.client_states["algorithm"]) == {"c0", "c1", "c2"}
    after, m_after = go(mem, cohorts[2:], restored)
    assert torch.equal(after.params["weight"], s_mem.params["weight"])
    assert torch.equal(after.groups["control"]["weight"], s_mem.groups["control"]["weight"])
    assert deterministic(m_after) == deterministic(m)
    # and onto a disk store
    on_disk = disk.restore(loaded.state)
    assert isinstance(on_disk.client_states["algorithm"], fedzip.DiskStates)
    after_disk, _ = go(disk, cohorts[2:], on_disk)
    assert torch.equal(after_disk.params["weight"], s_mem.params["weight"])


def test_scaffold_configuration_errors():
    with pytest.raises(ConfigError, match="num_clients"):
        _algo(Scaffold)
    with pytest.raises(ConfigError, match="num_clients"):
        _algo(Scaffold, num_clients=0)
    with pytest.raises(ConfigError, match="plain SGD"):
        Scaffold(task=least_squares_task(4), client_optimizer=functools.partial(torch.optim.Adam, lr=0.1),
                 server_optimizer=functools.partial(SGD, lr=1.0), num_clients=4)
    with pytest.raises(ConfigError, match="plain SGD"):
        Scaffold(task=least_squares_task(4), client_optimizer=functools.partial(SGD, lr=0.1, momentum=0.9),
                 server_optimizer=functools.partial(SGD, lr=1.0), num_clients=4)
    data = Regression()
    algo = _algo(Scaffold, num_clients=2)
    s = algo.init()
    with pytest.raises(ConfigError, match="population"):
        algo.next(s, data, data.client_ids)
    cls, extra = build_algorithm_spec("scaffold:num_clients=10,control_codec=uniform")
    assert cls is Scaffold and extra == {"num_clients": 10, "control_codec": "uniform"}


# --------------------------------------------------------------------------
# Mime-lite
# --------------------------------------------------------------------------


def test_mime_lite_with_beta_zero_is_fedavg():
    data = Regression(per_client=15)
    pre = Preprocess(batch_size=4, epochs=2, shuffle_buffer=7)  # minibatches, shuffled
    mime = _algo(MimeLite, lr=0.03, preprocess=pre, beta=0.0, server_lr=0.7)
    fa = _algo(fedzip.WeightedFedAvg, lr=0.03, preprocess=pre, server_lr=0.7)
    sm, sf = mime.init(), fa.init()
    for cohort in (["c0", "c1", "c2"], ["c1", "c3"], data.client_ids):
        sm, mm = mime.next(sm, data, cohort)
        sf, mf = fa.next(sf, data, cohort)
        assert torch.allclose(sm.params["weight"], sf.params["weight"], atol=1e-7, rtol=0)
        assert mm["train/loss"] == pytest.approx(mf["train/loss"])
    assert mm["aggregated_bits/group/grad"] == 4 * 32 * 4  # the gradient at x, float32, from 4 clients
    assert mm["broadcasted_bits/group/momentum"] == 4 * 32 * 4


def test_mime_lite_matches_a_hand_written_round():
    """Clients step with (1 − β)g + βm, m frozen; the server's m moves with the
    mean full-batch gradient at the broadcast point."""
    data = Regression()
    lr, steps, beta = 0.05, 5, 0.8
    algo = _algo(MimeLite, lr=lr, steps=steps, beta=beta)
    s = algo.init()
    x = s.params["weight"].clone()
    m = torch.zeros_like(x)
    for cohort in (["c0", "c1", "c2"], ["c3", "c1"], data.client_ids):
        s, _ = algo.next(s, data, cohort)
        dys, grads = [], []
        for k in cohort:
            grads.append(_grad(data.client(k), x))
            y = x.clone()
            for _ in range(steps):
                y = y - lr * ((1 - beta) * _grad(data.client(k), y) + beta * m)
            dys.append(y - x)
        x = x + torch.stack(dys).mean(0)
        m = (1 - beta) * torch.stack(grads).mean(0) + beta * m
        assert torch.allclose(s.params["weight"], x, atol=1e-5, rtol=1e-5)
        assert torch.allclose(s.groups["momentum"]["weight"], m, atol=1e-5, rtol=1e-5)


def test_mime_full_gradient_in_chunks_is_the_full_batch_gradient():
    ex = Regression(per_client=16).client("c2")
    model = nn.Linear(4, 1, bias=False)
    grad = full_gradient(model, F.mse_loss, ex, batch_size=5)  # chunks of 5, 5, 5, 1
    assert torch.allclose(grad["weight"], _grad(ex, model.weight.detach()), atol=1e-5, rtol=1e-5)
    assert model.weight.grad is None
    some = torch.tensor([1, 4, 9])
    grad = full_gradient(model, F.mse_loss, ex, batch_size=2, indices=some)
    sub = ClientExamples(ex.x[some], ex.y[some])
    assert torch.allclose(grad["weight"], _grad(sub, model.weight.detach()), atol=1e-5, rtol=1e-5)


def test_mime_full_gradient_respects_max_batches():
    data = Regression(per_client=16)
    pre = Preprocess(batch_size=2, epochs=1, shuffle_buffer=16, max_batches=3)
    algo = _algo(MimeLite, preprocess=pre, beta=0.5)
    s, m = algo.next(algo.init(), data, ["c0"])
    assert m["train/num_examples"] == 6
    assert m["time/client_full_gradient_s"] > 0
    with pytest.raises(ConfigError, match="beta"):
        _algo(MimeLite, beta=1.0)


# --------------------------------------------------------------------------
# FedSGD
# --------------------------------------------------------------------------


def _small_classifier():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


def test_fedsgd_with_one_client_is_one_full_batch_gradient_step():
    data = TensorClients(n_clients=1, per_client=30)
    eta = 0.5
    algo = fedsgd(_small_classifier, functools.partial(SGD, lr=eta), preprocess=Preprocess(batch_size=7, epochs=3))
    s0 = algo.init()
    s1, m = algo.next(s0, data, ["c0"])
    model = _small_classifier()
    model.load_state_dict(s0.params)
    ex = data.client("c0")
    F.cross_entropy(model(ex.x), ex.y).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(s1.params[name], p.detach() - eta * p.grad, atol=1e-6, rtol=0), name
    assert m["train/num_batches"] == 1 and m["train/num_examples"] == 30


def test_fedsgd_weights_clients_by_examples_and_caps_with_max_batches():
    """Two clients of different sizes: one gradient step on the pooled data."""
    a, b = TensorClients(1, 10, seed=1), TensorClients(1, 30, seed=2)
    data = SimpleNamespace(client_ids=["a", "b"], client=lambda c: (a if c == "a" else b).client("c0"))
    algo = FedSGD(_small_classifier, None, functools.partial(SGD, lr=1.0))
    s0 = algo.init()
    s1, m = algo.next(s0, data, ["a", "b"])
    model = _small_classifier()
    model.load_state_dict(s0.params)
    x = torch.cat([data.client("a").x, data.client("b").x])
    y = torch.cat([data.client("a").y, data.client("b").y])
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(s1.params[name], p.detach() - p.grad, atol=1e-6, rtol=0), name
    capped = FedSGD(_small_classifier, None, functools.partial(SGD, lr=1.0),
                    preprocess=Preprocess(batch_size=4, max_batches=2))
    _, m = capped.next(capped.init(), data, ["a", "b"])
    assert m["train/num_examples"] == 16 and m["train/num_batches"] == 2


# --------------------------------------------------------------------------
# FedAdam, FedYogi, FedAdagrad
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls, factory, extra", [
    (FedAdamAlgorithm, optim.fed_adam, {"betas": (0.8, 0.95)}),
    (FedYogiAlgorithm, optim.fed_yogi, {"betas": (0.8, 0.95)}),
    (FedAdagradAlgorithm, optim.fed_adagrad, {}),
])
def test_adaptive_algorithms_are_fedavg_with_that_server_optimizer(cls, factory, extra):
    data = Regression()
    algo = cls(task=least_squares_task(4), client_optimizer=functools.partial(SGD, lr=0.05),
               preprocess=FullBatchSteps(batch_size=16, epochs=3), server_lr=0.03, tau=0.01, **extra)
    ref = fedzip.WeightedFedAvg(task=least_squares_task(4), client_optimizer=functools.partial(SGD, lr=0.05),
                                server_optimizer=factory(0.03, tau=0.01, **extra),
                                preprocess=FullBatchSteps(batch_size=16, epochs=3))
    plain = _algo(fedzip.WeightedFedAvg, steps=3, server_lr=0.03)
    sa, sr, sp = algo.init(), ref.init(), plain.init()
    for _ in range(3):
        sa, _ = algo.next(sa, data, data.client_ids)
        sr, _ = ref.next(sr, data, data.client_ids)
        sp, _ = plain.next(sp, data, data.client_ids)
    assert torch.equal(sa.params["weight"], sr.params["weight"])
    assert not torch.allclose(sa.params["weight"], sp.params["weight"])
    # without server_lr, the lr of a plain SGD server optimizer (the run config's server_lr)
    took = cls(task=least_squares_task(4), client_optimizer=functools.partial(SGD, lr=0.05),
               server_optimizer=functools.partial(SGD, lr=0.03))
    assert took.server_optimizer([torch.zeros(1)]).param_groups[0]["lr"] == 0.03
    with pytest.raises(ConfigError, match="plain SGD"):
        cls(task=least_squares_task(4), client_optimizer=functools.partial(SGD, lr=0.05),
            server_optimizer=functools.partial(SGD, lr=1.0, momentum=0.9))


# --------------------------------------------------------------------------
# Through a run config
# --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [
    "scaffold:num_clients=4",
    {"type": "scaffold", "num_clients": 4, "control_codec": {"type": "uniform", "bits": 8}},
    "mime:beta=0.9",
    "fedsgd",
    "fedadam:server_lr=0.01",
    "fedyogi",
    {"type": "fedadagrad", "tau": 0.01},
])
def test_each_algorithm_runs_from_a_config(tmp_path, algorithm):
    train, test = TensorClients(4, 12, seed=3), TensorClients(2, 6, seed=4)
    info = SimpleNamespace(name="fake", description="fake clients", num_classes=10, pixels="28x28")
    config = RunConfig(algorithm=algorithm, rounds=2, clients_per_round=2, batch_size=6, server_lr=0.5,
                       checkpoint_every=1, name="t")
    result = run(config, tmp_path, data=(train, test, info), console=False)
    assert [m["round"] for m in result.history] == [1, 2]
    assert all(torch.isfinite(v).all() for v in result.state.params.values())
    assert "accuracy" in result.final_eval
    # a resumed run restores the algorithm's groups and client states
    again = run(config.replace(rounds=3), tmp_path, data=(train, test, info), console=False, resume=True)
    assert again.state.round == 3


def test_scaffold_without_num_clients_fails_before_training(tmp_path):
    train = TensorClients(2, 6)
    info = SimpleNamespace(name="fake", description="fake clients", num_classes=10, pixels="28x28")
    with pytest.raises(ConfigError, match="num_clients"):
        run(RunConfig(algorithm="scaffold", rounds=1, clients_per_round=1), tmp_path,
            data=(train, train, info), console=False)
