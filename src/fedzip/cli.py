"""Command line: ``fedzip tutorial`` (the seed experiment, both runs),
``fedzip run`` (one run from flags or a config file; ``--resume DIR`` goes on
from DIR's last good checkpoint), ``fedzip sweep FILE`` (a grid of runs with
seeds, a results table and error bars), ``fedzip compare DIR...`` (runs side
by side) and ``fedzip codecs`` (every codec, its arguments and paper). Bad input ends in one line,
``fedzip: error: ...``, and exit status 2, before any training starts."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from fedzip.config import FIELD_HELP, RunConfig
from fedzip.errors import ConfigError, FedzipError


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors worded as fedzip's own."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"fedzip: error: {message}\n")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        conv = int if kind.startswith("int") else float if kind.startswith("float") else str
        p.add_argument(flag, dest=f.name, type=conv, default=None,
                       help=f"{FIELD_HELP[f.name]} (default {f.default!r})")


def _config_from(args: argparse.Namespace, base: RunConfig) -> RunConfig:
    changes = {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name) is not None}
    for f in fields(RunConfig):
        value = changes.get(f.name)
        # fields that take nested objects accept JSON on the command line too
        if "dict" in str(f.type) and isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                changes[f.name] = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--{f.name.replace('_', '-')}: not valid JSON: {e}") from None
    return RunConfig.from_dict({**base.to_dict(), **changes})


def cmd_run(args: argparse.Namespace) -> int:
    from fedzip.run import run

    if args.resume is not None:
        if args.config or args.logdir:
            raise ConfigError("--resume DIR takes its config from DIR/run.json and writes to DIR: "
                              "give neither --config nor --logdir with it")
        logdir = Path(args.resume)
        if not logdir.is_dir():
            raise ConfigError(f"--resume: {logdir} is not a folder")
        if not (logdir / "run.json").exists() and (logdir.parent / "run.json").exists():
            logdir = logdir.parent  # DIR/checkpoints given
        if not (logdir / "run.json").exists():
            raise ConfigError(f"--resume: {logdir / 'run.json'} does not exist: not a run folder")
        config = _config_from(args, RunConfig.from_file(logdir / "run.json"))
    else:
        base = RunConfig.from_file(args.config) if args.config else RunConfig()
        config = _config_from(args, base)
        _check_name(config.name)
        logdir = Path(args.logdir or "runs") / config.name
    result = run(config, logdir, resume=args.resume is not None)
    print(f"final eval: {result.final_eval}; metrics in {logdir}")
    return 0


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"name {name!r} must be a plain folder name (it becomes LOGDIR/NAME)")


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


def codec_table() -> list[tuple[str, str, str, str]]:
    """(name, arguments with defaults, first paragraph of the docstring, paper) of every
    codec name a config or ``--aggregator`` / ``--broadcast`` accepts."""
    import inspect

    from fedzip.codecs import registry
    from fedzip.codecs.presets import PAPERS

    rows = []
    for name, factory in sorted(registry().items()):
        target = factory.__init__ if inspect.isclass(factory) else factory
        try:
            params = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            params = []
        args = ", ".join(
            p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
            for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        doc = (inspect.getdoc(factory) or "").strip().split("\n\n")[0].replace("\n", " ")
        rows.append((name, args, doc, PAPERS.get(name, "")))
    return rows


def cmd_codecs(args: argparse.Namespace) -> int:
    """Print every codec name with its arguments, defaults and description (paper)."""
    for name, arguments, doc, paper in codec_table():
        print(f"{name}({arguments})")
        print(f"    {doc}")
        if paper:
            print(f"    paper: {paper}")
    print("\nuse as --aggregator NAME:key=value,... (uplink) or --broadcast NAME:key=value,... (downlink)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A grid of runs from a sweep file (fedzip.sweep): in parallel, resumable, one table and plot."""
    from fedzip.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.config)
    if args.set:
        sweep = sweep.with_base(args.set)
    try:
        result = run_sweep(sweep, args.logdir, jobs=args.jobs, backend=args.backend, threads=args.threads,
                           ray_address=args.ray_address, dry_run=args.dry_run, metric=args.metric,
                           confidence=args.confidence, keep_checkpoints=args.keep_checkpoints)
    except KeyboardInterrupt:
        print("fedzip: sweep interrupted: run the same command again to resume it", file=sys.stderr)
        return 130
    if result.failed:
        print(f"fedzip: error: {len(result.failed)} of {len(result.runs)} runs failed "
              f"({', '.join(result.failed[:3])}{', ...' if len(result.failed) > 3 else ''}); "
              "run the same command again to resume them", file=sys.stderr)
        return 1
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Runs side by side: one table, one plot (fedzip.compare)."""
    from fedzip.compare import compare

    compare(args.dirs, out=args.out, csv_path=args.csv, metric=args.metric)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="fedzip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="one run, from flags or --config FILE")
    p_run.add_argument("--config", help="a JSON config (e.g. a previous run's run.json); flags override it")
    p_run.add_argument("--logdir", default=None, help="metrics go to LOGDIR/NAME (default runs/NAME)")
    p_run.add_argument("--resume", metavar="DIR", default=None,
                       help="go on from the last good checkpoint in DIR (a run's LOGDIR/NAME), "
                            "with the config in DIR/run.json; flags change it (e.g. --rounds)")
    _add_config_flags(p_run)
    p_run.set_defaults(fn=cmd_run)
    p_tut = sub.add_parser("tutorial", help="the seed experiment: mean vs compression aggregator")
    p_tut.add_argument("--logdir", default="runs/tutorial", help="where both runs and the plot go")
    _add_config_flags(p_tut)
    p_tut.set_defaults(fn=cmd_tutorial)
    p_codecs = sub.add_parser("codecs", help="list every codec with its arguments, defaults and paper")
    p_codecs.set_defaults(fn=cmd_codecs)
    p_sweep = sub.add_parser("sweep", help="a grid of runs from a sweep file, in parallel, resumable")
    p_sweep.add_argument("config", metavar="SWEEP_FILE",
                         help="JSON (or YAML with PyYAML): {name, base, grid, variants}; see fedzip.sweep")
    p_sweep.add_argument("--logdir", default=None, help="where the runs, table and plot go (default runs/NAME)")
    p_sweep.add_argument("--jobs", type=int, default=None,
                         help="runs at a time, each its own process (default 1; on ray all; 0: in this process)")
    p_sweep.add_argument("--backend", choices=["local", "ray"], default="local",
                         help="local: a subprocess per run here; ray: a Ray task per run")
    p_sweep.add_argument("--ray-address", default=None,
                         help="with --backend ray: a cluster to join (default a fresh local Ray)")
    p_sweep.add_argument("--threads", type=int, default=None,
                         help="torch threads per run (default the cores divided by --jobs)")
    p_sweep.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                         help="change the base config: a dotted path and a JSON value (repeatable)")
    p_sweep.add_argument("--metric", default="eval/accuracy",
                         help="the metric of the per-setting table and the plot")
    p_sweep.add_argument("--confidence", type=float, default=0.95,
                         help="confidence of the t-interval over seeds")
    p_sweep.add_argument("--keep-checkpoints", type=int, default=1,
                         help="newest checkpoints kept of each finished run (0: none; default 1)")
    p_sweep.add_argument("--dry-run", action="store_true",
                         help="check the grid, list the runs and what would happen to each; run nothing")
    p_sweep.set_defaults(fn=cmd_sweep)
    p_cmp = sub.add_parser("compare", help="runs side by side: a table and a plot")
    p_cmp.add_argument("dirs", nargs="+", metavar="DIR",
                       help="a run folder, or a folder with run folders below it (a sweep's logdir)")
    p_cmp.add_argument("--out", default="comparison.png", help="the plot (default comparison.png)")
    p_cmp.add_argument("--csv", default=None, help="also write the table to this CSV file")
    p_cmp.add_argument("--metric", default="eval/accuracy", help="the metric plotted against rounds and bits")
    p_cmp.set_defaults(fn=cmd_compare)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except FedzipError as e:
        print(f"fedzip: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing file, an unwritable logdir, a full disk: a message, not a traceback
        where = f" {e.filename}:" if e.filename else ""
        print(f"fedzip: error:{where} {e.strerror or e}", file=sys.stderr)
        # a path that is not there or not allowed is bad input (2); anything else, a failure (1)
        return 2 if isinstance(e, (FileNotFoundError, PermissionError, NotADirectoryError,
                                   IsADirectoryError, FileExistsError)) else 1
    except KeyboardInterrupt:
        print("fedzip: interrupted (with --checkpoint-every, `fedzip run --resume DIR` goes on)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
