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
one runner per device runs cells (a thread of this process for the first device, a
worker process for each other one) and this process alone writes the CSV. A run's row is appended
(atomically) only after its history and metadata are on disk, so re-running the same
sweep resumes: cells with a row are skipped, a run that was interrupted has no row and
is redone, and runs.csv always parses. A cell that fails records status ERROR and its
error, and the sweep goes on; the next run of the same sweep retries it.

A device named more than once (`--devices cuda:0,cuda:0`) gets a runner for each: one
runner's host work (set-up, probes) then overlaps another's steps, so a sweep of small
models finishes sooner, but each run's step times include the other runners' turns on
the device. Its row says how many runners the device had (device_runners), and the
report does not read those step times as the backend's speed.

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
import itertools
import json
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from phase12.backends import device_for, get
from phase12.config import (
    LATER_SETTINGS,
    ConfigError,
    Mode,
    RunConfig,
    changed_settings,
    resolve_device,
    settings,
)
from phase12.io import (
    FolderLock,
    append_row,
    check_columns,
    make_whole,
    other_settings,
    read_rows,
    rewrite_rows,
    run_config,
    save_run,
    write_json,
)
from phase12.provenance import run_metadata
from phase12.schema import (
    REGIME_FIELDS,
    RUNS_CSV,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_UNSUPPORTED,
    RunResult,
)
from phase12.train import failed_result, run_experiments, unsupported_result

AXES = {
    "mode": "modes",
    "backend": "backends",
    "inner_steps": "inner_steps",
    "seed": "seeds",
    "ablation": "ablations",
    "seq_len": "seq_lens",
    "dim": "dims",
    "dtype": "dtypes",
}


@dataclass(frozen=True)
class SweepSpec:
    """A grid: every combination of modes x backends x k x seeds x sequence lengths x
    widths x precisions, plus FULL with each ablation other than "none"
    (phase12.config.ABLATIONS) at every other point; the other fields from `base` (the
    shape and precision axes too, when not given). Repeated values of an axis count once."""

    base: RunConfig
    modes: tuple[str, ...] = ("FULL", "FO", "FO_STRICT")
    backends: tuple[str, ...] = ("reference",)
    inner_steps: tuple[int, ...] = (1, 5, 10, 20)
    seeds: tuple[int, ...] = (0, 1)
    ablations: tuple[str, ...] = ("none",)
    seq_lens: tuple[int, ...] | None = None
    dims: tuple[int, ...] | None = None
    dtypes: tuple[str, ...] | None = None

    def __post_init__(self):
        for field_name, axis in AXES.items():
            values = getattr(self, axis)
            values = (getattr(self.base, field_name),) if values is None else values
            object.__setattr__(self, axis, tuple(dict.fromkeys(values)))

    def configs(self) -> list[RunConfig]:
        policies = [(m, "none") for m in self.modes]
        policies += [(Mode.FULL, a) for a in self.ablations if a != "none"]
        points = itertools.product(self.backends, self.dtypes, self.seq_lens, self.dims)
        return [
            self.base.replace(
                backend=b, dtype=p, seq_len=t, dim=d, mode=m, ablation=a, inner_steps=k, seed=s
            )
            for (b, p, t, d), (m, a), k, s in itertools.product(
                points, policies, self.inner_steps, self.seeds
            )
        ]


def unsupported_cells(spec: SweepSpec) -> dict[str, str]:
    """{run_id: "backend: its limit"} for the cells of `spec` beyond their backend's limits.
    Every other cell is checked to run here (ConfigError), and ConfigError too when no
    cell is within the limits: nothing would run. (Seed batches: seed_groups.)"""
    beyond = {}
    for config in spec.configs():
        backend, device = get(config.backend), resolve_device(config.device)
        reason = None if backend.unavailable(device) else backend.limit(config, device)
        if reason is None:
            device_for(config)  # ConfigError where it cannot run here
        else:
            beyond[config.run_id] = f"{config.backend}: {reason}"
    if beyond and len(beyond) == len(spec.configs()):
        raise ConfigError(f"no cell of the grid can run: {next(iter(beyond.values()))}")
    return beyond


def _estimated_cost(group: list[RunConfig]) -> float:
    """Relative cost of a group of runs: steps x inner steps, FULL's double backward x2."""
    c = group[0]
    per_step = (c.inner_steps + 1) * (2 if c.mode == Mode.FULL else 1) * c.meta_batch * c.seq_len
    return len(group) * c.outer_steps * per_step


def _run_group(configs: list[RunConfig]) -> list[tuple[RunResult, dict]]:
    """(result, metadata) per run of a seed group; metadata is taken where the runs ran."""
    try:
        results = run_experiments(configs)
    except Exception as e:  # a failing cell is recorded, the sweep goes on
        results = [failed_result(c, e) for c in configs]
    return _with_metadata(results, configs)


def _with_metadata(results: list[RunResult], configs: list[RunConfig]):
    """(result, metadata) per run; metadata is taken where the runs ran."""
    return [
        (r, run_metadata(c, resolve_device(c.device)))
        for r, c in zip(results, configs, strict=True)
    ]


def _serve(runner: int, device: str, device_runners: int, tasks, results) -> None:
    """Run groups from `tasks` on `device`, which `device_runners` runners share, until a
    None; report ("start"/"done", index, ...)."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(device)  # allocations and graph captures default to it
    while True:
        item = tasks.get()
        if item is None:
            return
        index, configs = item
        results.put(("start", index, runner))
        done = _run_group([c.replace(device=device) for c in configs])
        results.put(("done", index, _shared_by(done, device_runners)))


def _shared_by(outcome: list[tuple[RunResult, dict]], device_runners: int):
    """`outcome` with each row's device_runners set."""
    for result, _ in outcome:
        result.row["device_runners"] = device_runners
    return outcome


def _device_name(device: str) -> str:
    """A checked device as a runner needs it: with its index ('cuda' is the current CUDA
    device; torch.cuda.set_device takes no bare 'cuda'), 'auto' resolved."""
    d = resolve_device(device)
    if d.type == "cuda" and d.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(d)


def _runners_per_device(devices: Sequence[str]) -> list[int]:
    """For each runner of `devices` (names from _device_name), how many runners its
    device has; every CPU runner shares the host's cores."""
    keys = [(d.type, d.index if d.type == "cuda" else None) for d in map(torch.device, devices)]
    return [keys.count(k) for k in keys]


def _exit_with(parent: int) -> None:
    """Exit this process as soon as `parent` is gone (checked every second): a parent
    that exits without ending its workers (Ctrl-C while a group runs, SIGKILL) leaves
    nobody to read their results."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _worker(runner: int, device: str, device_runners: int, parent: int, tasks, results) -> None:
    """A worker process: serves until the queue ends or its parent is gone, mid-group
    too. Ctrl-C reaches it with the parent; the parent says so, the worker just stops."""
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    try:
        _serve(runner, device, device_runners, tasks, results)
    except KeyboardInterrupt:
        pass


RUNNER_THREAD = "sweep runner 0"


def runner_thread_alive() -> bool:
    """Whether the runner thread of a sweep (_run_groups_on_workers) is still running,
    e.g. inside torch after Ctrl-C reached the main thread."""
    return any(t.name == RUNNER_THREAD and t.is_alive() for t in threading.enumerate())


def _run_groups_on_workers(groups: list[list[RunConfig]], devices: Sequence[str]):
    """Yield (group, [(result, metadata)]) as the devices finish groups.

    The first device is served by a thread of this process, which has imported
    everything already and starts at once (a worker process spends seconds importing
    torch and initialising CUDA); every other device gets a worker process. All take
    groups from one queue, so a late starter simply takes fewer. A device named more than
    once gets a runner for each; their runs' rows say how many (device_runners). The
    calling thread only writes files: it makes no CUDA calls that could disturb the serving
    thread's graph captures. Groups of a runner that dies are recorded as failed.
    """
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in enumerate(groups):
        tasks.put(item)
    for _ in devices:
        tasks.put(None)
    sharing = _runners_per_device(devices)
    runners = [
        threading.Thread(
            target=_serve,
            args=(0, devices[0], sharing[0], tasks, results),
            name=RUNNER_THREAD,
            daemon=True,
        )
    ]
    runners += [
        ctx.Process(
            target=_worker, args=(i, d, sharing[i], os.getpid(), tasks, results), daemon=True
        )
        for i, d in enumerate(devices[1:], start=1)
    ]
    for r in runners:
        r.start()
    running: dict[int, int] = {}  # runner -> index of the group it is on
    pending = set(range(len(groups)))  # not yet reported back
    try:
        while pending:
            try:
                kind, index, payload = results.get(timeout=1.0)
            except queue.Empty:
                for i, r in enumerate(runners):
                    if not r.is_alive() and i in running:  # died mid-group
                        index = running.pop(i)
                        code = getattr(r, "exitcode", None)  # threads have none
                        error = RuntimeError(f"sweep worker on {devices[i]} died (exit {code})")
                        pending.discard(index)
                        yield (
                            groups[index],
                            _shared_by(_failed_group(groups[index], error), sharing[i]),
                        )
                if not any(r.is_alive() for r in runners):  # nobody left to take the rest
                    error = RuntimeError(f"every sweep worker ({', '.join(devices)}) has exited")
                    for index in sorted(pending):
                        yield groups[index], _failed_group(groups[index], error)
                    return
                continue
            if kind == "start":
                running[payload] = index
                continue
            running = {i: g for i, g in running.items() if g != index}
            pending.discard(index)
            yield groups[index], payload
    finally:
        for r in runners[1:]:
            r.join(timeout=5)
            if r.is_alive():
                r.terminate()


def _failed_group(configs: list[RunConfig], error: BaseException) -> list[tuple[RunResult, dict]]:
    return _with_metadata([failed_result(c, error) for c in configs], configs)


def _record(folder: Path) -> dict | None:
    """The folder's sweep.json as {"settings": ..., "grid": ...} (None without one), or
    ConfigError if it cannot be read."""
    record = folder / "sweep.json"
    if not record.exists():
        return None
    try:  # sweep.json of earlier versions: {"base": {...}, "modes": [...], ...}
        old = json.loads(record.read_text())
        if "settings" in old:
            before = LATER_SETTINGS | old["settings"]
        else:  # the oldest format: {"base": {...}, ...}
            before = settings(RunConfig(**old["base"])) | {
                n: old["base"][n] for n in REGIME_FIELDS if n in old["base"]
            }  # the shape too, as the records between the two formats hold it
        grid = old.get("grid", {})
        if not isinstance(before, dict) or not isinstance(grid, dict):
            raise TypeError("settings and grid are objects")
        if not all(isinstance(axis, list) for axis in grid.values()):
            raise TypeError("a grid axis is a list")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(
            f"{record} is not a sweep record this program can read ({type(e).__name__}); "
            "run the sweep with --restart to move the folder's results aside"
        ) from e
    return {"settings": before, "grid": grid}


def _changed_settings(record: dict | None, base: RunConfig) -> str | None:
    """How `base`'s settings differ from a sweep record's; None if they do not (or there
    is no record)."""
    if record is None:
        return None
    return changed_settings(record["settings"], base, absent_differs=True)


def _made_with(folder: Path) -> tuple[str, dict, dict, str] | None:
    """What `folder` records of how its results were made: (where, its settings, its
    grid, how to fix a bad value there). The sweep record, or where it has none (runs of
    the single-run command) the config of its first OK run (else its first run) from its
    row and meta JSON; None without either (a runs.csv that is not a file is FolderLock's
    to refuse)."""
    record = _record(folder)
    if record is not None:
        fix = "fix it, or run the sweep with --restart to move the folder's results aside"
        return str(folder / "sweep.json"), record["settings"], record["grid"], fix
    if not (folder / RUNS_CSV).is_file():
        return None
    try:
        rows = read_rows(folder / RUNS_CSV)
    except ValueError as e:  # a damaged runs.csv
        raise ConfigError(str(e)) from e
    if not rows:
        return None
    row = next((r for r in rows if r["status"] == STATUS_OK), rows[0])
    meta = folder / "meta" / f"{row['run_id']}.json"
    where = f"{folder / RUNS_CSV} (run {row['run_id']}, with its meta JSON)"
    if not meta.exists():
        where = f"{folder / RUNS_CSV} (run {row['run_id']})"
    return where, run_config(row, folder), {}, "fix it, or delete that run's row from runs.csv"


def recorded_grid(folder: Path) -> set[str] | None:
    """The run_ids of every point of `folder`'s sweep record's grid (the product of its
    axes); None where no record names a grid. ConfigError for a record this program
    cannot read."""
    record = _record(folder)
    if record is None or not record["grid"]:
        return None
    fields = RunConfig.__dataclass_fields__
    recorded = {n: v for n, v in record["settings"].items() if n in fields}
    grid = record["grid"]  # the settings at the grid's first shape, as the sweep checked them
    first = {n: grid[AXES[n]][0] for n in REGIME_FIELDS if grid.get(AXES[n])}
    try:
        base = RunConfig().replace(**recorded | first)
        spec = SweepSpec(base, **{axis: tuple(v) for axis, v in grid.items()})
        return {c.run_id for c in spec.configs()}
    except (ConfigError, TypeError) as e:
        raise ConfigError(
            f"{folder / 'sweep.json'} records a grid this program cannot read ({e}); run the "
            "sweep with --restart to move the folder's results aside"
        ) from e


def recorded_flags(folder: Path) -> tuple[str | None, dict]:
    """The settings `folder`'s results were made with, by RunConfig field, and their first
    (T, D, precision): the risk command's defaults on a results folder (_made_with).
    Returns (where they come from, flags); (None, {}) where nothing records them.
    ConfigError, naming the file, for one this program cannot read or values it would not
    run (a hand edit)."""
    made_with = _made_with(folder)
    if made_with is None:
        return None, {}
    path, recorded, grid, fix = made_with
    defaults = RunConfig()

    def typed(name: str, value):  # 2.0 for 2, as a program that rewrote a CSV may write it
        integral = isinstance(getattr(defaults, name), int) and type(value) is float
        return int(value) if integral and value.is_integer() else value

    shared = {n: typed(n, v) for n, v in recorded.items() if n in settings(defaults)}
    # The shape: the grid's axes, or the settings of records from before the grid had it.
    shapes = {}
    for name in REGIME_FIELDS:
        if AXES[name] in grid:
            shapes[name] = grid[AXES[name]]
        elif name in recorded:
            shapes[name] = [recorded[name]]
        if name in shapes:
            if not shapes[name]:
                raise ConfigError(f"{path} records no {AXES[name]}; {fix}")
            shapes[name] = [typed(name, v) for v in shapes[name]]
    for name, value in [*shared.items(), *((n, v) for n, vs in shapes.items() for v in vs)]:
        like = getattr(defaults, name)
        if not (type(value) is type(like) or type(like) is float and type(value) is int):
            raise ConfigError(
                f"{path} records {name} {json.dumps(value)}, not of type {type(like).__name__}; "
                f"{fix}"
            )
    shape = {name: values[0] for name, values in shapes.items()}
    try:
        RunConfig(**shared, **shape)
    except ConfigError as e:
        raise ConfigError(f"{path} records settings this program would not run: {e}") from e
    return path, shared | {n: (v,) for n, v in shape.items()}


def check_risk_folder(folder: Path, base: RunConfig) -> None:
    """ConfigError if risk checks at `base` do not belong in `folder`: its sweep ran with
    other settings, or at no point of `base`'s shape and precision."""
    record = _record(folder)
    changed = _changed_settings(record, base)
    if changed:
        raise ConfigError(
            f"{folder} holds a sweep with other settings ({changed}); give the risk command "
            "the sweep's settings, or another tag"
        )
    try:
        rows = read_rows(folder / RUNS_CSV)
        changed = other_settings(rows, base, folder)
    except ValueError as e:  # a damaged runs.csv
        raise ConfigError(str(e)) from e
    if changed:
        raise ConfigError(
            f"{folder} holds runs with other settings ({changed}); give the risk command "
            "their settings, or another tag"
        )
    if record is None and rows:  # single runs: the checks' shape must be one of theirs
        configs = [run_config(r, folder) for r in rows]
        ran = {tuple(c.get(n) for n in REGIME_FIELDS) for c in configs}
        if tuple(getattr(base, n) for n in REGIME_FIELDS) not in ran:
            shapes = "; ".join(f"T {t}, D {d}, {dtype}" for t, d, dtype in sorted(ran, key=str))
            raise ConfigError(
                f"{folder} holds runs at {shapes}, not T {base.seq_len}, D {base.dim}, "
                f"{base.dtype}; give the risk command one of those, or another tag"
            )
    grid = (record or {}).get("grid", {})
    for field_name in ("seq_len", "dim", "dtype"):
        values = grid.get(AXES[field_name])
        if values and getattr(base, field_name) not in values:
            raise ConfigError(
                f"{folder} holds a sweep of {AXES[field_name]} {', '.join(map(str, values))}, "
                f"not {getattr(base, field_name)}; give the risk command the sweep's grid, "
                "or another tag"
            )


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
    old = _record(folder)
    changed = _changed_settings(old, spec.base)
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
    devices = [_device_name(d) for d in devices] if devices else devices
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


def seed_groups(todo: list[RunConfig], batch_seeds: bool) -> dict[RunConfig, list[RunConfig]]:
    """The runs of `todo` as they will train: with `batch_seeds` the seeds of a cell as one
    group (one seed-batched computation), else one run a group; each group checked to fit
    as a whole (ConfigError naming --no-batch-seeds), before any of them trains."""
    groups: dict[RunConfig, list[RunConfig]] = {}
    for c in todo:
        groups.setdefault(c.replace(seed=0) if batch_seeds else c, []).append(c)
    for group in groups.values():
        device_for(group[0], len(group))
    return groups


def _run_todo(groups, folder, progress, devices, skipped: int) -> dict[str, int]:
    """Run `groups` (seed_groups) and write each run's files as its group finishes."""
    if devices and len(devices) > 1:
        # Longest first, so no worker is left with a long cell while the others idle.
        ordered = sorted(groups.values(), key=_estimated_cost, reverse=True)
        finished = _run_groups_on_workers(ordered, devices)
    else:
        if devices:
            groups = {k: [c.replace(device=devices[0]) for c in g] for k, g in groups.items()}
        finished = ((g, _run_group(g)) for g in groups.values())
    counts = {"skipped": skipped}
    with tqdm(
        total=sum(map(len, groups.values())),
        desc=f"sweep {folder.name}",
        unit="run",
        disable=not progress,
    ) as bar:
        for group, results in finished:
            for result, metadata in results:
                save_run(folder, result, metadata)
                counts[result.status] = counts.get(result.status, 0) + 1
            bar.update(len(group))
    return counts
