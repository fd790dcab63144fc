"""Sweeps and comparisons: a grid of tiny runs with its table, resuming a cut
run and skipping the complete ones, bad grids failing before anything runs,
run names, ``fedzip compare``, and the t-interval over seeds by hand."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
from fakes import TINY_SEQ_MODULE, deterministic

from fedzip import checkpoint
from fedzip.cli import main
from fedzip.compare import summarize_history
from fedzip.errors import ConfigError
from fedzip.metrics import read_jsonl
from fedzip.sweep import RUN_FILE, Sweep, load_sweep, run_sweep, t_interval

BASE = {"dataset": "sweeptask:data", "task": "sweeptask:task", "rounds": 2, "clients_per_round": 3,
        "batch_size": 2, "eval_every": 1,
        "aggregator": {"type": "clipping", "norm": 10.0,
                       "inner": {"type": "mean", "threshold": 0, "codec": {"type": "uniform", "bits": 8}}}}
GRID = {"client_lr": [0.1, 0.5], "aggregator.inner.codec.bits": [2, 4], "seed": [0, 1]}
T_975 = {1: 12.706, 2: 4.303}  # Student's t, 97.5% quantile, from a printed table


@pytest.fixture
def sweep_module(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "sweeptask.py").write_text(TINY_SEQ_MODULE)
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return pkg


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_2x2x2_sweep_writes_8_rows_and_a_rerun_resumes_the_cut_run_and_skips_the_rest(tmp_path, sweep_module):
    sweep = Sweep.from_dict({"name": "tiny", "base": BASE, "grid": GRID})
    out = tmp_path / "sweep"
    said: list[str] = []
    first = run_sweep(sweep, out, jobs=0, say=said.append, keep_checkpoints=2)
    names = [f"client_lr={lr},bits={b},seed={s}" for lr in (0.1, 0.5) for b in (2, 4) for s in (0, 1)]
    assert [r.name for r in first.runs] == names
    assert first.status == dict.fromkeys(names, "ran") and not first.failed

    rows = _rows(out / "results.csv")
    assert [r["name"] for r in rows] == names
    for col in ("group", "status", "client_lr", "aggregator.inner.codec.bits", "seed", "task", "algorithm",
                "aggregator", "final_eval_accuracy", "best_eval_accuracy", "final_eval_loss", "best_eval_loss",
                "uplink_bits", "downlink_bits", "total_bits", "time_s", "wall_s", "rounds_done"):
        assert col in rows[0], col
    by = {r["name"]: r for r in rows}
    for r in rows:
        assert r["status"] == "complete" and r["rounds_done"] == "2" and r["task"] == "tiny-seq"
        assert r["group"] == r["name"].rsplit(",seed=", 1)[0]
        assert float(r["wall_s"]) > 0 and int(r["total_bits"]) == int(r["uplink_bits"]) + int(r["downlink_bits"])
        assert 0 <= float(r["final_eval_accuracy"]) <= float(r["best_eval_accuracy"]) <= 1
        assert json.loads(r["aggregator"])["inner"]["codec"]["bits"] == int(r["aggregator.inner.codec.bits"])
        d = out / r["name"]  # a normal run folder, with the config it was given
        assert json.loads((d / "run.json").read_text())["config"]["client_lr"] == float(r["client_lr"])
        assert any(p.name.startswith("events.out.tfevents") for p in d.iterdir())
        assert checkpoint.latest(checkpoint.checkpoint_dir(d), log=None).round == 2
        hist = read_jsonl(d / "metrics.jsonl")
        assert float(r["final_eval_accuracy"]) == hist[-1]["eval/accuracy"]
        assert int(r["uplink_bits"]) == hist[-1]["aggregated_bits/cumulative"]
    # the codec argument reached the runs: 4 bits a coordinate cost more uplink than 2
    assert int(by["client_lr=0.1,bits=4,seed=0"]["uplink_bits"]) > int(by["client_lr=0.1,bits=2,seed=0"]["uplink_bits"])
    # seeds differ (sampling, init), so a setting has a spread to show
    assert by["client_lr=0.5,bits=4,seed=0"]["final_eval_loss"] != by["client_lr=0.5,bits=4,seed=1"]["final_eval_loss"]

    # per setting: the t-interval of the final accuracy over 2 seeds, by hand
    groups = {g["group"]: g for g in _rows(out / "groups.csv")}
    assert len(groups) == 4
    for g, row in groups.items():
        a, b = (float(by[f"{g},seed={s}"]["final_eval_accuracy"]) for s in (0, 1))
        mean, half = (a + b) / 2, T_975[1] * abs(a - b) / 2   # sd = |a-b|/sqrt(2), / sqrt(n=2)
        assert row["n"] == "2" and row["seeds"] == "0 1"
        assert float(row["final_eval_accuracy_mean"]) == pytest.approx(mean)
        assert float(row["final_eval_accuracy_sd"]) == pytest.approx(abs(a - b) / math.sqrt(2))
        if a != b:
            assert float(row["final_eval_accuracy_ci95_low"]) == pytest.approx(mean - half, rel=1e-3)
            assert float(row["final_eval_accuracy_ci95_high"]) == pytest.approx(mean + half, rel=1e-3)
    assert (out / "accuracy_vs_bits.png").read_bytes()[:4] == b"\x89PNG"

    # cut the last run back to round 1, as a kill during round 2 leaves it: rerun
    cut = out / names[-1]
    whole = read_jsonl(cut / "metrics.jsonl")
    (cut / "checkpoints" / "round-000002.ckpt").unlink()
    (cut / "metrics.jsonl").write_text(json.dumps(whole[0]) + "\n")
    state = json.loads((cut / RUN_FILE).read_text())
    (cut / RUN_FILE).write_text(json.dumps({**state, "complete": False}))
    said.clear()
    second = run_sweep(sweep, out, jobs=0, say=said.append)
    assert second.status == {**dict.fromkeys(names[:-1], "skipped"), names[-1]: "resumed"}
    assert any("7 complete (skipped), 1 to resume" in s for s in said)
    assert any(f"{names[-1]}: resuming after round 1" in s for s in said)
    assert "resuming after round 1" in (cut / "sweep.log").read_text()
    again = read_jsonl(cut / "metrics.jsonl")
    assert [m["round"] for m in again] == [1, 2] and deterministic(again) == deterministic(whole)
    rows2 = {r["name"]: r for r in _rows(out / "results.csv")}
    assert len(rows2) == 8 and rows2[names[-1]]["attempts"] == "2" and rows2[names[0]]["attempts"] == "1"
    assert rows2[names[-1]]["final_eval_accuracy"] == by[names[-1]]["final_eval_accuracy"]

    # a third time: nothing to do
    third = run_sweep(sweep, out, jobs=0, say=said.append)
    assert set(third.status.values()) == {"skipped"}


def test_a_finished_run_keeps_only_its_newest_checkpoints(tmp_path, sweep_module):
    sweep = Sweep.from_dict({"name": "keep", "base": {**BASE, "rounds": 3}, "grid": {"seed": [0]}})
    run_sweep(sweep, tmp_path / "one", jobs=0, say=lambda _: None)
    kept = checkpoint.list_checkpoints(checkpoint.checkpoint_dir(tmp_path / "one" / "seed=0"))
    assert [p.name for p in kept] == ["round-000003.ckpt"]          # rounds 1 and 2 were written, then pruned
    run_sweep(sweep, tmp_path / "none", jobs=0, say=lambda _: None, keep_checkpoints=0)
    assert checkpoint.list_checkpoints(checkpoint.checkpoint_dir(tmp_path / "none" / "seed=0")) == []
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        run_sweep(sweep, tmp_path / "bad", jobs=0, say=lambda _: None, keep_checkpoints=-1)


@pytest.mark.slow
def test_a_run_killed_mid_way_fails_the_sweep_and_the_next_sweep_resumes_it(tmp_path, sweep_module, monkeypatch,
                                                                              capsys):
    # two worker processes; the 2-round run is SIGKILLed after writing round 2's metrics,
    # before its checkpoint; the 1-round run completes
    path = tmp_path / "kill.json"
    path.write_text(json.dumps({"name": "kill", "base": BASE, "grid": {"rounds": [1, 2]}}))
    out = tmp_path / "runs"
    monkeypatch.setenv("FEDZIP_TEST_KILL", "metrics@2")
    assert main(["sweep", str(path), "--logdir", str(out), "--jobs", "2", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 runs failed (rounds=2)" in err and "run the same command again" in err
    assert [m["round"] for m in read_jsonl(out / "rounds=2" / "metrics.jsonl")] == [1, 2]
    monkeypatch.delenv("FEDZIP_TEST_KILL")
    assert main(["sweep", str(path), "--logdir", str(out), "--jobs", "2"]) == 0
    said = capsys.readouterr().out
    assert "1 complete (skipped), 1 to resume" in said and "rounds=2: resuming after round 1" in said
    assert "rounds=2: resumed and done" in said and "rounds=1: " not in said.split("to resume")[1]
    assert [m["round"] for m in read_jsonl(out / "rounds=2" / "metrics.jsonl")] == [1, 2]
    rows = {r["name"]: r for r in _rows(out / "results.csv")}
    assert rows["rounds=2"]["status"] == "complete" and rows["rounds=2"]["attempts"] == "2"
    assert rows["rounds=1"]["attempts"] == "1" and rows["rounds=1"]["rounds_done"] == "1"
    assert json.loads((out / "rounds=2" / RUN_FILE).read_text())["attempts"][0]["exit"] == -9


@pytest.mark.parametrize("grid, named", [
    ({"sed": [0, 1]}, "unknown path 'sed'"),
    ({"seed": [0], "aggregator.iner.codec.bits": [1]}, "unknown path 'aggregator.iner.codec.bits'"),
    ({"aggregator.inner.codec.bits": [2, "two"]}, "aggregator.inner.codec.bits='two'"),
    ({"aggregator.inner.codec.bitz": [2]}, "aggregator.inner.codec.bitz=2"),
    ({"aggregator.inner.codec.bits.x": [2]}, "unknown path 'aggregator.inner.codec.bits.x'"),
    ({"broadcast.codec.bits": [2]}, "unknown path 'broadcast.codec.bits'"),
    ({"rounds": [2, "3"]}, "rounds='3'"),
    ({"seed": []}, "'seed' must be a non-empty list"),
    ({"seed": [1, 1]}, "lists a value twice"),
])
def test_a_bad_grid_fails_before_any_run_starts_naming_the_path(tmp_path, sweep_module, capsys, grid, named):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"base": BASE, "grid": grid}))
    out = tmp_path / "runs"
    assert main(["sweep", str(path), "--logdir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedzip: error: ") and "\n" not in err and named in err, err
    assert not out.exists()  # nothing started: not even the valid grid points


def test_a_bad_sweep_file_fails_with_one_line(tmp_path, capsys):
    for text, named in (("{", "not valid JSON"), ('{"grd": {}}', "unknown key(s) ['grd']"),
                        ('{"base": {"rounds": 2, "lr": 1}}', "base: unknown field(s) ['lr']"),
                        ('{"grid": {"name": ["a"]}}', "run names come from the grid")):
        (tmp_path / "s.json").write_text(text)
        assert main(["sweep", str(tmp_path / "s.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert named in err and "\n" not in err, err


def test_run_names_are_stable_safe_and_unique_and_paths_reach_spec_strings():
    sweep = Sweep.from_dict({
        "name": "names",
        "base": {"aggregator": {"type": "mean", "codec": {"type": "eden", "bits": 2}, "threshold": 0},
                 "broadcast": "eden:bits=8,threshold=0", "client_optimizer": {"type": "sgd"}},
        "grid": {"aggregator.codec.bits": [1, 0.5], "broadcast.bits": [4],
                 "client_optimizer": [{"type": "sgd"}, {"type": "adam", "eps": 0.001}],
                 "dataset": ["mnist5k"], "task": ["images"]},
        "variants": {"a/b c": {}, "plain": {"server_lr": 0.5}},
    })
    runs = sweep.runs()
    names = [r.name for r in runs]
    assert len(set(names)) == len(names) == 2 * 2 * 2
    for n in names:
        assert all(c.isalnum() or c in "._+-=,~" for c in n) and not n.startswith((".", "-")), n
    first = names[0].split(",")
    assert first[0].startswith("a_b_c~") and first[1:3] == ["codec.bits=1", "broadcast.bits=4"]
    assert first[3].startswith("client_optimizer=sgd~") and first[4:] == ["dataset=mnist5k", "task=images"]
    assert names == [r.name for r in sweep.runs()]  # stable
    r0 = runs[0].config
    assert r0.aggregator["codec"]["bits"] == 1 and r0.broadcast == "eden:bits=4,threshold=0"
    assert r0.checkpoint_every == 1  # sweep runs checkpoint so that they can resume
    assert {r.config.server_lr for r in runs} == {1.0, 0.5}
    assert runs[0].group == runs[0].name  # no seed in the grid: every run is its own group
    with pytest.raises(ConfigError, match="unknown path 'seed.x'"):
        Sweep.from_dict({"grid": {"seed.x": [1]}}).runs()


def test_set_changes_the_base_and_yaml_files_load(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "s.yaml").write_text("name: y\nbase: {rounds: 3}\ngrid:\n  seed: [0, 1, 2]\n")
    sweep = load_sweep(tmp_path / "s.yaml").with_base(["rounds=5", "aggregator=eden:bits=2"])
    runs = sweep.runs()
    assert [r.name for r in runs] == ["seed=0", "seed=1", "seed=2"] and {r.group for r in runs} == {"all"}
    assert runs[0].config.rounds == 5 and runs[0].config.aggregator == "eden:bits=2"


def test_dry_run_lists_the_runs_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "s.json").write_text(json.dumps({"name": "d", "grid": {"seed": [0, 1]}}))
    assert main(["sweep", str(tmp_path / "s.json"), "--logdir", str(tmp_path / "o"), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "2 new" in said and "new      seed=1" in said and not (tmp_path / "o").exists()


def test_mean_sd_and_json_safe_by_hand():
    from fedzip.sweep import json_safe, mean_sd

    m, sd = mean_sd([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and sd == pytest.approx(0.1)        # sqrt(((-.1)^2 + 0 + .1^2) / 2)
    assert mean_sd([0.5])[0] == 0.5 and math.isnan(mean_sd([0.5])[1])
    assert all(math.isnan(v) for v in mean_sd([]))
    assert json_safe({"a": [1.0, math.nan, (math.inf, 2)], "b": "x"}) == {"a": [1.0, None, [None, 2]], "b": "x"}


def test_the_t_interval_over_seeds_by_hand():
    mean, low, high = t_interval([0.5, 0.6, 0.7])
    half = T_975[2] * 0.1 / math.sqrt(3)  # sd of 0.5, 0.6, 0.7 is 0.1
    assert mean == pytest.approx(0.6)
    assert low == pytest.approx(0.6 - half, rel=1e-3) and high == pytest.approx(0.6 + half, rel=1e-3)
    m90 = t_interval([1.0, 3.0], confidence=0.90)  # t(0.95, 1) = 6.314
    assert m90[2] - m90[0] == pytest.approx(6.314 * math.sqrt(2) / math.sqrt(2), rel=1e-3)
    one = t_interval([0.7])
    assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2])


def _fake_run(d: Path, config: dict, rounds: list[dict]) -> None:
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"config": config, "task": config.get("task")}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in rounds))


def test_compare_prints_runs_of_other_tasks_side_by_side_and_writes_the_png(tmp_path, capsys):
    up = "aggregated_bits/cumulative"
    _fake_run(tmp_path / "runs" / "cnn", {"task": "images", "algorithm": "fedavg", "aggregator": "eden:bits=2",
                                          "rounds": 2},
              [{"round": 1, up: 100, "broadcasted_bits/cumulative": 300, "train/loss": 2.0, "eval/accuracy": 0.5,
                "eval/loss": 1.5, "time/round_s": 1.0, "time/eval_s": 0.5},
               {"round": 2, up: 200, "broadcasted_bits/cumulative": 600, "train/loss": 1.0, "eval/accuracy": 0.4,
                "eval/loss": 1.2, "time/round_s": 1.0}])
    _fake_run(tmp_path / "other" / "lm", {"task": "shakespeare", "algorithm": {"type": "fedprox", "mu": 0.1},
                                          "aggregator": "mean", "rounds": 5},
              [{"round": 1, up: 4096, "train/loss": 3.0}])
    with open(tmp_path / "other" / "lm" / "metrics.jsonl", "a") as f:
        f.write('{"round": 2, "cut sh')  # a line cut short by a crash
    png, table = tmp_path / "cmp.png", tmp_path / "cmp.csv"
    assert main(["compare", str(tmp_path / "runs"), str(tmp_path / "other" / "lm"), "--out", str(png),
                 "--csv", str(table)]) == 0
    lines = capsys.readouterr().out.splitlines()
    cnn = next(line for line in lines if line.startswith("cnn "))
    lm = next(line for line in lines if line.startswith("lm "))
    assert "images" in cnn and "eden:bits=2" in cnn and "0.4000" in cnn and "0.5000" in cnn and "200.00bit" in cnn
    assert "shakespeare" in lm and "fedprox(mu=0.1)" in lm and "4.00Kibit" in lm
    assert "0.4000" not in lm and "0.5000" not in lm and "1.2000" not in lm  # no eval metrics: blanks
    assert png.read_bytes()[:4] == b"\x89PNG"
    rows = {r["name"]: r for r in _rows(table)}
    assert rows["cnn"]["best_eval_accuracy"] == "0.5" and rows["cnn"]["best_eval_accuracy_round"] == "1"
    assert rows["cnn"]["best_eval_loss"] == "1.2" and rows["cnn"]["time_s"] == "2.5"
    assert rows["lm"]["final_eval_accuracy"] == "" and rows["lm"]["rounds_done"] == "1"
    assert rows["lm"]["downlink_bits"] == "" and rows["lm"]["rounds"] == "5"
    assert main(["compare", str(tmp_path / "nothing")]) == 2


def test_summaries_pick_best_as_max_of_accuracy_and_min_of_loss():
    h = [{"round": 1, "eval/accuracy": 0.3, "eval/loss": 2.0}, {"round": 2, "eval/accuracy": 0.6, "eval/loss": 2.5},
         {"round": 3, "eval/accuracy": 0.5, "eval/loss": 1.0}]
    s = summarize_history(h)
    assert (s["final_eval_accuracy"], s["best_eval_accuracy"], s["best_eval_accuracy_round"]) == (0.5, 0.6, 2)
    assert (s["final_eval_loss"], s["best_eval_loss"], s["best_eval_loss_round"]) == (1.0, 1.0, 3)
    assert summarize_history([])["final_eval_accuracy"] is None


@pytest.mark.slow
def test_a_sweep_runs_on_ray(tmp_path, sweep_module):
    pytest.importorskip("ray")
    sweep = Sweep.from_dict({"name": "ray", "base": BASE, "grid": {"seed": [0, 1]}})
    res = run_sweep(sweep, tmp_path / "ray", backend="ray", threads=1, say=lambda s: None)
    assert res.status == {"seed=0": "ran", "seed=1": "ran"}
    assert [r["status"] for r in _rows(tmp_path / "ray" / "results.csv")] == ["complete", "complete"]


def test_parquet_table_when_pyarrow_is_there(tmp_path, sweep_module):
    pq = pytest.importorskip("pyarrow.parquet")
    sweep = Sweep.from_dict({"name": "pq", "base": {**BASE, "rounds": 1}, "grid": {"seed": [0, 1]}})
    run_sweep(sweep, tmp_path / "pq", jobs=0, say=lambda s: None)
    t = pq.read_table(tmp_path / "pq" / "results.parquet")
    assert t.num_rows == 2 and "final_eval_accuracy" in t.column_names
