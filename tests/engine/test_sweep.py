"""Sweeps: complete, duplicate-free, resumable after a kill, failures recorded."""

import json
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from support import TINY

import phase12.sweep as sweep_module
from phase12.config import ConfigError
from phase12.schema import RUN_COLUMNS
from phase12.sweep import SweepSpec, run_sweep

BASE = TINY.replace(outer_steps=4)
SPEC = SweepSpec(
    base=BASE,
    modes=("FULL", "FO_STRICT"),
    backends=("reference",),
    inner_steps=(1, 2),
    seeds=(0, 1, 2),
)
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


def test_runners_per_device_counts_every_name_of_a_device(monkeypatch):
    from phase12.sweep import _device_name, _runners_per_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    names = [_device_name(d) for d in ["cpu", "cuda:0", "cuda", "cuda:1", "cpu:0", "cuda:2"]]
    assert names[2] == "cuda:1"  # torch.cuda.set_device needs the index
    assert _runners_per_device(names) == [2, 1, 2, 2, 2, 1]


def test_failing_cell_is_recorded_and_sweep_goes_on(tmp_path, monkeypatch):
    real = sweep_module.run_experiments

    def flaky(configs, **kw):
        if configs[0].inner_steps == 2 and configs[0].mode == "FULL":
            raise RuntimeError("boom\nsecond line")
        return real(configs, **kw)

    monkeypatch.setattr(sweep_module, "run_experiments", flaky)
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


def test_workers_take_the_longest_cells_first(tmp_path, monkeypatch):
    """With several devices, cells reach the workers in decreasing estimated cost."""
    from phase12.sweep import _estimated_cost

    base = TINY.replace(outer_steps=10)
    cost = lambda **kw: _estimated_cost([base.replace(**kw)])  # noqa: E731
    assert cost(mode="FULL", inner_steps=20) > cost(mode="FO", inner_steps=20)
    assert cost(mode="FO", inner_steps=20) > cost(mode="FULL", inner_steps=1)
    assert _estimated_cost([base, base.replace(seed=1)]) == 2 * _estimated_cost([base])

    handed = []

    def in_process(groups, devices):  # the workers, without processes: record the order
        for group in groups:
            handed.append(group)
            yield group, sweep_module._run_group(group)

    monkeypatch.setattr(sweep_module, "_run_groups_on_workers", in_process)
    run_sweep(SPEC, tmp_path, progress=False, devices=["cpu", "cpu"])
    costs = [_estimated_cost(g) for g in handed]
    assert len(handed) == 4 and costs == sorted(costs, reverse=True) and costs[0] > costs[-1]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_groups_are_recorded_as_failed_when_every_runner_is_gone(monkeypatch):
    def lost_device(*args, **kwargs):
        raise RuntimeError("device lost")  # the serving thread dies before taking a group

    monkeypatch.setattr(sweep_module, "_serve", lost_device)
    groups = [[c] for c in SPEC.configs()[:3]]
    finished = []
    collector = threading.Thread(
        target=lambda: finished.extend(sweep_module._run_groups_on_workers(groups, ["cpu"])),
        daemon=True,
    )
    collector.start()
    collector.join(timeout=60)  # the parent used to wait forever here
    assert not collector.is_alive(), "the sweep waits for runners that are gone"
    assert [group for group, _ in finished] == groups
    for _, results in finished:
        for result, metadata in results:
            assert result.status == "ERROR" and "has exited" in result.row["error"]
            assert metadata["device"] == "cpu"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_group_whose_runner_dies_is_failed_with_the_runners_of_its_device(monkeypatch):
    def dies_mid_group(runner, device, device_runners, tasks, results):
        index, _ = tasks.get()
        results.put(("start", index, runner))
        raise RuntimeError("device lost")  # the serving thread; the worker process serves on

    monkeypatch.setattr(sweep_module, "_serve", dies_mid_group)
    groups = [[c] for c in SPEC.configs()[:3]]
    finished = {
        group[0].run_id: results
        for group, results in sweep_module._run_groups_on_workers(groups, ["cpu", "cpu"])
    }
    (died,) = [r for results in finished.values() for r, _ in results if r.status == "ERROR"]
    assert "died" in died.row["error"] and died.row["device_runners"] == 2
    assert len(finished) == 3


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


RESULTS = Path(__file__).parents[2] / "results"


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in RESULTS.glob("*/sweep.json")))
def test_the_risk_defaults_of_every_committed_sweep_record(folder):
    # Three formats: {"base": ...}, settings holding the shape, a grid holding it.
    source, flags = sweep_module.recorded_flags(RESULTS / folder)
    assert source == str(RESULTS / folder / "sweep.json")
    runs = pd.read_csv(RESULTS / folder / "runs.csv")
    assert flags["outer_steps"] == runs["outer_steps"].iloc[0]
    shape = (flags["seq_len"], flags["dim"], flags["dtype"])  # one of the runs' shapes
    assert all(len(axis) == 1 for axis in shape)
    dims = runs["dim"] if "dim" in runs else [64] * len(runs)  # older rows: D 64, unwritten
    ran = set(zip(runs.seq_len, dims, runs.dtype, strict=True))
    assert tuple(axis[0] for axis in shape) in ran


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"settings": {"outer_steps": [2]}}, "records outer_steps [2], not of type int"),
        ({"settings": {"outer_steps": None}}, "records outer_steps null, not of type int"),
        ({"settings": {"outer_lr": True}}, "records outer_lr true, not of type float"),
        ({"settings": {"cuda_graph": "bogus"}}, "records settings this program would not run"),
        ({"grid": {"seq_lens": []}}, "records no seq_lens"),
        ({"grid": {"seq_lens": [8, "16"]}}, 'records seq_len "16", not of type int'),
        ({"grid": {"dims": [8.5]}}, "records dim 8.5, not of type int"),
    ],
)
def test_a_hand_edited_sweep_record_is_named_not_used(tmp_path, edit, message):
    record = {"settings": {"outer_steps": 2, "outer_lr": 0.01}, "grid": {"seq_lens": [8]}}
    for part, values in edit.items():
        record[part] |= values
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'sweep.json'} {message}")):
        sweep_module.recorded_flags(tmp_path)


def test_only_settings_become_risk_defaults(tmp_path):
    record = {"settings": {"outer_steps": 2, "no_gradgradcheck": True, "root": "/"}, "grid": {}}
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    flags = {"outer_steps": 2, "probe_every": 0}  # a setting it predates, as runs then had it
    assert sweep_module.recorded_flags(tmp_path) == (str(tmp_path / "sweep.json"), flags)
    (tmp_path / "sweep.json").unlink()
    assert sweep_module.recorded_flags(tmp_path) == (None, {})
    (tmp_path / "sweep.json").mkdir()
    with pytest.raises(ConfigError, match="not a sweep record this program can read"):
        sweep_module.recorded_flags(tmp_path)
