"""Sweeps: complete, duplicate-free, resumable after a kill, failures recorded."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from support import SMALL_GRID

import phase12.runners as runners
from phase12.grid import SweepSpec
from phase12.schema import RUN_COLUMNS
from phase12.sweep import run_sweep

SPEC = SMALL_GRID
BASE = SPEC.base
ROOT = Path(__file__).resolve().parents[2]


def check_complete(folder: Path, spec: SweepSpec) -> pd.DataFrame:
    runs = pd.read_csv(folder / "runs.csv")
    assert list(runs.columns) == RUN_COLUMNS
    assert not runs["run_id"].duplicated().any()
    assert set(runs["run_id"]) == {c.run_id for c in spec.configs()}
    for run_id in runs["run_id"]:
        assert len(pd.read_csv(folder / "history" / f"{run_id}.csv.gz")) == spec.base.outer_steps
    return runs


def test_sweep_writes_one_row_per_cell_and_resume_skips(tmp_path):
    counts = run_sweep(SPEC, tmp_path, progress=False)
    assert counts == {"skipped": 0, "OK": 12}
    runs = check_complete(tmp_path, SPEC)
    assert (runs["status"] == "OK").all() and (runs["device_runners"] == 1).all()
    assert run_sweep(SPEC, tmp_path, progress=False) == {"skipped": 12}
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 12


@pytest.mark.parametrize("devices", [None, ("cpu", "cpu")], ids=["one-process", "2-workers"])
def test_resume_after_kill(tmp_path, devices):
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}, {str(Path(__file__).parent)!r}]
        from pathlib import Path
        from test_sweep import SPEC
        from phase12.sweep import run_sweep
        run_sweep(SPEC, Path({str(tmp_path)!r}), progress=False, batch_seeds=False,
                  devices={devices!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    runs_csv = tmp_path / "runs.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if runs_csv.exists() and len(runs_csv.read_text().splitlines()) >= 3:  # header + 2 rows
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    partial = pd.read_csv(runs_csv)  # parses after a kill at any moment
    assert 2 <= len(partial) < 12 and not partial["run_id"].duplicated().any()
    counts = run_sweep(SPEC, tmp_path, progress=False, devices=devices)
    assert counts["skipped"] == len(partial)
    check_complete(tmp_path, SPEC)


def test_two_workers_write_a_complete_csv(tmp_path):
    counts = run_sweep(SPEC, tmp_path, progress=False, devices=("cpu", "cpu"))
    assert counts == {"skipped": 0, "OK": 12}
    runs = check_complete(tmp_path, SPEC)
    assert (runs["device_runners"] == 2).all()  # both on the host's cores: timed together


def test_failing_cell_is_recorded_and_sweep_goes_on(tmp_path, monkeypatch):
    real = runners.run_experiments

    def flaky(configs, **kw):
        if configs[0].inner_steps == 2 and configs[0].mode == "FULL":
            raise RuntimeError("boom\nsecond line")
        return real(configs, **kw)

    monkeypatch.setattr(runners, "run_experiments", flaky)
    counts = run_sweep(SPEC, tmp_path, progress=False)
    assert counts == {"skipped": 0, "OK": 9, "ERROR": 3}  # the failing cell's 3 seeds
    runs = pd.read_csv(tmp_path / "runs.csv")
    errors = runs[runs["status"] == "ERROR"]
    assert set(errors["run_id"]) == {f"reference_FULL_k2_seed{s}_T6_D8" for s in range(3)}
    assert (errors["error"] == "RuntimeError: boom second line").all()


def test_seed_batched_sweep_equals_unbatched(tmp_path):
    run_sweep(SPEC, tmp_path / "batched", progress=False)
    run_sweep(SPEC, tmp_path / "alone", progress=False, batch_seeds=False)
    a = pd.read_csv(tmp_path / "batched" / "runs.csv").set_index("run_id").sort_index()
    b = pd.read_csv(tmp_path / "alone" / "runs.csv").set_index("run_id").sort_index()
    assert set(a["seeds_batched"]) == {3} and set(b["seeds_batched"]) == {1}
    for col in ("final_loss", "final_acc", "attn_grad_norm_q", "rel_diff_probe"):
        assert (a[col] - b[col]).abs().max() < 1e-5, col


def test_unsupported_cells_are_checked_again_on_resume_and_counted_once(tmp_path, monkeypatch):
    """A cell beyond a backend's limit is recorded UNSUPPORTED; once the limit is gone (a
    newer kernel), resuming runs it. Counts cover this grid's cells only."""
    from phase12.backends import Backend

    spec = SweepSpec(base=BASE, modes=("FO_STRICT",), inner_steps=(1, 2), seeds=(0,))
    other = SweepSpec(base=BASE, modes=("FO_STRICT",), inner_steps=(3,), seeds=(0,))
    run_sweep(other, tmp_path, progress=False)  # a row of another grid in the folder
    limit = lambda self, config, device: "k = 2 is too many" if config.inner_steps == 2 else None  # noqa: E731
    monkeypatch.setattr(Backend, "limit", limit)
    assert run_sweep(spec, tmp_path, progress=False) == {"OK": 1, "UNSUPPORTED": 1, "skipped": 0}
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert runs.set_index("inner_steps").loc[2, "status"] == "UNSUPPORTED"
    monkeypatch.undo()
    assert run_sweep(spec, tmp_path, progress=False) == {"OK": 1, "skipped": 1}
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert len(runs) == 3 and set(runs["status"]) == {"OK"} and runs["run_id"].is_unique
