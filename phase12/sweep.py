"""Resumable sweeps over modes x backends x inner steps x seeds.

    spec = SweepSpec(base=RunConfig(outer_steps=500), modes=("FULL", "FO"), ...)
    run_sweep(spec, Path("runs/my_tag"))

Layout of a sweep folder (the same as a single run's --out):

    runs.csv          one row per finished run (phase12.records.RUN_COLUMNS)
    history/RUN.csv   per-step loss, accuracy, attention meta-gradient norms
    meta/RUN.json     config, versions, device, commit
    sweep.json        the grid

A run's row is appended (atomically) only after its history and metadata are on
disk, so re-running the same sweep resumes: cells with a row are skipped, a run that
was interrupted has no row and is redone, and runs.csv always parses. A cell that
fails records status ERROR and its error, and the sweep goes on.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from phase12.config import RunConfig
from phase12.experiment import failed_result, run_experiments, run_metadata
from phase12.outputs import RUNS_CSV, save_run
from phase12.records import write_json


@dataclass(frozen=True)
class SweepSpec:
    base: RunConfig
    modes: tuple[str, ...] = ("FULL", "FO", "FO_STRICT")
    backends: tuple[str, ...] = ("reference", "triton_fused")
    inner_steps: tuple[int, ...] = (1, 5, 10, 20)
    seeds: tuple[int, ...] = (0, 1)

    def configs(self) -> list[RunConfig]:
        return [
            self.base.replace(backend=b, mode=m, inner_steps=k, seed=s)
            for b, m, k, s in itertools.product(
                self.backends, self.modes, self.inner_steps, self.seeds
            )
        ]


def finished_run_ids(folder: Path) -> set[str]:
    """run_ids that already have a row in folder/runs.csv."""
    path = folder / RUNS_CSV
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {row["run_id"] for row in csv.DictReader(f)}


def run_sweep(
    spec: SweepSpec, folder: Path, *, progress: bool = True, batch_seeds: bool = True
) -> dict[str, int]:
    """Run every unfinished cell of `spec` into `folder`; returns counts by status.

    With `batch_seeds`, the unfinished seeds of one (backend, mode, k) cell train as one
    seed-batched computation (phase12.experiment.run_experiments).
    """
    configs = spec.configs()
    for config in configs:
        config.validate()  # every cell is checked before any runs
    folder.mkdir(parents=True, exist_ok=True)
    write_json(
        folder / "sweep.json",
        {
            "base": asdict(spec.base),
            "modes": spec.modes,
            "backends": spec.backends,
            "inner_steps": spec.inner_steps,
            "seeds": spec.seeds,
        },
    )
    done = finished_run_ids(folder)
    todo = [c for c in configs if c.run_id not in done]
    groups: dict[RunConfig, list[RunConfig]] = {}
    for c in todo:
        groups.setdefault(c.replace(seed=0) if batch_seeds else c, []).append(c)
    counts = {"skipped": len(configs) - len(todo)}
    bar = tqdm(total=len(todo), desc=f"sweep {folder.name}", unit="run", disable=not progress)
    with bar:
        for group in groups.values():
            bar.set_postfix_str(
                group[0].run_id + (f" +{len(group) - 1} seeds" if len(group) > 1 else "")
            )
            try:
                results = run_experiments(group)
            except Exception as e:  # a failing cell is recorded, the sweep goes on
                results = [failed_result(c, e) for c in group]
            for config, result in zip(group, results, strict=True):
                save_run(folder, result, run_metadata(config))
                counts[result.status] = counts.get(result.status, 0) + 1
            bar.update(len(group))
    return counts
