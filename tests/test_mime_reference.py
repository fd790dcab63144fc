"""Mime-lite against an independent, FedJAX-style reference round.

FedJAX (``fedjax/algorithms/mime_lite.py``) mimics optax's SGD with momentum,
an *undamped* trace: clients step ``y ← y − η'(g + β·m')`` with the server's
``m'`` frozen; the server moves ``m' ← g_srv + β·m'``, with ``g_srv`` the sum of
the per-example gradients at ``x`` over the round's examples divided by their
count, and ``x ← x − η_g·Σ_i n_i(x − y_i)/Σ_i n_i``. fedzip's damped form
(``y ← y − η((1 − β)·g + β·m)``, ``m ← (1 − β)·ḡ + β·m``) is the same algorithm
under ``η' = η(1 − β)`` and ``m' = m/(1 − β)``. The reference below is written
from that description alone, in float64 with torch autograd on a copy of the
model; it uses none of fedzip's training code. The clients have equal sizes
(so example weighting and fedzip's unweighted mean of ``∇f_i(x)`` coincide)
and the model has no dropout or batch norm.
"""

import functools

import torch
import torch.nn.functional as F
from fakes import SGD, TensorClients, TinyCNN, run_rounds

import fedzip
from fedzip.algorithms.mime import MimeLite

PER_CLIENT, BATCH, EPOCHS, SHUFFLE = 12, 5, 2, 1  # a buffer of 1: batches in order, no shuffle


def _mime(lr, beta, server_lr):
    return MimeLite(TinyCNN, functools.partial(SGD, lr=lr), functools.partial(SGD, lr=server_lr),
                    beta=beta,
                    preprocess=fedzip.Preprocess(batch_size=BATCH, epochs=EPOCHS, shuffle_buffer=SHUFFLE))


class _Reference:
    """The model as float64 tensors and a gradient function by autograd."""

    def __init__(self):
        self.model = TinyCNN().double()

    def grad(self, w, x, y, reduction="mean"):
        """The gradient of the mean (or summed) per-example cross-entropy at ``w``."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(w[name])
        self.model.zero_grad(set_to_none=True)
        per_example = F.cross_entropy(self.model(x.double()), y, reduction="none")
        (per_example.sum() if reduction == "sum" else per_example.mean()).backward()
        return {name: p.grad.detach().clone() for name, p in self.model.named_parameters()}


def _batches(ex):
    """``dataset.repeat(EPOCHS).batch(BATCH)`` written out: the stream of all
    epochs in order, cut into batches, the last one possibly smaller."""
    order = torch.arange(len(ex)).repeat(EPOCHS)
    for start in range(0, len(order), BATCH):
        idx = order[start : start + BATCH]
        yield ex.x[idx], ex.y[idx]


def fedjax_round(ref, data, cohort, x, m_prime, lr_prime, beta, server_lr):
    """One FedJAX Mime-lite round: returns the new ``(x, m')``."""
    deltas, weights = [], []
    for cid in cohort:
        ex = data.examples[cid]
        y = {k: v.clone() for k, v in x.items()}
        for bx, by in _batches(ex):
            g = ref.grad(y, bx, by)
            # optax.trace(decay=β) then scale(−η'), its state not advanced
            y = {k: y[k] - lr_prime * (g[k] + beta * m_prime[k]) for k in y}
        deltas.append({k: x[k] - y[k] for k in x})  # FedJAX's delta: server minus client
        weights.append(len(ex))
    total = sum(weights)
    mean_delta = {k: sum(w * d[k] for w, d in zip(weights, deltas, strict=True)) / total for k in x}
    # server gradient: per-example gradient sums at x over all the round's examples / their count
    g_sum = None
    for cid in cohort:
        ex = data.examples[cid]
        g = ref.grad(x, ex.x, ex.y, reduction="sum")
        g_sum = g if g_sum is None else {k: g_sum[k] + g[k] for k in g}
    g_srv = {k: v / total for k, v in g_sum.items()}
    new_x = {k: x[k] - server_lr * mean_delta[k] for k in x}
    new_m = {k: g_srv[k] + beta * m_prime[k] for k in x}  # the trace, advanced on the server only
    return new_x, new_m


def _close(a, b, tol):
    """Max abs difference of every tensor, relative to the largest entry of ``b``."""
    worst = 0.0
    for k in b:
        scale = max(float(b[k].abs().max()), 1e-12)
        worst = max(worst, float((a[k].double() - b[k]).abs().max()) / scale)
    return worst < tol, worst


def _data():
    return TensorClients(n_clients=3, per_client=PER_CLIENT, seed=3)


def test_mime_lite_matches_a_fedjax_style_reference():
    data = _data()
    lr, beta, server_lr, rounds, per_round = 0.1, 0.7, 0.8, 3, 2
    algo = _mime(lr, beta, server_lr)
    x0 = {k: v.double() for k, v in algo.init().params.items()}
    state, history = run_rounds(algo, data, rounds, per_round)
    assert [h["train/num_batches"] for h in history] == [per_round * 5] * rounds  # 24 → 5 batches each

    ref = _Reference()
    x, m_prime = x0, {k: torch.zeros_like(v) for k, v in x0.items()}
    for r in range(1, rounds + 1):
        cohort = fedzip.sample_clients(data.client_ids, per_round, r, 0)
        x, m_prime = fedjax_round(ref, data, cohort, x, m_prime, lr * (1 - beta), beta, server_lr)

    ok, err = _close(state.params, x, 1e-5)
    assert ok, f"model differs from the FedJAX-style reference by {err:.2e} (relative)"
    # fedzip's m is the reference's m' damped: m = (1 − β)·m'
    ok, err = _close(state.groups["momentum"], {k: (1 - beta) * v for k, v in m_prime.items()}, 1e-5)
    assert ok, f"momentum differs from (1 − β)·m' by {err:.2e} (relative)"
    # and the momentum has moved the model: the same round with β = 0 lands elsewhere
    state0, _ = run_rounds(_mime(lr, 0.0, server_lr), data, rounds, per_round)
    assert not _close(state0.params, x, 1e-3)[0]


def test_mime_lite_momentum_is_the_damped_sum_of_round_gradients():
    """After round t the broadcast momentum is (1 − β)·Σ_{s<t} β^(t−1−s)·ḡ_s, with
    ḡ_s the mean over round s's clients of ∇f_i at that round's broadcast model."""
    data = _data()
    lr, beta, server_lr = 0.1, 0.6, 1.0
    algo = _mime(lr, beta, server_lr)
    state = algo.init()
    ref = _Reference()
    gbars = []
    for r in range(1, 5):
        cohort = fedzip.sample_clients(data.client_ids, 2, r, 0)
        x = {k: v.double() for k, v in state.params.items()}
        grads = [ref.grad(x, data.examples[c].x, data.examples[c].y) for c in cohort]
        gbars.append({k: sum(g[k] for g in grads) / len(grads) for k in x})
        state, _ = algo.next(state, data, cohort)
        t = len(gbars)
        closed = {k: (1 - beta) * sum(beta ** (t - 1 - s) * gbars[s][k] for s in range(t)) for k in x}
        ok, err = _close(state.groups["momentum"], closed, 1e-5)
        assert ok, f"round {r}: momentum differs from the closed form by {err:.2e} (relative)"
