"""The built-in ``images_small`` task: :class:`fedzip.models.SmallCNN` (conv 8,
conv 16, linear) on 28x28 images, named in a config like ``images``."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import torch
from fakes import TensorClients

from fedzip.config import RunConfig
from fedzip.models import SmallCNN
from fedzip.run import run
from fedzip.tasks import TASKS, resolve_task

INFO = SimpleNamespace(name="fake", description="fake clients", num_classes=10, pixels="28x28")


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_model_has_11274_parameters_for_10_classes_and_takes_either_image_shape():
    model = SmallCNN()
    # conv 1·8·25 + 8, conv 8·16·25 + 16, linear 16·7·7·10 + 10
    assert _count(model) == 208 + 3216 + 7850 == 11_274
    x = torch.rand(3, 28, 28)
    assert model(x).shape == (3, 10)
    assert torch.equal(model(x), model(x.unsqueeze(1)))


def test_the_task_is_registered_and_takes_its_classes_from_the_data_set():
    assert "images_small" in TASKS and TASKS["images_small"][0]
    task = resolve_task("images_small", SimpleNamespace(num_classes=62))
    assert task.name == "images_small" and task.num_classes == 62
    model = task.model_fn()
    assert isinstance(model, SmallCNN) and model.fc.out_features == 62
    assert _count(model) == 11_274 + 52 * (16 * 7 * 7 + 1)
    assert resolve_task("images_small", INFO).num_classes == 10
    pickle.loads(pickle.dumps(task))  # worker processes and Ray get it by pickle


def test_a_run_config_trains_and_evaluates_it(tmp_path):
    data = TensorClients(n_clients=4, per_client=20)
    config = RunConfig(task="images_small", rounds=2, clients_per_round=2, batch_size=10, client_lr=0.1)
    result = run(config, logdir=tmp_path, data=(data, data, INFO), console=False)
    assert [m["round"] for m in result.history] == [1, 2]
    assert 0.0 <= result.final_eval["accuracy"] <= 1.0
    # float32 uplink: 32 bits per parameter per client, and a little framing
    assert 11_274 * 32 * 2 <= result.history[0]["aggregated_bits"] < 11_274 * 32 * 2 * 1.05
