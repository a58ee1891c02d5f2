"""Result files that are never half-written.

* `append_row`: one CSV row appended with a single write under an exclusive lock,
  the header written with the first row. Concurrent writers and a kill at any
  moment leave a file that parses (a row is either all there or not at all).
* `write_atomic`: write to a temporary file, fsync, rename over the target.

The run row keeps the seed project's column names (RUN_COLUMNS, in its order) and
adds a few of its own after them.
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

from phase12.step import METRICS

SEED_COLUMNS = [
    "backend",
    "mode",
    "inner_steps",
    "seed",
    "meta_batch",
    "outer_lr",
    "outer_steps",
    "inner_lr",
    "seq_len",
    "num_signal_positions",
    "dtype",
    "compute_dtype",
    "autocast",
    "final_loss",
    "final_acc",
    "attn_grad_present",
    "attn_grad_norm_q",
    "attn_grad_norm_k",
    "attn_grad_norm_v",
    "sdpa_input_gradgrad_ok",
    "rel_diff_probe",
    "wall_time_total_s",
    "mean_outer_step_time_s",
    "peak_cuda_mem_bytes",
    "status",
    "error",
    "convergence_delta",
]
RUN_COLUMNS = SEED_COLUMNS + [
    "run_id",
    "attn_grad_norm",
    "nonfinite_step",
    "cuda_graph",
    "seeds_batched",
    "world_size",
    "device",
    "device_name",
    "torch_version",
]
HISTORY_COLUMNS = ["step", *METRICS]


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
