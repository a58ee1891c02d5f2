"""Resumable sweeps over modes x backends x inner steps x seeds.

    spec = SweepSpec(base=RunConfig(outer_steps=500), modes=("FULL", "FO"), ...)
    run_sweep(spec, Path("runs/my_tag"))

Layout of a sweep folder (the same as a single run's --out):

    runs.csv            one row per finished run (phase12.schema.RUN_COLUMNS)
    history/RUN.csv.gz  per-step loss, accuracy, attention meta-gradient norms (CSV, gzip)
    meta/RUN.json       config, versions, device, commit
    sweep.json          the settings (every RunConfig field but the grid axes and the
                        device) and the grid values run into the folder so far
    errors.csv          rows of ERROR runs that were retried (kept for the record)

One writer per folder: the sweep holds an OS-level lock on it from start to end
(phase12.io.FolderLock). Resuming with other settings is refused (a new tag, or
`restart`, which moves the old results aside to TAG.replaced-TIME; nothing is deleted).

With several devices (`devices`; the sweep command's default is every visible GPU),
cells run on runners, one per device (phase12.runners), and this process alone writes
the folder. A run's row is appended (atomically) only after its history and metadata
are on disk, so re-running the same sweep resumes: cells with a row are skipped, a run
that was interrupted has no row and is redone, and runs.csv always parses. A cell that
fails records status ERROR and its error, and the sweep goes on; the next run of the
same sweep retries it.

A cell beyond a backend's limits (phase12.backends.Backend.limit: a width its kernels
cannot hold, an ablation it has no switch for) is not run: it is recorded with status
UNSUPPORTED and the limit, so that a map over backends shows where each one stops. Every
other cell must be able to run here, and at least one cell must be within the limits;
otherwise the sweep is refused before any work.
"""

from __future__ import annotations

import contextlib
import csv
import io
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from phase12.backends import device_for
from phase12.config import ConfigError, RunConfig, resolve_device, settings
from phase12.grid import AXES, SweepSpec, seed_groups, unsupported_cells
from phase12.io import (
    FolderLock,
    append_row,
    check_columns,
    make_whole,
    other_settings,
    read_rows,
    rewrite_rows,
    save_run,
    write_json,
)
from phase12.provenance import run_metadata
from phase12.records import changed_from_record, sweep_record
from phase12.runners import run_groups, runner_device
from phase12.schema import RUNS_CSV, STATUS_ERROR, STATUS_UNSUPPORTED
from phase12.train import unsupported_result


def _open_folder(
    folder: Path, spec: SweepSpec, restart: bool, check: Callable[[Path], None] | None
) -> tuple[set[str], int]:
    """Make `folder` ready for `spec` (the caller holds its lock): refuse other settings
    unless `restart` (then move the old results aside), repair a torn runs.csv, let
    `check` refuse the runs the folder holds, move ERROR rows to errors.csv so their
    cells run again, drop the grid's UNSUPPORTED rows (they record no run; their cells
    are checked against the limits again), record the settings and grid. Returns
    (run_ids with a kept row, number of ERROR rows moved)."""
    record = folder / "sweep.json"
    if restart and any(p.name not in (".writer.lock", ".writer.json") for p in folder.iterdir()):
        stamp = f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside, n = folder.with_name(stamp), 1
        while aside.exists():  # two restarts within a second
            aside, n = folder.with_name(f"{stamp}-{n}"), n + 1
        aside.mkdir()
        for p in folder.iterdir():
            if p.name not in (".writer.lock", ".writer.json"):
                p.rename(aside / p.name)
        print(f"moved the earlier results of {folder} to {aside}", file=sys.stderr)
    old = sweep_record(folder)
    changed = changed_from_record(old, spec.base)
    if changed:
        raise ConfigError(
            f"{folder} holds results with other settings ({changed}); use a new tag, or "
            "run the sweep with --restart, which moves the old results aside"
        )
    runs_csv = folder / RUNS_CSV
    try:  # a damaged runs.csv or errors.csv: before any work, like other bad input
        check_columns(runs_csv)  # named first where both are another program's
        check_columns(folder / "errors.csv")
        make_whole(runs_csv)
        rows = read_rows(runs_csv)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    changed = other_settings(rows, spec.base, folder)  # also where no sweep.json says what they are
    if changed:
        raise ConfigError(
            f"{folder} holds runs with other settings ({changed}); use a new tag, or "
            "run the sweep with --restart, which moves the old results aside"
        )
    if check is not None:  # ERROR and UNSUPPORTED rows are read as no run by the check
        check(folder)
    grid = {c.run_id for c in spec.configs()}
    errors = [r for r in rows if r["status"] == STATUS_ERROR and r["run_id"] in grid]
    recheck = [r for r in rows if r["status"] == STATUS_UNSUPPORTED and r["run_id"] in grid]
    for r in errors:
        append_row(folder / "errors.csv", r)
    if errors or recheck:
        rewrite_rows(runs_csv, [r for r in rows if r not in errors and r not in recheck])
    grid = {axis: list(getattr(spec, axis)) for axis in AXES.values()}
    for axis, values in (old or {}).get("grid", {}).items():
        grid[axis] = list(dict.fromkeys([*values, *grid[axis]]))
    write_json(record, {"settings": settings(spec.base), "grid": grid})
    return {r["run_id"] for r in rows if r not in errors and r not in recheck}, len(errors)


def run_sweep(
    spec: SweepSpec,
    folder: Path,
    *,
    progress: bool = True,
    batch_seeds: bool = True,
    devices: Sequence[str] | None = None,
    restart: bool = False,
    announce: Callable[[str], None] = print,
    check_folder: Callable[[Path], None] | None = None,
    holding_lock: bool = False,
) -> dict[str, int]:
    """Run every unfinished cell of `spec` into `folder`; returns counts by status.

    With `batch_seeds`, the unfinished seeds of one (backend, mode, k) cell train as one
    seed-batched computation (phase12.train.run_experiments). With several
    `devices`, one runner per device runs cells (a thread here for the first, a worker
    process for each other); this process alone writes. Before any work: every cell is
    checked (ConfigError; the cells beyond a backend's limits are recorded as UNSUPPORTED
    instead of run), the folder is locked (FolderBusy if another process writes it), and
    its settings must be `spec`'s unless `restart` (ConfigError), and `check_folder`
    (if given) may refuse the runs it keeps (ConfigError), before anything in it changes;
    each seed batch left to run is checked to fit too (seed_groups; ConfigError).
    With `holding_lock`, the caller holds the folder's FolderLock already (a pipeline,
    across its steps). `announce` gets one line saying what will run.
    """
    configs = spec.configs()
    beyond = unsupported_cells(spec)
    for device in devices or ():
        device_for(spec.base.replace(device=device))
    devices = [runner_device(d) for d in devices] if devices else devices
    check_seed_batches(spec, folder, beyond, batch_seeds, restart)
    with contextlib.nullcontext() if holding_lock else FolderLock(folder):
        done, retried = _open_folder(folder, spec, restart, check_folder)
        finished = [c for c in configs if c.run_id in done]
        todo = [c for c in configs if c.run_id not in done and c.run_id not in beyond]
        unsupported = [c for c in configs if c.run_id in beyond]
        groups = seed_groups(todo, batch_seeds)
        where = ", ".join(devices) if devices else str(resolve_device(spec.base.device))
        default = RunConfig()
        axes = (
            ("T ", "seq_len", spec.seq_lens),
            ("D ", "dim", spec.dims),
            ("", "dtype", spec.dtypes),
        )
        shapes = "".join(  # the shape and precision axes, where not the defaults
            f" x {label}{', '.join(map(str, values))}"
            for label, name, values in axes
            if values != (getattr(default, name),)
        )
        announce(
            f"sweep {folder}: {len(configs)} runs ({', '.join(spec.backends)} x "
            f"{', '.join(map(str, spec.modes))}"
            + "".join(f", FULL-{a}" for a in spec.ablations if a != "none")
            + f" x k {', '.join(map(str, spec.inner_steps))} x "
            f"seeds {', '.join(map(str, spec.seeds))}{shapes}); "
            f"{len(finished)} done, "
            f"{len(todo)} to run on {where}"
            + (f" ({retried} that ended in ERROR run again)" if retried else "")
            + (
                f"; {len(beyond)} beyond a backend's limits, recorded as UNSUPPORTED "
                f"({'; '.join(sorted(set(beyond.values())))})"
                if beyond
                else ""
            )
        )
        for config in unsupported:
            result = unsupported_result(config, beyond[config.run_id])
            save_run(folder, result, run_metadata(config, resolve_device(config.device)))
        counts = _run_todo(groups, folder, progress, devices, len(finished))
        return counts | ({STATUS_UNSUPPORTED: len(unsupported)} if unsupported else {})


def check_seed_batches(
    spec: SweepSpec, folder: Path, beyond: dict, batch_seeds: bool, restart: bool
) -> None:
    """ConfigError where a seed batch that a sweep of `spec` into `folder` would train
    cannot fit (seed_groups): the seeds left to run as a resume would find them (`beyond`:
    unsupported_cells), read without changing anything."""
    kept = set() if restart else _kept_runs(folder)
    seed_groups([c for c in spec.configs() if c.run_id not in kept | beyond.keys()], batch_seeds)


def _kept_runs(folder: Path) -> set[str]:
    """The run_ids whose rows a resume of `folder` keeps: all but ERROR and UNSUPPORTED
    rows (run again) and a torn last line (moved aside). Read only; none where runs.csv
    cannot be read (_open_folder then says why)."""
    try:
        text = (folder / RUNS_CSV).read_text()
        whole = text[: text.rfind("\n") + 1]
        rows = list(csv.DictReader(io.StringIO(whole)))
        return {r["run_id"] for r in rows if r["status"] not in (STATUS_ERROR, STATUS_UNSUPPORTED)}
    except (OSError, UnicodeDecodeError, csv.Error, KeyError):
        return set()


def _run_todo(groups, folder, progress, devices, skipped: int) -> dict[str, int]:
    """Run `groups` (seed_groups) and write each run's files as its group finishes."""
    counts = {"skipped": skipped}
    with tqdm(
        total=sum(map(len, groups.values())),
        desc=f"sweep {folder.name}",
        unit="run",
        disable=not progress,
    ) as bar:
        for group, results in run_groups(list(groups.values()), devices):
            for result, metadata in results:
                save_run(folder, result, metadata)
                counts[result.status] = counts.get(result.status, 0) + 1
            bar.update(len(group))
    return counts
