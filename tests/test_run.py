"""End-to-end: the training loop on real handwriting, metrics files, the tutorial command."""

import json
from pathlib import Path

import pytest

from fedzip.config import RunConfig
from fedzip.errors import ConfigError
from fedzip.metrics import format_bits, format_round, read_jsonl
from fedzip.run import run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "unipen"
needs_unipen = pytest.mark.skipif(
    not (SHARED / "fed_unipen_digitsonly_tiny_train.h5").exists(),
    reason=f"UNIPEN data not found at {SHARED} (the repository's sibling shared/ folder)",
)


def test_format_bits_uses_binary_units():
    assert format_bits(53_227_840 * 10) == "507.62Mibit"
    assert format_bits(13_464_000 * 10) == "128.40Mibit"
    assert format_bits(3 * 2**30) == "3.00Gibit"
    line = format_round({"round": 1, "train/loss": 2.0, "train/accuracy": 0.5, "train/num_examples": 10,
                         "train/num_batches": 1, "broadcasted_bits": 2**20, "aggregated_bits": 2**21})
    assert "broadcasted_bits=1.00Mibit" in line and "aggregated_bits=2.00Mibit" in line
    assert "cumulative" in line


@needs_unipen
def test_three_rounds_on_unipen_lower_the_training_loss(tmp_path):
    config = RunConfig(dataset="unipen-digits-tiny", rounds=3, clients_per_round=8,
                       aggregator="compression", name="t")
    result = run(config, tmp_path, console=False)
    losses = [m["train/loss"] for m in result.history]
    assert losses[-1] < losses[0], losses
    assert result.final_eval["accuracy"] > 0.2  # 10 classes: chance is 0.1
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [m["round"] for m in lines] == [1, 2, 3]
    assert lines[-1]["aggregated_bits/cumulative"] == sum(m["aggregated_bits"] for m in lines)
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["config"] == config.to_dict() and "torch" in meta["versions"]
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ConfigError, match="client_lr"):
        RunConfig(client_lr=-0.1)
    with pytest.raises(ConfigError, match="clients_per_round"):
        RunConfig(clients_per_round=0)
    with pytest.raises(ConfigError, match="aggregator 'meen' unknown"):
        RunConfig(aggregator="meen")
    with pytest.raises(ConfigError, match="unknown option"):
        RunConfig.from_dict({"rounds": 2, "roundz": 3})
    with pytest.raises(ConfigError, match="rounds must be of type int"):
        RunConfig(rounds="ten")
    with pytest.raises(ConfigError, match="bits"):
        RunConfig(aggregator="compression:bits=40")
