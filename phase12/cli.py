"""Subcommands of run.py other than the single run: sweep, risk, report, pipeline, bench.

All of them write into one folder per sweep, ROOT/TAG (default runs/<timestamp>).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from phase12.config import MODES, ConfigError
from phase12.records import check_columns

RISK_CSV = "risk_checks.csv"


def _csv_list(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x != "")
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list: {e}") from e

    return parse


def _folder_flags(p: argparse.ArgumentParser, tag_required: bool) -> None:
    p.add_argument(
        "--tag",
        required=tag_required,
        default=None if tag_required else time.strftime("%Y%m%d-%H%M%S"),
        help="name of the sweep folder" + ("" if tag_required else " (default: a timestamp)"),
    )
    p.add_argument(
        "--root", type=Path, default=Path("runs"), help="where sweep folders live (default runs/)"
    )


def _grid_flags(p: argparse.ArgumentParser) -> None:
    from run import add_config_flags

    p.add_argument(
        "--modes",
        type=_csv_list(str),
        default=MODES,
        help="comma-separated modes (default FULL,FO,FO_STRICT)",
    )
    p.add_argument(
        "--backends",
        type=_csv_list(str),
        default=("reference", "triton_fused"),
        help="comma-separated backends (default reference,triton_fused)",
    )
    p.add_argument(
        "--k",
        type=_csv_list(int),
        default=(1, 5, 10, 20),
        help="comma-separated inner steps (default 1,5,10,20)",
    )
    p.add_argument(
        "--seeds", type=_csv_list(int), default=(0, 1), help="comma-separated seeds (default 0,1)"
    )
    add_config_flags(p)
    p.set_defaults(outer_steps=500)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--devices",
        type=_csv_list(str),
        default=None,
        help="comma-separated devices, one sweep worker each (default: every visible GPU, "
        "else the --device); e.g. cuda:0,cuda:1 or cpu,cpu",
    )
    p.add_argument(
        "--no-batch-seeds",
        action="store_true",
        help="run every seed on its own instead of the seeds of a cell as one batch",
    )


def _spec(args, validate_cells: bool = True):
    from phase12.sweep import SweepSpec
    from run import config_from_args

    base = config_from_args(args)
    spec = SweepSpec(
        base=base, modes=args.modes, backends=args.backends, inner_steps=args.k, seeds=args.seeds
    )
    for config in spec.configs() if validate_cells else [base]:
        config.validate()
    for device in getattr(args, "devices", None) or ():
        base.replace(device=device).validate()
    if not spec.configs():
        raise ConfigError("the grid is empty: give at least one mode, backend, k and seed")
    try:
        check_columns(args.root / args.tag / "runs.csv")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return spec


def _sweep(args) -> int:
    from phase12.sweep import run_sweep

    folder = args.root / args.tag
    devices = args.devices
    if devices is None and args.spec.base.validate().type == "cuda":
        devices = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    counts = run_sweep(
        args.spec,
        folder,
        progress=not args.no_progress,
        batch_seeds=not args.no_batch_seeds,
        devices=devices,
    )
    print(f"sweep {folder}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def _risk(args) -> int:
    from phase12.records import write_atomic
    from phase12.risk import run_risk_checks

    folder = args.root / args.tag
    df = run_risk_checks(
        args.spec.base.replace(inner_steps=5),
        folder,
        gradgradcheck=not args.no_gradgradcheck,
        backends=args.spec.backends,
    )
    write_atomic(folder / RISK_CSV, df.to_csv(index=False))
    print(df.to_string(index=False))
    return 1 if (df["status"] == "FAIL").any() else 0


def _report(args) -> int:
    from analysis.report import build_report

    folder = args.root / args.tag
    path = build_report(folder)
    print(f"report written to {path}")
    return 0


def main_bench(argv: list[str]) -> int:
    from run import ArgumentParser

    # No -h of its own: `run.py bench attention --help` is the attention benchmark's.
    p = ArgumentParser(prog="run.py bench", add_help=False)
    choices = ["step", "attention", "tiles", "distributed"]
    p.add_argument(
        "what", choices=choices, help="which benchmark (--help after it for its options)"
    )
    if argv[:1] in (["-h"], ["--help"]):
        p.print_help()
        return 0
    args, rest = p.parse_known_args(argv)
    if args.what == "attention":
        from kernels.benchmark import main
    elif args.what == "tiles":
        from kernels.tile_sweep import main
    elif args.what == "distributed":
        from phase12.distributed_benchmark import main
    else:
        from phase12.benchmark import main
    return main(rest)


def parser(name: str) -> argparse.ArgumentParser:
    from run import ArgumentParser

    p = ArgumentParser(prog=f"run.py {name}")
    if name == "report":
        p.description = "Rebuild summary.csv, figures/ and report.md of a sweep from its CSVs."
        _folder_flags(p, tag_required=True)
        return p
    _folder_flags(p, tag_required=name == "risk")
    _grid_flags(p)
    if name in ("risk", "pipeline"):
        p.add_argument(
            "--no-gradgradcheck",
            action="store_true",
            help="skip the (slow) interpreter gradgradcheck of the Triton op",
        )
    p.description = {
        "sweep": "Run a resumable grid of modes x backends x k x seeds into ROOT/TAG.",
        "risk": "Write ROOT/TAG/risk_checks.csv (the grid flags give the model setting).",
        "pipeline": "sweep, then risk checks, then the report, into ROOT/TAG.",
    }[name]
    return p


def main_subcommand(name: str, argv: list[str]) -> int:
    if name == "bench":
        return main_bench(argv)
    args = parser(name).parse_args(argv)
    try:
        if name != "report":
            # Risk checks report an unavailable backend as SKIP instead of refusing.
            args.spec = _spec(args, validate_cells=name != "risk")
        elif not (args.root / args.tag / "runs.csv").exists():
            raise ConfigError(f"no runs.csv in {args.root / args.tag}: run the sweep first")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if name == "sweep":
        return _sweep(args)
    if name == "risk":
        return _risk(args)
    if name == "report":
        return _report(args)
    status = _sweep(args)
    status = max(status, _risk(args))
    _report(args)
    return status
