"""Result files that are never half-written.

* `append_row`: one CSV row appended with a single write under an exclusive lock,
  the header written with the first row. Concurrent writers and a kill at any
  moment leave a file that parses (a row is either all there or not at all).
* `write_atomic`: write to a temporary file, fsync, rename over the target.
* `save_run`: a run's files in a results folder, the row last:

      DIR/runs.csv (one row per run), DIR/history/RUN.csv.gz (per step, gzip-compressed
      CSV), DIR/meta/RUN.json

* `FolderLock`: the one writer of a results folder (an OS-level lock held for a whole
  sweep or run; a second writer is refused at once, told who holds it).
* `make_whole`: before a runs.csv is read for a resume or appended to, one of other
  columns (another program's) is refused, and one that ends in a partial line (a full
  disk, a copy cut short) is repaired: the fragment moves to a side file
  (`repair_torn_tail`).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import gzip
import io
import json
import math
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import filelock

from phase12.config import LATER_SETTINGS, ConfigError, changed_settings
from phase12.schema import (
    CONFIG_COLUMNS,
    HISTORY_COLUMNS,
    HISTORY_DIR,
    HISTORY_SUFFIX,
    RISK_CSV,
    RUN_COLUMNS,
    RUNS_CSV,
    SETTING_COLUMNS,
    STATUSES,
    RunResult,
    cell_holds,
)


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
    """Raise ValueError if the CSV at `path` exists with a header other than `columns`
    (or is not a text CSV at all)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:  # FolderLock refuses a folder here
        return
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(
            f"{path} is not a CSV this program wrote ({type(e).__name__}); move it away or "
            "write to a new folder or tag"
        ) from e
    if header != list(columns):
        raise ValueError(
            f"{path} has other columns than this version writes (an older version's "
            "file?); write to a new folder or tag"
        )


def repair_torn_tail(path: str | Path) -> Path | None:
    """If the file at `path` ends in a partial line (no final newline), move that
    fragment to a side file PATH.torn-TIME, cut it off, say so on stderr, and return
    the side file; None if the file is whole (or absent). A last line with every field
    of the header may be a whole row saved without its line end (an editor's save) as
    well as a write cut short in its last field: ValueError, and the file is left as
    it is, for the user to say which."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:  # FolderLock refuses a folder here
        return None
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return None
        cut = data.rfind(b"\n") + 1
        if cut and _fields(data[:cut].split(b"\n", 1)[0]) == _fields(data[cut:]):
            raise ValueError(
                f"the last row of {path} has every field but no line end: if it was saved "
                "so by hand, end the file with a newline; if a write was cut short, delete "
                "that row (its run is then run again)"
            )
        side = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
        side.write_bytes(data[cut:])
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    print(f"warning: {path} ended in a partial line; moved it to {side}", file=sys.stderr)
    return side


def _fields(line: bytes) -> int:
    """How many CSV fields a line of bytes holds (0 if it is not text)."""
    try:
        return len(next(csv.reader([line.decode()]), []))
    except (UnicodeDecodeError, csv.Error):
        return 0


def make_whole(path: str | Path, columns: list[str] = RUN_COLUMNS) -> None:
    """Make the CSV at `path` whole before it is read or appended to: one with other
    columns (another program's) is refused with ValueError, not repaired; a torn last
    line is moved aside (repair_torn_tail)."""
    check_columns(path, columns)
    repair_torn_tail(path)


def append_row(path: str | Path, row: Mapping, columns: list[str] = RUN_COLUMNS) -> None:
    """Append `row` to the CSV at `path` atomically (header first if the file is new;
    the file made whole first, see make_whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            make_whole(path, columns)
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


def write_atomic(path: str | Path, content: str | bytes) -> None:
    """Replace `path` by `content` (str or bytes): readers see the old or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
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
        # mtime=0: no timestamp in the gzip header, so rewriting a history changes no bytes.
        compressed = gzip.compress(history_csv(result.history).encode(), mtime=0)
        write_atomic(out_dir / HISTORY_DIR / f"{run_id}{HISTORY_SUFFIX}", compressed)
    if metadata is not None:
        write_json(out_dir / "meta" / f"{run_id}.json", metadata)
    append_row(out_dir / RUNS_CSV, result.row)


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a runs.csv (none if absent); ValueError naming the path and the fix if
    it is not this version's CSV or ends in a partial line."""
    path = Path(path)
    if not path.exists():
        return []
    check_columns(path)
    if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        raise ValueError(
            f"{path} ends in a partial line (a write cut short); the next sweep or run into "
            "this folder moves it aside, or delete the last line"
        )
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(
            f"{path} is not a CSV this program wrote ({type(e).__name__} past its header); "
            "move it away or write to a new folder or tag"
        ) from e
    for line, row in enumerate(rows, start=2):  # the header is line 1, as the report counts
        # A short row reads None in its missing fields, a long one gets a None key.
        if (
            None in row
            or None in row.values()
            or not row["run_id"]
            or row["status"] not in STATUSES
        ):
            raise ValueError(
                f"{path}, line {line}: not a row this program wrote (fields missing or extra, "
                "no run_id, or an unknown status); delete it to run that cell again"
            )
    ids = [r["run_id"] for r in rows]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(
            f"{path} holds runs more than once ({', '.join(twice[:3])}); keep one row each"
        )
    return rows


def other_settings(rows: list[Mapping], config, folder: str | Path) -> str | None:
    """How the first run of `rows` (read_rows of `folder`'s runs.csv) whose settings
    differ from RunConfig `config`'s differs, e.g. "outer_steps 3 there, 2 now"; None if
    none does. Settings (phase12.config.settings) are read from the run's row
    (SETTING_COLUMNS) and from its meta/RUN.json, which holds the rest (noise, shots,
    classes, ...)."""
    for row in rows:
        changed = changed_settings(run_config(row, folder), config, absent_differs=False)
        if changed:
            return changed
    return None


def run_config(row: Mapping, folder: str | Path) -> dict:
    """The RunConfig fields the run of `row` (a row of `folder`'s runs.csv) recorded: its
    meta JSON's config ({} where it has none), the row's SETTING_COLUMNS, T, D and
    precision over it. ConfigError for a meta JSON that cannot be read or a setting that
    is not a number."""
    meta = Path(folder) / "meta" / f"{row['run_id']}.json"
    config = _meta_config(meta)
    shape = {"dtype": row["dtype"]} if row["dtype"] else {}
    try:
        numbers = (*SETTING_COLUMNS, "seq_len", "dim")
        recorded = config | shape | {c: json.loads(row[c]) for c in numbers if row[c] != ""}
    except ValueError as e:
        raise ConfigError(
            f"{Path(folder) / RUNS_CSV}: run {row['run_id']} has a setting that is not a "
            "number; fix or drop that row"
        ) from e
    for name, column in CONFIG_COLUMNS.items():  # a hand edit of either is refused
        cell = row.get(column, "")
        if name in config and not cell_holds(cell, config[name]):
            raise ConfigError(
                f"{meta} records {name} {json.dumps(config[name])} but the run's row in "
                f"{Path(folder) / RUNS_CSV} {cell}; fix the one that is wrong"
            )
    return recorded


def _meta_config(path: Path) -> dict:
    """The config a run's meta JSON records, settings it predates as LATER_SETTINGS has
    them ({} where the run has none: older versions wrote none for some runs). ConfigError
    for one that cannot be read: the settings of its run are then unknown."""
    if not path.exists():
        return {}
    try:
        return LATER_SETTINGS | dict(json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path} cannot be read ({type(e).__name__}), so its run's settings are unknown; "
            "delete the run's row from runs.csv to redo it, or use another folder"
        ) from e


def rewrite_rows(path: str | Path, rows: list[Mapping], columns: list[str] = RUN_COLUMNS) -> None:
    """Replace the CSV at `path` with `rows` (header first), atomically."""
    header = format_row(dict(zip(columns, columns, strict=True)), columns)
    write_atomic(path, header + "".join(format_row(r, columns) for r in rows))


class FolderBusy(ValueError):
    """Another process is writing the results folder (the message names it)."""


# What a results folder holds, by kind: a file where one of its folders belongs, or a
# folder where one of its files does, would fail the first save, after the work.
RESULT_FOLDERS = (HISTORY_DIR, "meta")
RESULT_FILES = (
    RUNS_CSV,
    f"{RUNS_CSV}.lock",
    "errors.csv",
    "sweep.json",
    RISK_CSV,
    ".writer.lock",
    ".writer.json",
)


def _check_kinds(folder: Path) -> None:
    """ConfigError if `folder` holds a file where RESULT_FOLDERS has a folder, or the
    reverse."""
    for path in (folder / name for name in RESULT_FOLDERS):
        if os.path.lexists(path) and not path.is_dir():
            raise ConfigError(f"{path} is a file where this program keeps a folder; move it away")
    for path in (folder / name for name in RESULT_FILES):
        if os.path.lexists(path) and not path.exists():
            raise ConfigError(f"{path} is a broken symbolic link; remove it")
        if os.path.lexists(path) and not path.is_file():
            raise ConfigError(f"{path} is a folder where this program keeps a file; move it away")


class FolderLock:
    """The one writer of a results folder, for a `with` block: an OS-level lock on
    DIR/.writer.lock, the holder (pid, host, start, command) in DIR/.writer.json.

    Creates the folder (so an unwritable one fails here, before any work, as ConfigError)
    and checks that what it holds is of the right kind (RESULT_FOLDERS, RESULT_FILES;
    ConfigError).
    A second writer raises FolderBusy at once instead of waiting. The OS drops the lock
    when the holder dies, so a killed sweep never leaves the folder locked. With
    `remove_if_unused` (a folder the command made for its results), the folder is removed
    on leaving if it holds nothing but the lock file, while the lock is still held: no
    writer that took the folder after this one can lose it.
    """

    def __init__(self, folder: str | Path, remove_if_unused: bool = False):
        self.folder, self.remove_if_unused = Path(folder), remove_if_unused
        self._lock = filelock.FileLock(self.folder / ".writer.lock")

    def __enter__(self) -> FolderLock:
        info = self.folder / ".writer.json"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _check_kinds(self.folder)
            self._lock.acquire(timeout=0)
        except filelock.Timeout:  # an OSError too: first
            try:
                h = json.loads(info.read_text())
                who = f"pid {h['pid']} on {h['host']} since {h['started']} ({h['command']})"
            except (OSError, ValueError, KeyError):
                who = "another process"
            raise FolderBusy(
                f"{self.folder} is being written by {who}; wait for it to finish, or use "
                "another folder or tag"
            ) from None
        except OSError as e:  # a read-only folder, say
            raise ConfigError(f"cannot write to {e.filename or self.folder}: {e.strerror}") from e
        write_json(
            info,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv),
            },
        )
        return self

    def __exit__(self, *exc) -> None:
        try:
            (self.folder / ".writer.json").unlink(missing_ok=True)
            lock = self.folder / ".writer.lock"
            unused = self.folder.is_dir() and [p.name for p in self.folder.iterdir()] == [lock.name]
            if self.remove_if_unused and unused:
                # A process that opens the path from now on makes a new lock file, which
                # rmdir then leaves alone; one that opened this one a moment before can take
                # it only after the release, in a folder gone, where its first write fails.
                lock.unlink()
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
        finally:
            self._lock.release()
