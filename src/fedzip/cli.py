"""Command line: ``fedzip tutorial`` (the seed experiment, both runs) and
``fedzip run`` (one run from flags or a config file)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from fedzip.config import RunConfig
from fedzip.errors import FedzipError


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        conv = int if kind.startswith("int") else float if kind.startswith("float") else str
        p.add_argument(flag, dest=f.name, type=conv, default=None, help=f"(default {f.default!r})")


def _config_from(args: argparse.Namespace, base: RunConfig) -> RunConfig:
    changes = {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name) is not None}
    return RunConfig.from_dict({**base.to_dict(), **changes})


def cmd_run(args: argparse.Namespace) -> int:
    from fedzip.run import run

    base = RunConfig.from_file(args.config) if args.config else RunConfig()
    config = _config_from(args, base)
    logdir = Path(args.logdir) / config.name
    result = run(config, logdir)
    print(f"final eval: {result.final_eval}; metrics in {logdir}")
    return 0


def cmd_tutorial(args: argparse.Namespace) -> int:
    """The TFF tutorial: the same FedAvg run with a plain weighted mean and with
    the compression aggregator, then one plot comparing them."""
    from fedzip.metrics import format_bits, plot_runs
    from fedzip.run import load_data, run

    base = _config_from(args, RunConfig())
    data = load_data(base)
    train, _, info = data
    print(f"data: {info.name}: {info.description}")
    print(f"      {len(train.client_ids)} training clients, {info.num_classes} classes; {info.pixels}")
    logdir = Path(args.logdir)
    histories = {}
    for name, agg in (("mean", "mean"), ("compression", "compression")):
        config = base.replace(aggregator=agg, name=name)
        print(f"\n== {name}: aggregator={agg}")
        histories[name] = run(config, logdir / name, data=data).history
    png = plot_runs(histories, logdir / "comparison.png")
    print("\nsummary:")
    for name, h in histories.items():
        last = h[-1]
        print(f"  {name:12s} eval_accuracy={last.get('eval/accuracy', float('nan')):.4f} "
              f"aggregated={format_bits(last['aggregated_bits/cumulative'])} "
              f"broadcasted={format_bits(last['broadcasted_bits/cumulative'])}")
    print(f"\nTensorBoard: tensorboard --logdir {logdir}\nplot: {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedzip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="one run, from flags or --config FILE")
    p_run.add_argument("--config", help="a JSON config (e.g. a previous run's run.json)")
    p_run.add_argument("--logdir", default="runs", help="metrics go to LOGDIR/NAME")
    _add_config_flags(p_run)
    p_run.set_defaults(fn=cmd_run)
    p_tut = sub.add_parser("tutorial", help="the seed experiment: mean vs compression aggregator")
    p_tut.add_argument("--logdir", default="runs/tutorial")
    _add_config_flags(p_tut)
    p_tut.set_defaults(fn=cmd_tutorial)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except FedzipError as e:
        print(f"fedzip: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
