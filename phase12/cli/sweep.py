"""Sweep subcommands: sweep, risk, report, pipeline.

All of them work in one folder per sweep, ROOT/TAG (default runs/<timestamp>).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch

from phase12.backends import device_for
from phase12.cli.parsing import (
    EXIT_FAILED,
    FIELDS,
    GRID_FLAGS,
    TAG,
    ArgumentParser,
    PickedDefault,
    add_config_flags,
    add_grid_flags,
    check_writable,
    config_from_args,
    csv_list,
    default_backends,
)
from phase12.config import MODES, ConfigError, RunConfig, resolve_device
from phase12.grid import SweepSpec, unsupported_cells
from phase12.io import FolderBusy, FolderLock, check_columns, write_atomic
from phase12.records import check_risk_folder, recorded_flags, recorded_grid
from phase12.schema import RISK_CSV, RUNS_CSV, STATUS_ERROR
from phase12.sweep import check_seed_batches, run_sweep

DESCRIPTIONS = {
    "sweep": "Run a resumable grid of modes x backends x k x seeds (x T x D x precisions) "
    "into ROOT/TAG.",
    "risk": "Write ROOT/TAG/risk_checks.csv: the checks (at k 5) at the model setting of the "
    "results in ROOT/TAG (its sweep.json, or where single runs wrote it its first OK run's "
    "row and meta JSON; flags given must agree with it), or of the flags.",
    "report": "Rebuild summary.csv, full_minus_fo.csv (robustness.csv for a map over shapes "
    "and precisions), figures/ and report.md of a sweep from its CSVs.",
    "pipeline": "sweep, then risk checks, then the report, into ROOT/TAG.",
}
# The axes a risk command takes: the backends it checks and the shape it checks at.
RISK_AXES = ("backend", "seq_len", "dim", "dtype")
GRID_DEFAULTS = {
    "mode": MODES,
    "backend": PickedDefault("every backend that can run on CUDA, reference on the CPU"),
    "inner_steps": (1, 5, 10, 20),
    "seed": (0, 1),
    "ablation": ("none",),
    "seq_len": (RunConfig.seq_len,),
    "dim": (RunConfig.dim,),
    "dtype": (RunConfig.dtype,),
}


def parser(name: str) -> ArgumentParser:
    p = ArgumentParser(prog=f"run.py {name}", description=DESCRIPTIONS[name])
    required = name in ("risk", "report")
    p.add_argument(
        "--tag",
        required=required,
        default=None if required else time.strftime("%Y%m%d-%H%M%S"),
        help="name of the sweep folder" + ("" if required else " (default: a timestamp)"),
    )
    p.add_argument(
        "--root", type=Path, default=Path("runs"), help="where sweep folders live (default runs/)"
    )
    if name == "report":
        return p
    # The risk checks run at k 5 and one seed, on the grid's first shape, in this process:
    # of the grid they take the backends and the shape, and no workers.
    risk = name == "risk"
    taken = {n: d for n, d in GRID_DEFAULTS.items() if n in RISK_AXES or not risk}
    add_grid_flags(p, taken)
    if not risk:
        p.add_argument(
            "--restart",
            action="store_true",
            help="start the tag afresh: its earlier results move aside to TAG.replaced-TIME "
            "(nothing is deleted); needed to run other settings into a tag",
        )
    add_config_flags(p, [n for n in FIELDS if n not in GRID_FLAGS], defaults={"outer_steps": 500})
    if risk:
        fixed = {n: d for n, d in GRID_DEFAULTS.items() if n not in taken}  # a spec needs them
        p.set_defaults(devices=None, **fixed)
    else:
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument(
            "--devices",
            type=csv_list(str, repeats=True),
            default=None,
            help="comma-separated devices, one sweep worker each (default: every visible GPU, "
            "else the --device); e.g. cuda:0,cuda:1, or cuda:0,cuda:0 for two workers on one "
            "GPU (sooner done; their step times then include each other's, as device_runners "
            "says)",
        )
        p.add_argument(
            "--no-batch-seeds",
            action="store_true",
            help="run every seed on its own instead of the seeds of a cell as one batch",
        )
    if name != "sweep":
        p.add_argument(
            "--no-gradgradcheck",
            action="store_true",
            help="skip the (slow) float64 gradcheck/gradgradcheck of the Triton op",
        )
    return p


def check_folder(root: Path, tag: str) -> Path:
    """ROOT/TAG, with TAG a plain name and ROOT a folder (or absent). Raises ConfigError."""
    if not TAG.fullmatch(tag):
        path = Path(tag)
        hint = (
            f"; for the folder {tag}, give --root {path.parent} --tag {path.name}"
            if "/" in tag and TAG.fullmatch(path.name)
            else ""
        )
        raise ConfigError(
            f"--tag {tag!r} is not a plain name: use letters, digits, '.', '_' and '-' "
            f"(no '/', not starting with '.'){hint}"
        )
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--root {root} exists and is not a folder")
    return root / tag


def _risk_flags(
    p: ArgumentParser, argv: list[str], args: argparse.Namespace, made: bool
) -> tuple[argparse.Namespace, str]:
    """The risk command's flags, those not given taken from what the folder's results
    were made with, and the line that says where its settings come from. ConfigError for
    more than one T, D or precision: the checks run at one, and more were ignored."""
    source, recorded = recorded_flags(check_folder(args.root, args.tag))
    if recorded:
        p.set_defaults(**recorded)
        args = p.parse_args(argv)
    for name in ("seq_len", "dim", "dtype"):
        if len(getattr(args, name)) > 1:
            flag = GRID_FLAGS[name]
            raise ConfigError(
                f"{flag}: the risk checks run at one {flag[2:-1]} at a time; give one value "
                "(run risk once per value)"
            )
    folder = args.root / args.tag
    if recorded:
        return args, f"risk: the settings of {source} where no flag is given"
    if made:
        return args, f"risk: {folder} is a new folder (is --tag a sweep's?); the flags' settings"
    return args, f"risk: {folder} holds no runs or sweep record; the flags' settings"


def _spec(args: argparse.Namespace, runs: bool) -> SweepSpec:
    """The grid of `args`, checked before any work. `runs`: the command runs its cells
    (sweep, pipeline: the cells beyond a backend's limits are found, and the folder the
    runs go into is checked); otherwise it checks the grid's backends (risk). Raises
    ConfigError."""
    check_folder(args.root, args.tag)
    # The base takes the first shape and precision of the grid, so that settings checked
    # against them (signal positions < T) are checked at a shape the grid runs.
    first = {n: getattr(args, n)[0] for n in ("seq_len", "dim", "dtype")}
    at_first = argparse.Namespace(**vars(args) | first)
    base = config_from_args(at_first, exclude=set(GRID_FLAGS) - set(first))
    spec = SweepSpec(
        base=base,
        modes=args.mode,
        backends=args.backend or default_backends(base.device),
        inner_steps=args.inner_steps,
        seeds=args.seed,
        ablations=args.ablation,
        seq_lens=args.seq_len,
        dims=args.dim,
        dtypes=args.dtype,
    )
    if not spec.configs():
        raise ConfigError("the grid is empty: give at least one mode, backend, k and seed")
    beyond = {}
    if runs:
        beyond = unsupported_cells(spec)
    else:  # risk checks: a backend asked for by name must run here; a default one may SKIP
        for backend in args.backend or (spec.base.backend,):
            device_for(spec.base.replace(backend=backend))
    for device in args.devices or ():
        try:
            device_for(spec.base.replace(device=device))
        except ConfigError as e:
            raise ConfigError(f"--devices: {e}") from e
    folder = args.root / args.tag
    if runs and not args.restart:  # a restart moves an older folder's files aside
        try:
            check_columns(folder / RUNS_CSV)
        except ValueError as e:
            raise ConfigError(f"{e} (or --restart, which moves it aside)") from e
    if runs:  # the seed batches left to run, before the folder is made or locked
        check_seed_batches(spec, folder, beyond, not args.no_batch_seeds, args.restart)
    check_writable(folder)
    return spec


def _sweep(args, spec: SweepSpec, check_folder: Callable[[Path], None] | None = None) -> int:
    folder = args.root / args.tag
    devices = args.devices
    if devices is None and resolve_device(spec.base.device).type == "cuda":
        devices = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    counts = run_sweep(
        spec,
        folder,
        progress=not args.no_progress,
        batch_seeds=not args.no_batch_seeds,
        devices=devices,
        restart=args.restart,
        check_folder=check_folder,
        holding_lock=True,
    )
    print(f"sweep {folder}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    errors = counts.get(STATUS_ERROR, 0)
    if errors:
        print(
            f"error: {errors} run(s) ended in ERROR (the error column of {folder / RUNS_CSV} "
            "says why); the same command runs them again",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


def _risk(args, spec: SweepSpec) -> int:
    from phase12.risk import run_risk_checks

    folder = args.root / args.tag
    df = run_risk_checks(
        spec.base.replace(inner_steps=5),
        folder,
        gradgradcheck=not args.no_gradgradcheck,
        backends=spec.backends,
    )
    write_atomic(folder / RISK_CSV, df.to_csv(index=False))
    print(df.drop(columns="setting").to_string(index=False))
    return 1 if (df["status"] == "FAIL").any() else 0


def _report_can_read(spec: SweepSpec) -> Callable[[Path], None]:
    """The pipeline's check of its folder before the sweep runs: what the report would
    refuse in the runs the sweep keeps (analysis.report.check_inputs), as ConfigError,
    rather than after all the work."""
    from analysis.report import check_inputs

    to_come = {(c.seq_len, c.dim, c.dtype) for c in spec.configs()}

    def check(folder: Path) -> None:
        try:
            check_inputs(folder, to_come)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    return check


def _report(args) -> int:
    from analysis.report import build_report

    folder = args.root / args.tag  # the caller holds the folder's lock
    path = build_report(folder, recorded_grid(folder))
    print(f"report written to {path}")
    return 0


def main(name: str, argv: list[str]) -> int:
    p = parser(name)
    args = p.parse_args(argv)
    folder = args.root / args.tag
    # The folder's lock for the whole command: a pipeline's sweep, risk checks and report
    # with no other writer between them, and no report of a sweep half done.
    made = not folder.exists()  # then a command that ends without results leaves none
    with ExitStack() as held:
        try:
            if name == "report":
                check_folder(args.root, args.tag)
                if not (folder / RUNS_CSV).exists():
                    if (folder / ".writer.lock").exists():  # a writer at work there is named
                        with FolderLock(folder):
                            pass
                    raise ConfigError(
                        f"no runs.csv in {folder}: no run has finished there (run the sweep "
                        "first; a run killed before its end saves nothing)"
                    )
            else:
                if name == "risk":
                    args, settings_from = _risk_flags(p, argv, args, made)
                spec = _spec(args, runs=name != "risk")
            held.enter_context(FolderLock(folder, remove_if_unused=made))
            if name == "report":
                return _report(args)  # a CSV it cannot read: ValueError, nothing written
            if name == "risk":
                check_risk_folder(folder, spec.base)
                print(settings_from)
                return _risk(args, spec)
            start = time.perf_counter()
            status = _sweep(args, spec, _report_can_read(spec) if name == "pipeline" else None)
        except (ConfigError, FolderBusy) as e:  # raised before any work
            return p.bad_input(e)
        except ValueError as e:
            if name != "report":
                raise
            return p.bad_input(e)
        if name == "pipeline":
            swept = time.perf_counter()
            status = max(status, _risk(args, spec))
            checked = time.perf_counter()
            try:
                _report(args)
            except ValueError as e:  # a file the report cannot read; it wrote nothing
                return p.bad_input(e)
            print(
                f"pipeline: sweep {swept - start:.1f} s, risk checks {checked - swept:.1f} s, "
                f"report {time.perf_counter() - checked:.1f} s"
            )
        return status
