"""Result files that are never half-written.

* `append_row`: one CSV row appended with a single write under an exclusive lock,
  the header written with the first row. Concurrent writers and a kill at any
  moment leave a file that parses (a row is either all there or not at all).
* `write_atomic`: write to a temporary file, fsync, rename over the target.
* `save_run`: a run's files in a results folder, the row last:

      DIR/runs.csv (one row per run), DIR/history/RUN.csv (per step), DIR/meta/RUN.json
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from phase12.schema import HISTORY_COLUMNS, RUN_COLUMNS, RUNS_CSV, RunResult


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def format_row(row: Mapping, columns: list[str] = RUN_COLUMNS) -> str:
    """One CSV line (with newline) of `row` in `columns` order; missing keys are empty."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def check_columns(path: str | Path, columns: list[str] = RUN_COLUMNS) -> None:
    """Raise ValueError if the CSV at `path` exists with a header other than `columns`."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if header != list(columns):
        raise ValueError(
            f"{path} has other columns than this version writes (an older version's "
            "file?); write to a new folder or tag"
        )


def append_row(path: str | Path, row: Mapping, columns: list[str] = RUN_COLUMNS) -> None:
    """Append `row` to the CSV at `path` atomically (header first if the file is new)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            check_columns(path, columns)
            new = not path.exists() or path.stat().st_size == 0
            text = format_row(dict(zip(columns, columns, strict=True)), columns) if new else ""
            text += format_row(row, columns)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def history_csv(history: Mapping[str, list]) -> str:
    """The per-step history (columns HISTORY_COLUMNS) as CSV text."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for i in range(len(history["step"])):
        writer.writerow([_cell(history[c][i]) for c in HISTORY_COLUMNS])
    return buf.getvalue()


def save_run(out_dir: str | Path, result: RunResult, metadata: dict | None = None) -> None:
    """History and metadata first (atomic files), the run row last: a row in runs.csv
    means everything of that run is on disk."""
    out_dir = Path(out_dir)
    run_id = result.row["run_id"]
    if result.history:
        write_atomic(out_dir / "history" / f"{run_id}.csv", history_csv(result.history))
    if metadata is not None:
        write_json(out_dir / "meta" / f"{run_id}.json", metadata)
    append_row(out_dir / RUNS_CSV, result.row)


def finished_run_ids(folder: Path) -> set[str]:
    """run_ids that already have a row in folder/runs.csv."""
    path = folder / RUNS_CSV
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {row["run_id"] for row in csv.DictReader(f)}
