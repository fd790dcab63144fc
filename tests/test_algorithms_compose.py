"""Every algorithm composes with every kind of aggregator and codec, uplink and
downlink, and runs bit-identically on the local and Ray backends."""

from __future__ import annotations

import functools

import pytest
import torch
from fakes import TensorClients, deterministic
from torch import nn

import fedzip
from fedzip.codecs import EDEN, ErrorFeedback, TopK, above_threshold
from fedzip.config import build_algorithm_spec
from fedzip.tasks import Task

SGD = torch.optim.SGD
ALGORITHMS = ["fedavg", "fedprox:mu=0.1", "scaffold:num_clients=4", "mime:beta=0.5", "fedsgd",
              "fedadam:server_lr=0.01", "fedyogi:server_lr=0.01", "fedadagrad:server_lr=0.01"]


def small_model() -> nn.Module:
    """A linear classifier of 28x28 images: new modules every call, so the
    initial weights come from the algorithm's keyed seed."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def _small_task() -> Task:
    base = fedzip.image_task(10)
    return Task("small-images", small_model, base.loss_fn, base.metrics,
                check_examples=base.check_examples, num_classes=10)


AGGREGATORS = {
    "clipping-eden": lambda: fedzip.clipping(fedzip.mean(EDEN(2)), 1.0),
    "compression": lambda: fedzip.compression_aggregator(threshold=100),
    "zeroing-error-feedback": lambda: fedzip.zeroing(fedzip.mean(ErrorFeedback(TopK(0.1))), 100.0),
}


def _build(spec, aggregator, **kw):
    cls, extra = build_algorithm_spec(spec)
    return cls(task=_small_task(), client_optimizer=functools.partial(SGD, lr=0.05),
               server_optimizer=functools.partial(SGD, lr=1.0), aggregator=aggregator,
               broadcast_codec=above_threshold(EDEN(4), 100), seed=5, **extra, **kw)


@pytest.mark.parametrize("aggregator", sorted(AGGREGATORS))
@pytest.mark.parametrize("spec", ALGORITHMS)
def test_every_algorithm_composes_with_aggregators_codecs_and_downlink_compression(spec, aggregator):
    data = TensorClients(4, 10, seed=2)
    algo = _build(spec, AGGREGATORS[aggregator]())
    state = algo.init()
    for r in (1, 2):
        state, m = algo.next(state, data, fedzip.sample_clients(data.client_ids, 2, r, 5))
        assert m["clients/succeeded"] == 2
    assert all(torch.isfinite(v).all() for v in state.params.values())
    # the model delta went through the aggregator's codec: fewer bits than float32
    n_params = sum(v.numel() for v in state.params.values())
    model_bits = m.get("aggregated_bits/group/model", m["aggregated_bits/tensors"])
    assert model_bits < 2 * 32 * n_params
    # and the downlink through EDEN 4 bits: the model part is about 4 bits a parameter
    down_model = m.get("broadcasted_bits/group/model", m["broadcasted_bits/tensors"])
    assert down_model < 2 * 6 * n_params


@pytest.mark.slow
def test_algorithms_with_state_are_bit_identical_on_ray():
    pytest.importorskip("ray")
    import os

    from fedzip.execution import LocalExecutor, RayExecutor

    data = TensorClients(4, 10, seed=2)
    # the workers import tests/fakes.py and this module by name
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    with RayExecutor(num_workers=2, threads=1,
                     runtime_env={"env_vars": {"PYTHONPATH": tests_dir}}) as ray_executor:
        for spec in ("scaffold:num_clients=4", "mime:beta=0.5", "fedprox:mu=0.1"):
            runs = []
            for executor in (LocalExecutor(threads=1), ray_executor):
                algo = _build(spec, AGGREGATORS["clipping-eden"](), executor=executor)
                state, hist = algo.init(), []
                for r in (1, 2):
                    state, m = algo.next(state, data, fedzip.sample_clients(data.client_ids, 3, r, 5))
                    hist.append(deterministic(m))
                runs.append((state, hist))
            (a, ha), (b, hb) = runs
            assert ha == hb, spec
            assert all(torch.equal(a.params[k], b.params[k]) for k in a.params), spec
            for g in a.groups:
                assert all(torch.equal(a.groups[g][k], b.groups[g][k]) for k in a.groups[g]), spec
