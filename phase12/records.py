"""What a results folder records of how its results were made.

A sweep's folder has sweep.json: the settings (every RunConfig field but the grid axes
and the device) and the grid values run into it so far. A folder of single runs has its
rows and meta JSON. The sweep reads them to refuse a resume with other settings; the
risk command reads them for its defaults, and to refuse checks that do not belong with
the results.
"""

from __future__ import annotations

import json
from pathlib import Path

from phase12.config import LATER_SETTINGS, ConfigError, RunConfig, changed_settings, settings
from phase12.grid import AXES, SweepSpec
from phase12.io import other_settings, read_rows, run_config
from phase12.schema import REGIME_FIELDS, RUNS_CSV, STATUS_OK


def sweep_record(folder: Path) -> dict | None:
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


def changed_from_record(record: dict | None, base: RunConfig) -> str | None:
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
    record = sweep_record(folder)
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
    record = sweep_record(folder)
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
    record = sweep_record(folder)
    changed = changed_from_record(record, base)
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
