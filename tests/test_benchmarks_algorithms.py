"""``benchmarks/algorithms.py``'s pure parts: the sweep it builds (labels, run
names, the shared fields), a run's figures from its metrics lines, the
figures over seeds and the goal's verdict, which claims "within 1 point" only
where the 95% t-interval of the paired difference allows it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "algorithms.py"


@pytest.fixture(scope="module")
def alg():
    spec = importlib.util.spec_from_file_location("benchmarks_algorithms", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_sweep_variants_seeds_and_run_names(alg):
    entries = alg.plan_entries("unipen", ["fedavg", "scaffold"], ["float32", "eden1", "eden1+cc"], {}, False, 429)
    assert [e.label for e in entries] == ["fedavg.float32", "fedavg.eden1", "scaffold.float32", "scaffold.eden1",
                                          "scaffold.eden1+cc"]
    base = alg.base_fields("unipen", 30, 6, None)
    runs = alg.build_sweep("algorithms_unipen", base, entries, [0, 1, 2]).runs()
    assert len(runs) == 15
    by_name = {r.name: r for r in runs}
    # labels the sweep keeps as they are: readable run folders
    cc = by_name["scaffold.eden1+cc,seed=2"].config
    assert cc.seed == 2 and cc.eval_clients == 100 and cc.rounds == 30 and cc.eval_every == 6
    assert cc.checkpoint_every == 10 and cc.batch_size == 20 and cc.client_lr == 0.1
    assert cc.algorithm == {"type": "scaffold", "num_clients": 429, "control_codec": {"type": "eden", "bits": 1}}
    assert cc.aggregator == {"type": "mean", "codec": {"type": "eden", "bits": 1}, "threshold": 0}
    assert by_name["fedavg.float32,seed=0"].config.aggregator == "mean"


def test_overrides_label_the_rows(alg):
    over = alg.parse_overrides(["mime:beta=0.5,client_lr=0.05"])
    (e,) = alg.plan_entries("unipen", ["mime"], ["float32"], over, False, 429)
    assert e.algorithm == "mime[beta=0.5,client_lr=0.05]"
    assert e.fields["client_lr"] == 0.05 and e.fields["algorithm"]["beta"] == 0.5
    tune = alg.plan_entries("unipen", ["fedavg"], ["float32"], {}, True, 429)
    assert [e.algorithm for e in tune] == ["fedavg[client_lr=0.05]", "fedavg[client_lr=0.1]"]


def _metrics(rounds: int, acc: list[float], up_model: int, up_control: int | None = None) -> list[dict]:
    hist = []
    for r in range(1, rounds + 1):
        m = {"round": r, "aggregated_bits/cumulative": r * (up_model + (up_control or 0)),
             "broadcasted_bits/cumulative": r * 320, "time/round_s": 1.0 + r, "train/num_examples": 100 + r,
             "aggregated_bits/tensors": up_model + (up_control or 0), "broadcasted_bits/tensors": 320}
        if up_control is not None:
            m.update({"aggregated_bits/group/control": up_control, "aggregated_bits/group/model": up_model})
        if r > rounds - len(acc):
            m["eval/accuracy"] = acc[r - rounds + len(acc) - 1]
        hist.append(m)
    return hist


def test_summarize_history(alg):
    s = alg.summarize_history(_metrics(4, [0.2, 0.4, 0.6], 320, 10), num_params=1, clients_per_round=10)
    assert s["final"] == 0.6 and s["last3"] == pytest.approx(0.4)
    assert list(s["groups"]["up"]) == ["model", "control"]      # the model first
    assert s["bpp"]["up"] == {"model": 32.0, "control": 1.0}     # bits / (params * rounds * clients)
    assert s["bpp"]["down"] == {"model": 32.0}                   # no groups: the tensor bits are the model's
    assert s["examples"] == [101, 102, 103, 104] and s["up"] == 4 * 330


def _row(alg, variant: str, seed: int, last3: float, up: int, algorithm: str = "fedavg") -> dict:
    row = alg.summarize_history(_metrics(3, [last3] * 3, up), num_params=1)
    return {"dataset": "unipen", "algorithm": algorithm, "variant": variant, "seed": seed, "tune": None, **row}


def _group(alg, rows, variant="eden1", algorithm="fedavg"):
    return next(g for g in alg.aggregate(rows) if g["variant"] == variant and g["algorithm"] == algorithm)


def test_goal_needs_the_interval(alg):
    base = [0.60, 0.62, 0.58]
    close = [_row(alg, "float32", s, a, 320) for s, a in enumerate(base)]
    close += [_row(alg, "eden1", s, a - d, 10) for s, (a, d) in enumerate(zip(base, [0.001, 0.002, 0.003], strict=True))]
    g = _group(alg, close)
    assert g["n_paired"] == 3 and g["d"] == pytest.approx(-0.2) and g["x_fewer_up"] == pytest.approx(32.0)
    assert g["d_ci95"][0] > -1 and g["goal"] == "met"
    # the same mean difference, scattered: the interval reaches below -1 point, no claim
    wide = close[:3] + [_row(alg, "eden1", s, a - d, 10) for s, (a, d) in enumerate(zip(base, [-0.01, 0.0, 0.016], strict=True))]
    g = _group(alg, wide)
    assert g["d"] == pytest.approx(-0.2) and g["d_ci95"][0] < -1 and g["goal"] == "not met"
    assert _group(alg, close[:1] + close[3:4])["goal"] == "not decided"              # one seed
    assert _group(alg, close[:3] + [_row(alg, "eden1", s, a, 20) for s, a in enumerate(base)])["goal"] == "not met"
    flat = [_row(alg, "float32", s, 0.05, 320) for s in range(3)] + [_row(alg, "eden1", s, 0.05, 10) for s in range(3)]
    assert _group(alg, flat)["goal"] == "no verdict"                                  # float32 learned nothing
    assert _group(alg, close, "float32")["goal"] is None


def test_client_mismatches(alg):
    rows = [_row(alg, "float32", 0, 0.5, 320), _row(alg, "eden1", 0, 0.5, 10), _row(alg, "eden1", 1, 0.5, 10)]
    assert alg.client_mismatches(rows) == []
    rows[1]["examples"] = [1, 2, 3]
    assert alg.client_mismatches(rows) == ["unipen fedavg seed 0"]
