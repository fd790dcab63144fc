"""Tasks: metrics on sequences with padding, weighting, tasks and data named by
import path through the CLI (run.json, checkpoints, resume), and the core's
seams exercised through their uses."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fakes import TINY_SEQ_MODULE, TensorClients, deterministic

import fedzip
from fedzip import checkpoint
from fedzip.aggregators import Aggregate, GaussianNoise, gaussian_noise
from fedzip.cli import main
from fedzip.codecs.summable import SharedScaleQuantization
from fedzip.data.federated import ClientExamples
from fedzip.metrics import read_jsonl
from fedzip.tasks import ClassificationMetrics, classification_loss
from fedzip.tasks.shakespeare import shakespeare_task
from fedzip.wire import Kind, decode_message, encode_message

SGD = torch.optim.SGD
BIN = Path(sys.executable).parent

# --------------------------------------------------------------------------
# Metrics with the class axis last and padding masked, against a hand count
# --------------------------------------------------------------------------


def test_sequence_metrics_mask_padding_and_end_of_snippet_by_hand():
    # batch 2, time 3, vocabulary 4; pad = 0, end of snippet = 3
    logits = torch.full((2, 3, 4), -5.0)
    picks = [[1, 2, 2], [3, 1, 0]]  # argmax at each position
    for b in range(2):
        for t in range(3):
            logits[b, t, picks[b][t]] = 5.0
    y = torch.tensor([[1, 1, 3], [3, 1, 0]])
    loss = classification_loss(ignore_index=0)(logits, y)
    sums = ClassificationMetrics(ignore=(0,), accuracy_ignore=(3,)).batch_sums(logits, y, loss)
    # counted in the loss: every target but the pad (5 of 6)
    assert float(sums["loss_count"]) == 5
    # accuracy over real characters: not pad, not end of snippet -> targets 1, 1, 1
    # predictions there: 1 (hit), 2 (miss), 1 (hit)
    assert float(sums["count"]) == 3 and float(sums["correct"]) == 2
    by_hand = sum(F.cross_entropy(logits[b, t][None], y[b, t][None]).item()
                  for b in range(2) for t in range(3) if y[b, t] != 0) / 5
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)
    assert float(sums["loss_sum"]) == pytest.approx(by_hand * 5, rel=1e-6)
    out = ClassificationMetrics().summarize({k: float(v) for k, v in sums.items()})
    assert out["accuracy"] == pytest.approx(2 / 3) and out["loss"] == pytest.approx(by_hand, rel=1e-6)


def test_metrics_merge_as_sums_not_means_of_means():
    m = ClassificationMetrics()
    a = {"correct": 1.0, "count": 1.0, "loss_sum": 0.0, "loss_count": 1.0}   # one example, right
    b = {"correct": 0.0, "count": 9.0, "loss_sum": 0.0, "loss_count": 9.0}   # nine, all wrong
    merged = {k: a[k] + b[k] for k in a}
    assert m.summarize(merged)["accuracy"] == pytest.approx(0.1)  # a mean of means would say 0.5


def _char_clients():
    """Two clients of character sequences with padding at the end."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, n in enumerate((3, 5)):
        x = torch.randint(1, 87, (n, 80), generator=g)
        y = torch.roll(x, -1, 1)
        y[:, -7:] = 0  # padding
        x[:, -6:] = 0
        out[f"r{i}"] = ClientExamples(x, y)
    return out


class _Dict:
    def __init__(self, ex):
        self.ex = ex

    @property
    def client_ids(self):
        return list(self.ex)

    def client(self, cid):
        return self.ex[cid]


def test_shakespeare_task_weights_clients_by_real_characters():
    data = _Dict(_char_clients())
    task = shakespeare_task(hidden=16)
    fa = fedzip.weighted_fedavg(task=task, client_optimizer=functools.partial(SGD, lr=0.5),
                                server_optimizer=functools.partial(SGD, lr=1.0),
                                preprocess=fedzip.Preprocess(batch_size=4))
    state = fa.init()
    work = fa.work
    from fedzip.algorithms.client import ClientTask
    from fedzip.payload import encode_params
    from fedzip.seeding import torch_rng

    bc = encode_message(Kind.BROADCAST, {}, encode_params(state.params, fa.broadcast_policy, torch_rng(0)))
    res = work(data, ClientTask("r1", 1, bc))
    msg = decode_message(res.message)
    assert msg.scalars["weight"] == 5 * (80 - 7)  # non-pad targets
    assert msg.scalars["train/loss_count"] == 5 * 73 and msg.scalars["train/num_examples"] == 5
    _, metrics = fa.next(state, data, ["r0", "r1"])
    assert 0.0 <= metrics["train/accuracy"] <= 1.0 and math.isfinite(metrics["train/loss"])
    ev = fa.evaluate(state.params, data, per_client=True)
    assert ev["clients/count"] == 2 and 0 <= ev["clients/accuracy_q10"] <= ev["clients/accuracy_q90"] <= 1


def test_a_task_with_images_still_gets_the_image_errors():
    task = fedzip.image_task(10)
    model = task.model_fn()
    with pytest.raises(fedzip.DataError, match="float images"):
        task.check(model, ClientExamples(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)), "c")
    with pytest.raises(fedzip.DataError, match="labels outside"):
        task.check(model, ClientExamples(torch.zeros(2, 28, 28), torch.tensor([0, 12])), "c")


# --------------------------------------------------------------------------
# A user's task and data named by import path: CLI, run.json, checkpoints, resume
# --------------------------------------------------------------------------

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "mytask.py").write_text(TINY_SEQ_MODULE)
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")]))
    return pkg


def _flags(tmp_path, name, *extra):
    return ["run", "--dataset", "mytask:data", "--task", "mytask:task", "--clients-per-round", "3",
            "--batch-size", "2", "--client-lr", "0.5", "--seed", "4", "--eval-every", "1",
            "--logdir", str(tmp_path),
            "--name", name, *extra]


def test_a_user_task_by_import_path_runs_with_run_json_checkpoints_and_resume(tmp_path, user_module):
    assert main(_flags(tmp_path, "full", "--rounds", "3")) == 0
    meta = json.loads((tmp_path / "full" / "run.json").read_text())
    assert meta["config"]["task"] == "mytask:task" and meta["task"] == "tiny-seq"
    assert main(_flags(tmp_path, "cut", "--rounds", "2", "--checkpoint-every", "1")) == 0
    assert main(["run", "--resume", str(tmp_path / "cut"), "--rounds", "3"]) == 0
    full = checkpoint.latest(tmp_path / "full" / "checkpoints", log=None) or None
    cut = checkpoint.latest(tmp_path / "cut" / "checkpoints", log=None)
    assert cut.round == 3
    a, b = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    assert deterministic(a) == deterministic(b) and [m["round"] for m in b] == [1, 2, 3]
    assert full is None  # the full run wrote no checkpoints; its metrics match the resumed run's
    assert 0 <= a[-1]["eval/accuracy"] <= 1


@pytest.mark.slow
def test_a_user_task_is_bit_identical_on_the_local_and_ray_backends(tmp_path, user_module):
    pytest.importorskip("ray")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def go(name, *flags):
        cmd = [str(BIN / "fedzip"), *_flags(tmp_path, name, "--rounds", "2", "--threads", "1", *flags)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return deterministic(read_jsonl(tmp_path / name / "metrics.jsonl"))

    local = go("local")
    on_ray = go("ray", "--backend", "ray", "--num-workers", "2")
    assert local == on_ray and len(local) == 2


# --------------------------------------------------------------------------
# Seams, through their uses
# --------------------------------------------------------------------------


def _fedavg(aggregator=None, **kw):
    return fedzip.weighted_fedavg(fedzip.fedavg_cnn, functools.partial(SGD, lr=0.05),
                                  functools.partial(SGD, lr=1.0), aggregator, **kw)


def test_fedprox_mu_zero_is_fedavg_bit_for_bit():
    data = TensorClients(n_clients=3, per_client=12)
    a = _fedavg()
    b = fedzip.fedprox(fedzip.fedavg_cnn, functools.partial(SGD, lr=0.05), functools.partial(SGD, lr=1.0),
                       mu=0.0)
    sa, ma = a.next(a.init(), data, ["c0", "c2"])
    sb, mb = b.next(b.init(), data, ["c0", "c2"])
    assert all(torch.equal(sa.params[k], sb.params[k]) for k in sa.params)
    assert deterministic(ma) == deterministic(mb)


def test_fedprox_client_step_equals_a_hand_computed_proximal_step():
    torch.manual_seed(0)
    lin = lambda: torch.nn.Linear(3, 2)  # noqa: E731
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 1, 0])
    data = _Dict({"a": ClientExamples(x, y)})
    mu, lr = 0.7, 0.3
    fp = fedzip.fedprox(lin, functools.partial(SGD, lr=lr), functools.partial(SGD, lr=1.0), mu=mu,
                        preprocess=fedzip.Preprocess(batch_size=2, shuffle_buffer=1))
    s0 = fp.init()
    s1, _ = fp.next(s0, data, ["a"])
    # by hand: two SGD steps on batches [0:2], [2:4] of cross-entropy + mu/2 ||w - w0||^2
    w = {k: v.clone().requires_grad_(True) for k, v in s0.params.items()}
    for sl in (slice(0, 2), slice(2, 4)):
        logits = x[sl] @ w["weight"].T + w["bias"]
        loss = F.cross_entropy(logits, y[sl]) + mu / 2 * sum(((w[k] - s0.params[k]) ** 2).sum() for k in w)
        grads = torch.autograd.grad(loss, list(w.values()))
        w = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(w.items(), grads, strict=True)}
    for k in w:
        assert torch.allclose(s1.params[k], w[k].detach(), atol=1e-6), k


def test_noise_stage_adds_keyed_noise_of_the_configured_stddev_on_the_server():
    agg = gaussian_noise(fedzip.clipping(fedzip.mean(weighted=False), 1.0), stddev=0.5)
    zeros = {"w": torch.zeros(20_000)}
    stage = agg.stages[0]
    assert isinstance(stage, GaussianNoise)
    acc = agg.accumulator(zeros)
    from fedzip.payload import encode_params

    for i in range(2):
        acc.fold(encode_params(zeros, agg.policy, torch.Generator().manual_seed(i)), 1.0)
    mean, _, meas = agg.finalize(agg.init(), acc, {}, lambda key: torch.Generator().manual_seed(7))
    # noise on the sum, then divided by the 2 clients: stddev 0.25 on the mean
    assert float(mean["w"].std()) == pytest.approx(0.25, rel=0.03) and abs(float(mean["w"].mean())) < 0.01
    assert meas["noise/stddev"] == 0.5
    acc2 = agg.accumulator(zeros)
    for i in range(2):
        acc2.fold(encode_params(zeros, agg.policy, torch.Generator().manual_seed(i)), 1.0)
    again, _, _ = agg.finalize(agg.init(), acc2, {}, lambda key: torch.Generator().manual_seed(7))
    assert torch.equal(mean["w"], again["w"])  # keyed: the same generator draws the same noise


def test_stage_reports_are_not_clamped_to_one_unless_the_stage_bounds_them():
    agg = fedzip.clipping(fedzip.mean(), 100.0)
    sums: dict = {}
    agg.fold_reports(sums, {"clipping/norm": 5.0, "clipping/clipped": 7.0, "clipping/unknown": 3.0})
    agg.fold_reports(sums, {"clipping/norm": 3.0, "clipping/clipped": -2.0})
    assert sums == {"clipping/norm": 8.0, "clipping/clipped": 1.0}  # a 0/1 indicator stays in [0, 1]
    data = TensorClients(n_clients=2, per_client=10)
    fa = _fedavg(agg)
    s0 = fa.init()
    s1, m = fa.next(s0, data, ["c0", "c1"])
    # the two clients' delta norms, recomputed by hand from their own updates: summed as sent
    norms = []
    for cid in ("c0", "c1"):
        one, _ = fa.next(s0, data, [cid])
        norms.append(math.sqrt(sum(float(((one.params[k] - s0.params[k]) ** 2).sum()) for k in s0.params)))
    assert m["aggregator/clipping/mean_norm"] == pytest.approx(sum(norms) / 2, rel=1e-4)


def test_encoded_sum_decodes_only_the_sum_and_equals_the_plain_sum():
    codec = SharedScaleQuantization(bits=8, bound=1.0)
    agg = fedzip.mean(codec, weighted=False)
    g = torch.Generator().manual_seed(0)
    updates = [{"w": torch.rand(1000, generator=g) * 2 - 1} for _ in range(5)]
    acc = agg.accumulator(updates[0])
    assert type(acc).__name__ == "EncodedSum"
    parsed_sum = torch.zeros(1000, dtype=torch.int64)
    for i, u in enumerate(updates):
        records, _, _ = agg.client_encode({}, u, torch.Generator().manual_seed(i))
        acc.fold(records, 1.0)
        parsed_sum += codec.parse_summand(records[0].body, (1000,))
    mean, _, _ = agg.finalize(agg.init(), acc, {})
    assert acc.decoded_individually == 0
    # the decoded sum is exactly the sum of codes, scaled: the same as decoding each and adding
    each = sum(codec.decode(codec.encode(u["w"], torch.Generator().manual_seed(i)), (1000,)).double()
               for i, u in enumerate(updates))
    assert torch.allclose(mean["w"].double(), each / 5, atol=1e-6)
    # and unbiased: close to the true mean
    true = sum(u["w"] for u in updates) / 5
    assert float((mean["w"] - true).abs().max()) < 2 * codec.step
    with pytest.raises(fedzip.ConfigError, match="weighted=False"):
        fedzip.mean(codec).accumulator(updates[0])


def test_per_coordinate_weights_average_each_coordinate_over_the_clients_that_held_it():
    agg = fedzip.mean()
    acc = agg.accumulator({"w": torch.zeros(3)})
    from fedzip.payload import encode_params

    def fold(values, weight, held):
        recs = encode_params({"w": torch.tensor(values)}, agg.policy, torch.Generator())
        acc.fold(recs, weight, {"w": torch.tensor(held)})

    fold([1.0, 2.0, 0.0], 1.0, [True, True, False])
    fold([3.0, 0.0, 6.0], 3.0, [True, False, True])
    result = acc.result()
    assert isinstance(result, Aggregate)
    mean = result.mean(acc.template)["w"]
    # coordinate 0: (1*1 + 3*3)/4; coordinate 1: held by the first only; 2: by the second only
    assert torch.allclose(mean, torch.tensor([2.5, 2.0, 6.0]))


def test_disk_states_keep_every_client_off_memory_and_old_stores_unchanged(tmp_path):
    store = fedzip.DiskStates(tmp_path / "states")
    s1, dropped = store.updated({"a": {"c": torch.ones(3)}, "b": {"c": torch.zeros(2)}})
    s2, _ = s1.updated({"a": {"c": torch.full((3,), 5.0)}})
    assert dropped == [] and len(s2) == 2 and s2.nbytes() == 0
    assert torch.equal(s1["a"]["c"], torch.ones(3))  # the older store still reads its value
    assert torch.equal(s2["a"]["c"], torch.full((3,), 5.0))
    assert s2.collect() == 1  # s1's file for "a" is the only one s2 does not use
    bounded, dropped = fedzip.MemoryStates(max_clients=1).updated({"a": 1, "b": 2})
    assert dropped == ["a"] and list(bounded) == ["b"]
