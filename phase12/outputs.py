"""Where a run's results go.

DIR/runs.csv (one row per run), DIR/history/RUN.csv (per step), DIR/meta/RUN.json.
"""

from __future__ import annotations

from pathlib import Path

from phase12.experiment import RunResult
from phase12.records import append_row, history_csv, write_atomic, write_json

RUNS_CSV = "runs.csv"


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
