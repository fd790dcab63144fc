"""FedAdagrad, FedAdam and FedYogi against Algorithm 2 of Reddi et al.
(ICLR 2021), written out coordinate by coordinate in plain float arithmetic."""

import copy
import functools
import io
import math

import pytest
import torch
from fakes import TensorClients
from torch import nn

import fedzip
from fedzip.errors import ConfigError
from fedzip.optim import FedAdagrad, FedAdam, Yogi, fed_adagrad, fed_adam, fed_yogi

X0 = [0.5, -1.25, 2.0, 0.0, 3.0]
# pseudo-gradients (= −Δ_t) for four rounds: mixed signs and magnitudes around
# and below τ, so Yogi's sign(v − g²) takes both values and exact zeros occur
GRADS = [
    [0.3, -0.02, 1.5, 0.0, -4.0],
    [-0.1, 0.0005, 1.4, 0.2, 0.3],
    [0.25, -0.3, -0.01, 0.0, 2.0],
    [0.0, 0.7, 0.9, -0.001, -0.5],
]


def _sign(x):
    return (x > 0) - (x < 0)


def reference(rule, lr, b1, b2, tau, v0, bias_correction=False):
    """Algorithm 2 in gradient form, one coordinate at a time, plain floats."""
    x = list(X0)
    m = [0.0] * len(x)
    v = [v0] * len(x)
    out = []
    for t, g in enumerate(GRADS, start=1):
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            if rule == "adagrad":
                v[i] = v[i] + gi * gi
            elif rule == "adam":
                v[i] = b2 * v[i] + (1 - b2) * gi * gi
            else:  # yogi
                v[i] = v[i] - (1 - b2) * gi * gi * _sign(v[i] - gi * gi)
            mh, vh = m[i], v[i]
            if bias_correction:
                mh, vh = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            x[i] = x[i] - lr * mh / (math.sqrt(vh) + tau)
        out.append(list(x))
    return out


def run(opt_fn):
    p = torch.tensor(X0, dtype=torch.float64, requires_grad=True)
    opt = opt_fn([p])
    out = []
    for g in GRADS:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(p.detach().tolist())
    return out


def assert_close(got, want):
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("tau", [1e-3, 0.1])
def test_fed_yogi_equals_algorithm_2(tau):
    want = reference("yogi", lr=0.1, b1=0.9, b2=0.99, tau=tau, v0=tau**2)
    assert_close(run(fed_yogi(lr=0.1, tau=tau)), want)
    assert_close(run(functools.partial(Yogi, lr=0.1, eps=tau)), want)


def test_fed_adam_equals_algorithm_2():
    want = reference("adam", lr=0.05, b1=0.9, b2=0.99, tau=1e-3, v0=1e-6)
    assert_close(run(fed_adam(lr=0.05)), want)


def test_fed_adagrad_equals_algorithm_2():
    want = reference("adagrad", lr=0.3, b1=0.0, b2=None, tau=1e-2, v0=1e-4)
    assert_close(run(fed_adagrad(lr=0.3, tau=1e-2)), want)
    want = reference("adagrad", lr=0.3, b1=0.5, b2=None, tau=1e-2, v0=0.25)
    assert_close(run(fed_adagrad(lr=0.3, tau=1e-2, initial_accumulator=0.25, beta1=0.5)), want)


def test_explicit_initial_accumulator_and_bias_correction():
    want = reference("yogi", lr=0.1, b1=0.8, b2=0.95, tau=1e-3, v0=0.5, bias_correction=True)
    got = run(fed_yogi(lr=0.1, betas=(0.8, 0.95), initial_accumulator=0.5, bias_correction=True))
    assert_close(got, want)


def test_torch_adam_is_fedadam_only_with_bias_correction_and_zero_start():
    torch_adam = run(functools.partial(torch.optim.Adam, lr=0.05, betas=(0.9, 0.99), eps=1e-3))
    assert_close(run(fed_adam(lr=0.05, initial_accumulator=0.0, bias_correction=True)), torch_adam)
    # ... and the paper's FedAdam is a different optimizer from the first step on
    paper = run(fed_adam(lr=0.05))
    assert abs(paper[0][0] - torch_adam[0][0]) > 1e-3


def test_torch_adagrad_is_fedadagrad_without_momentum():
    torch_adagrad = run(functools.partial(torch.optim.Adagrad, lr=0.3, eps=1e-2,
                                          initial_accumulator_value=1e-4))
    assert_close(run(fed_adagrad(lr=0.3, tau=1e-2)), torch_adagrad)


@pytest.mark.parametrize("make", [
    lambda ps: Yogi(ps, lr=0.1),
    lambda ps: FedAdam(ps, lr=0.1, bias_correction=True),
    lambda ps: FedAdagrad(ps, lr=0.1, beta1=0.9),
])
def test_state_dict_round_trip_resumes_identically(make):
    def fresh():
        a = torch.tensor(X0, dtype=torch.float64, requires_grad=True)
        b = torch.tensor([[1.0, -2.0], [0.5, 0.25]], dtype=torch.float64, requires_grad=True)
        return [a, b]

    def step(opt, ps, k):
        g = torch.tensor(GRADS[k % len(GRADS)], dtype=torch.float64)
        ps[0].grad = g
        ps[1].grad = g[:4].reshape(2, 2) * 0.5
        opt.step()

    ps = fresh()
    opt = make([{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.02}])
    for k in range(2):
        step(opt, ps, k)
    # save through torch.save / weights_only load, as fedzip's checkpoints do
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    saved_params = [p.detach().clone() for p in ps]
    for k in range(2, 5):
        step(opt, ps, k)

    ps2 = [p.clone().detach().requires_grad_(True) for p in saved_params]
    opt2 = make([{"params": [ps2[0]]}, {"params": [ps2[1]], "lr": 0.02}])
    opt2.load_state_dict(copy.deepcopy(saved))
    assert opt2.state_dict()["param_groups"][1]["lr"] == 0.02
    for k in range(2, 5):
        step(opt2, ps2, k)
    for a, b in zip(ps, ps2, strict=True):
        assert torch.equal(a, b)


def test_bad_hyperparameters_are_config_errors():
    with pytest.raises(ConfigError, match="beta2"):
        fed_yogi(lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match="tau"):
        fed_adam(lr=0.1, tau=0.0)
    with pytest.raises(ConfigError, match="lr"):
        fed_adagrad(lr=-1.0)
    with pytest.raises(ConfigError, match="initial_accumulator"):
        fed_yogi(lr=0.1, initial_accumulator=-1.0)


def _tiny_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


def test_yogi_as_fedzip_server_optimizer():
    data = TensorClients(n_clients=2, per_client=10)
    client = functools.partial(torch.optim.SGD, lr=0.1)
    # server SGD at lr 1 is FedAvg: its new params are the old ones plus the mean delta
    fedavg = fedzip.weighted_fedavg(_tiny_model, client, functools.partial(torch.optim.SGD, lr=1.0))
    s0 = fedavg.init()
    s_avg, _ = fedavg.next(s0, data, ["c0", "c1"])
    fa = fedzip.weighted_fedavg(_tiny_model, client, functools.partial(Yogi, lr=0.01))
    s1, _ = fa.next(fa.init(), data, ["c0", "c1"])
    assert s1.round == 1 and s1.optimizer_state["state"]
    tau, b1, b2 = 1e-3, 0.9, 0.99
    for name, x0 in s0.params.items():
        delta = s_avg.params[name] - x0
        # Algorithm 2, round 1: m = (1-β1)Δ, v = τ² - (1-β2)Δ² sign(τ² - Δ²), x + η m/(√v + τ)
        m = (1 - b1) * delta
        v = tau**2 - (1 - b2) * delta**2 * torch.sign(tau**2 - delta**2)
        want = x0 + 0.01 * m / (v.sqrt() + tau)
        assert torch.allclose(s1.params[name], want, rtol=1e-5, atol=1e-7), name
