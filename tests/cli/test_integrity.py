"""Results that cannot be wrong in silence: a sweep's settings, one writer per folder,
ERROR cells retried, torn CSVs repaired, reports for any grid, folders checked before
work, Ctrl-C, and the defaults of a CPU machine."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from support import exit_code

import phase12.runners as runners
import phase12.sweep as sweep_module
from phase12.config import ConfigError, RunConfig
from phase12.grid import SweepSpec, seed_groups
from phase12.io import FolderLock
from phase12.schema import RUN_COLUMNS

SIZES = ["--meta-batch", "2", "--seq-len", "8", "--device", "cpu", "--no-progress"]
GRID = ["--modes", "FULL,FO", "--k", "1", "--seeds", "0", "--outer-steps", "3", *SIZES]


def sweep(root, *extra: str, command: str = "sweep") -> int:
    return exit_code(command, "--root", str(root), "--tag", "t", *GRID, *extra)


def risk(root, *extra: str) -> int:
    """The risk command on ROOT/t at GRID's settings (it takes no grid but the shape)."""
    sizes = [s for s in SIZES if s != "--no-progress"]
    return exit_code(
        "risk", "--root", str(root), "--tag", "t", "--outer-steps", "3", *sizes, *extra
    )


def rows(root, tag="t") -> pd.DataFrame:
    return pd.read_csv(root / tag / "runs.csv")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_resuming_with_other_settings_is_refused_and_restart_moves_the_old_aside(tmp_path, capsys):
    assert sweep(tmp_path, "--outer-steps", "2") == 0
    capsys.readouterr()
    assert sweep(tmp_path, "--outer-steps", "3") == 2
    line = one_error_line(capsys)
    assert "outer_steps 2 there, 3 now" in line and "new tag" in line and "restart" in line
    assert set(rows(tmp_path)["outer_steps"]) == {2}  # untouched
    assert sweep(tmp_path, "--outer-steps", "3", "--restart") == 0
    assert set(rows(tmp_path)["outer_steps"]) == {3} and len(rows(tmp_path)) == 2
    (aside,) = tmp_path.glob("t.replaced-*")
    assert set(pd.read_csv(aside / "runs.csv")["outer_steps"]) == {2}  # nothing deleted
    # Only the grid may change on a resume: more seeds are added, nothing is redone.
    assert sweep(tmp_path, "--outer-steps", "3", "--seeds", "0,1") == 0
    assert len(rows(tmp_path)) == 4 and not rows(tmp_path)["run_id"].duplicated().any()
    grid = json.loads((tmp_path / "t" / "sweep.json").read_text())["grid"]
    assert grid["seeds"] == [0, 1]


@pytest.mark.parametrize(
    "edit, message",
    [
        # the sweep compares it with its flags; risk, which defaults to it, checks its type
        (
            lambda r: r["settings"].update(outer_steps="2"),
            ('outer_steps "2" there, 2 now', 'records outer_steps "2", not of type int'),
        ),
        (lambda r: r.update(grid=[]), "is not a sweep record this program can read"),
        (lambda r: r["grid"].update(seq_lens=8), "is not a sweep record this program can read"),
        (lambda r: r.update(settings=[1]), "is not a sweep record this program can read"),
    ],
)
def test_a_sweep_record_edited_by_hand_is_named(tmp_path, capsys, edit, message):
    assert sweep(tmp_path, "--outer-steps", "2") == 0
    record = json.loads((tmp_path / "t" / "sweep.json").read_text())
    edit(record)
    (tmp_path / "t" / "sweep.json").write_text(json.dumps(record))
    capsys.readouterr()
    messages = message if isinstance(message, tuple) else (message, message)
    assert sweep(tmp_path, "--outer-steps", "2") == 2
    assert messages[0] in one_error_line(capsys)
    assert (
        risk(tmp_path, "--outer-steps", "2", "--no-gradgradcheck", "--backends", "reference") == 2
    )
    assert messages[1] in one_error_line(capsys)


def test_a_second_writer_is_refused_at_once_and_told_who_holds_the_folder(tmp_path, capsys):
    with FolderLock(tmp_path / "t"):
        assert sweep(tmp_path) == 2
        line = one_error_line(capsys)
        assert f"pid {os.getpid()}" in line and "being written" in line
        assert (
            exit_code("--k", "1", "--outer-steps", "2", *SIZES, "--out", str(tmp_path / "t")) == 2
        )
        assert "being written" in one_error_line(capsys)
    assert not (tmp_path / "t" / "runs.csv").exists()
    assert sweep(tmp_path) == 0  # released
    with FolderLock(tmp_path / "t"):  # nor is a report made of a sweep half done
        assert exit_code("report", "--root", str(tmp_path), "--tag", "t") == 2
        assert "being written" in one_error_line(capsys)
    assert not (tmp_path / "t" / "report.md").exists()


def test_repeated_grid_values_count_once_in_a_spec():
    from phase12.config import RunConfig

    spec = SweepSpec(RunConfig(), modes=("FULL",), inner_steps=(1, 1), seeds=(0, 0))
    assert [c.run_id for c in spec.configs()] == ["reference_FULL_k1_seed0"]


def sweep_with_full_failing(root, monkeypatch) -> None:
    """The sweep of GRID into ROOT/t with its FULL cell raising (an ERROR row)."""
    real = runners.run_experiments

    def failing(configs, **kw):
        if configs[0].mode == "FULL":
            raise RuntimeError("boom")
        return real(configs, **kw)

    monkeypatch.setattr(runners, "run_experiments", failing)
    assert sweep(root) == 1  # a sweep with a run in ERROR fails
    monkeypatch.setattr(runners, "run_experiments", real)


def test_error_cells_are_run_again_and_their_rows_kept_aside(tmp_path, monkeypatch, capsys):
    sweep_with_full_failing(tmp_path, monkeypatch)
    assert sorted(rows(tmp_path)["status"]) == ["ERROR", "OK"]
    assert "error: 1 run(s) ended in ERROR" in capsys.readouterr().err
    assert sweep(tmp_path) == 0
    assert "1 that ended in ERROR run again" in capsys.readouterr().out
    assert sorted(rows(tmp_path)["status"]) == ["OK", "OK"]
    assert not rows(tmp_path)["run_id"].duplicated().any()
    errors = pd.read_csv(tmp_path / "t" / "errors.csv")
    assert list(errors["run_id"]) == ["reference_FULL_k1_seed0_T8"]


def test_a_torn_last_line_is_moved_aside_and_the_csv_parses(tmp_path, capsys):
    assert sweep(tmp_path, "--modes", "FULL") == 0
    runs_csv = tmp_path / "t" / "runs.csv"
    whole = runs_csv.read_bytes()
    runs_csv.write_bytes(whole + b"reference,FO,1,0,2,0.001,3,0.4,8")  # a cut-short append
    assert exit_code("report", "--root", str(tmp_path), "--tag", "t") == 2
    line = one_error_line(capsys)
    assert str(runs_csv) in line and "partial line" in line
    assert sweep(tmp_path) == 0
    assert "partial line" in capsys.readouterr().err
    assert list(rows(tmp_path).columns) == RUN_COLUMNS and len(rows(tmp_path)) == 2
    (side,) = (tmp_path / "t").glob("runs.csv.torn-*")
    assert side.read_bytes() == b"reference,FO,1,0,2,0.001,3,0.4,8"


def test_a_runs_csv_of_junk_is_refused_with_its_path(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "runs.csv").write_bytes(bytes(range(256)) * 4)
    assert sweep(tmp_path) == 2
    assert str(tmp_path / "t" / "runs.csv") in one_error_line(capsys)
    assert exit_code("report", "--root", str(tmp_path), "--tag", "t") == 2
    assert str(tmp_path / "t" / "runs.csv") in one_error_line(capsys)


@pytest.mark.parametrize(
    "modes,seeds,expected",
    [
        ("FULL,FO_STRICT", "0,1", "no FULL − FO comparison, since it has no FO run"),
        ("FULL,FO", "0", "from one seed; one seed has no seed-to-seed spread"),
    ],
)
def test_the_report_works_on_any_grid(tmp_path, modes, seeds, expected):
    assert sweep(tmp_path, "--modes", modes, "--seeds", seeds, command="pipeline") == 0
    report = (tmp_path / "t" / "report.md").read_text()
    assert expected in report
    assert "nan" not in report.lower().replace("nanmean", "") and "wins by 0.0000" not in report


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: b[:40], "cannot be read (EOFError"),  # a gzip cut short
        (lambda b: b"not gzip", "cannot be read (BadGzipFile"),
        (lambda b: b[:12] + bytes(x ^ 0xFF for x in b[12:20]) + b[20:], "cannot be read (error"),
        (lambda b: __import__("gzip").compress(b"step,loss\n0,1.0\n"), "holds 1 of 3 steps"),
    ],
)
def test_a_damaged_history_stops_the_report_and_pipeline_in_one_line(
    tmp_path, capsys, damage, message
):
    assert sweep(tmp_path, "--modes", "FULL") == 0
    (history,) = (tmp_path / "t" / "history").iterdir()
    history.write_bytes(damage(history.read_bytes()))
    capsys.readouterr()
    assert exit_code("report", "--root", str(tmp_path), "--tag", "t") == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "t" / "report.md").exists()
    with open(tmp_path / "t" / "runs.csv", "a") as f:
        f.write("reference,FO,1")  # and a torn last line, which the sweep moves aside
    assert sweep(tmp_path, "--modes", "FULL,FO", "--no-gradgradcheck", command="pipeline") == 2
    assert message in capsys.readouterr().err.splitlines()[-1]  # after the torn line's note
    assert len(rows(tmp_path)) == 1 and not (tmp_path / "t" / "risk_checks.csv").exists()


def test_a_setting_edited_into_text_stops_a_resumed_sweep_in_one_line(tmp_path, capsys):
    assert sweep(tmp_path) == 0
    runs = rows(tmp_path).astype({"outer_lr": object})
    runs.loc[0, "outer_lr"] = "abc"
    runs.to_csv(tmp_path / "t" / "runs.csv", index=False)
    capsys.readouterr()
    assert sweep(tmp_path) == 2
    assert "has a setting that is not a number" in one_error_line(capsys)


def test_a_refused_pipeline_leaves_its_folder_as_it_was(tmp_path, capsys, monkeypatch):
    def failing(configs, **kw):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(runners, "run_experiments", failing)
        assert sweep(tmp_path, "--modes", "FO") == 1  # an ERROR row the next sweep would move
    assert sweep(tmp_path, "--modes", "FULL") == 0
    history = next((tmp_path / "t" / "history").iterdir())
    history.write_bytes(b"not gzip")
    before = {p: p.read_bytes() for p in (tmp_path / "t").iterdir() if p.is_file()}
    assert sweep(tmp_path, "--seeds", "0,1", "--no-gradgradcheck", command="pipeline") == 2
    assert "cannot be read (BadGzipFile" in capsys.readouterr().err.splitlines()[-1]
    after = {p: p.read_bytes() for p in (tmp_path / "t").iterdir() if p.is_file()}
    assert after == before  # sweep.json's grid, runs.csv's ERROR row, no errors.csv


def test_a_pipeline_holds_its_folder_from_its_sweep_to_its_report(tmp_path, monkeypatch):
    import phase12.cli.sweep as commands
    from phase12.io import FolderBusy

    risk, busy = commands._risk, []

    def risk_while_another_writer_tries(args, spec):
        with pytest.raises(FolderBusy):
            FolderLock(tmp_path / "t").__enter__()
        busy.append(True)
        return risk(args, spec)

    monkeypatch.setattr(commands, "_risk", risk_while_another_writer_tries)
    assert sweep(tmp_path, "--modes", "FULL", "--no-gradgradcheck", command="pipeline") == 0
    assert busy == [True] and (tmp_path / "t" / "report.md").exists()


def test_a_report_into_a_folder_it_cannot_write_is_one_line(tmp_path, capsys, monkeypatch):
    import filelock

    assert sweep(tmp_path, "--modes", "FULL") == 0
    capsys.readouterr()

    def read_only(self, *args, **kwargs):  # root passes chmod: the OS's answer, by hand
        raise OSError(30, "Read-only file system", str(tmp_path / "t" / ".writer.lock"))

    monkeypatch.setattr(filelock.FileLock, "acquire", read_only)
    assert exit_code("report", "--root", str(tmp_path), "--tag", "t") == 2
    line = one_error_line(capsys)
    assert "cannot write to" in line and "Read-only file system" in line
    assert not (tmp_path / "t" / "report.md").exists()


def test_a_pipeline_refuses_only_what_its_report_would(tmp_path, capsys):
    assert sweep(tmp_path, "--modes", "FULL") == 0
    (history,) = (tmp_path / "t" / "history").iterdir()
    history.write_bytes(b"not gzip")
    # A map over two T reads no histories: its pipeline runs and reports.
    assert sweep(tmp_path, "--seq-lens", "8,6", "--no-gradgradcheck", command="pipeline") == 0
    assert (tmp_path / "t" / "report.md").read_text().startswith("# Phase 12 robustness map")
    # A runs.csv of a header alone (a sweep whose every run failed, then stopped).
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "runs.csv").write_text(",".join(RUN_COLUMNS) + "\n")
    args = ["--tag", "u", "--no-gradgradcheck"]
    assert exit_code("pipeline", "--root", str(tmp_path), *GRID, *args) == 0
    assert len(rows(tmp_path, "u")) == 2


def test_the_report_of_a_grid_where_every_run_failed(tmp_path, monkeypatch):
    def failing(configs, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(runners, "run_experiments", failing)
    assert sweep(tmp_path) == 1  # every run in ERROR
    assert exit_code("report", "--root", str(tmp_path), "--tag", "t") == 0
    report = (tmp_path / "t" / "report.md").read_text()
    assert "No run finished OK" in report and "ERROR 2" in report


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tag", "../x"], "--tag '../x' is not a plain name"),
        (["--tag", "/abs"], "--tag '/abs' is not a plain name"),
        (["--tag", ""], "--tag '' is not a plain name"),
        (["--tag", "ok", "--root", "FILE"], "exists and is not a folder"),
        (["--tag", "ok", "--root", "FILE/below"], "cannot write to"),
    ],
)
def test_sweep_folders_are_checked_before_any_work(tmp_path, capsys, flags, message):
    (tmp_path / "FILE").write_text("a file")
    flags = [str(tmp_path / f) if f.startswith("FILE") else f for f in flags]
    args = ["sweep", "--root", str(tmp_path / "root"), *GRID, *flags]
    assert exit_code(*args) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir())


def test_another_programs_csv_in_out_is_refused_untouched(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    foreign = b"name,age,city\nbob,3"  # and no line end: not ours to repair
    (tmp_path / "o" / "runs.csv").write_bytes(foreign)
    assert exit_code("--k", "1", "--outer-steps", "2", *SIZES, "--out", str(tmp_path / "o")) == 2
    assert "has other columns" in one_error_line(capsys)
    assert (tmp_path / "o" / "runs.csv").read_bytes() == foreign
    assert not list((tmp_path / "o").glob("runs.csv.torn-*"))


def test_a_single_runs_folder_must_be_one_the_report_can_name(tmp_path, capsys):
    out = tmp_path / "x y"
    assert exit_code("--k", "1", "--outer-steps", "2", *SIZES, "--out", str(out)) == 2
    assert "its last part 'x y' is not a plain name" in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "command,flags,message",
    [
        ("sweep", ["--seeds", ",,1"], "',,1' has an empty item"),
        ("sweep", ["--k", "1,"], "'1,' has an empty item"),
        ("sweep", ["--seeds", "0,1,0"], "0 given twice"),
        ("sweep", ["--modes", "FULL,FO,FULL"], "FULL given twice"),
        ("bench", ["step", "--k", "5,5"], "5 given twice"),
    ],
)
def test_comma_lists_refuse_empty_and_repeated_items(
    tmp_path, monkeypatch, capsys, command, flags, message
):
    monkeypatch.chdir(tmp_path)
    assert exit_code(command, *(GRID if command == "sweep" else ()), *flags) == 2
    assert message in one_error_line(capsys)
    assert not any(tmp_path.iterdir())


def test_an_unwritable_out_is_refused_before_training(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    import phase12.cli.single as single

    monkeypatch.setattr(single, "run_experiment", lambda *a, **k: pytest.fail("trained"))
    assert exit_code("--k", "1", *SIZES, "--out", str(tmp_path / "file" / "out")) == 2
    assert "cannot write to" in one_error_line(capsys)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--seed", "99999999999999999999"], "--seed must be in 0..2**32-1"),
        (["--seed", str(2**32)], "--seed must be in 0..2**32-1"),  # would be seed 0's run
        (["--meta-batch", "1000000"], "GiB of task tensors"),
        (["--dim", "1000000"], "copies of the parameters"),
        (["--num-classes", "10000000000"], "copies of the parameters"),
        (["--k", "100000000", "--mode", "FULL"], "copies of the parameters"),
        (["--outer-steps", "100000000000"], "GiB of per-step history"),
    ],
)
def test_sizes_that_cannot_run_are_refused_in_one_line(tmp_path, capsys, flags, message):
    assert exit_code(*SIZES, *flags, "--out", str(tmp_path / "o")) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_seed_batch_is_checked_for_memory_as_a_whole(tmp_path, capsys, monkeypatch):
    """Its history is (seeds, steps, metrics): each seed's fits, the batch's does not."""
    monkeypatch.setattr(runners, "run_experiments", lambda *a, **k: pytest.fail("trained"))
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    steps = str(host // (5 * 8 * 2) * 2 // 3)
    grid = ["--modes", "FO", "--k", "1", "--seeds", "0,1", "--outer-steps", steps, *SIZES]
    root = tmp_path / "new" / "root"
    assert exit_code("sweep", "--root", str(root), "--tag", "t", *grid) == 2
    line = one_error_line(capsys)
    assert "per-step history for 2 seed(s)" in line and "(or --no-batch-seeds)" in line
    assert not (tmp_path / "new").exists()  # refused before any folder was made
    (tmp_path / "t").mkdir()  # a folder of the user's: kept as it was
    assert exit_code("sweep", "--root", str(tmp_path), "--tag", "t", *grid) == 2
    assert list((tmp_path / "t").iterdir()) == []
    # The groups that will train count, not the grid: a resumed sweep left with one seed
    # of a cell, or one without batching, runs each seed alone.
    seed = RunConfig(device="cpu", mode="FO", outer_steps=int(steps))
    todo = [seed.replace(seed=s) for s in (0, 1)]
    assert len(seed_groups(todo[1:], batch_seeds=True)) == 1
    assert len(seed_groups(todo, batch_seeds=False)) == 2
    with pytest.raises(ConfigError, match="for 2 seed"):
        seed_groups(todo, batch_seeds=True)


def test_the_runs_a_resume_keeps_are_read_as_it_would_find_them(tmp_path):
    """ERROR and UNSUPPORTED rows run again and a torn last line is moved aside: the
    seed batches left to run are checked with those seeds in them."""
    header = ",".join(RUN_COLUMNS)
    row = lambda run_id, status: ",".join(  # noqa: E731
        {"run_id": run_id, "status": status}.get(c, "") for c in RUN_COLUMNS
    )
    lines = [header, row("ok", "OK"), row("nan", "NONFINITE"), row("err", "ERROR")]
    lines += [row("unsup", "UNSUPPORTED"), row("torn", "OK")[:30]]
    (tmp_path / "runs.csv").write_text("\n".join(lines))
    assert sweep_module._kept_runs(tmp_path) == {"ok", "nan"}
    assert sweep_module._kept_runs(tmp_path / "absent") == set()


def test_a_folder_made_for_results_goes_if_none_came_and_stays_otherwise(tmp_path):
    with FolderLock(tmp_path / "made", remove_if_unused=True):
        pass
    assert not (tmp_path / "made").exists()
    with FolderLock(tmp_path / "used", remove_if_unused=True):
        (tmp_path / "used" / "runs.csv").write_text("")
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == [".writer.lock", "runs.csv"]
    with FolderLock(tmp_path / "given"):  # the user's folder (or one that existed)
        pass
    assert [p.name for p in (tmp_path / "given").iterdir()] == [".writer.lock"]
    gone = FolderLock(tmp_path / "gone", remove_if_unused=True)
    with pytest.raises(KeyboardInterrupt), gone:  # Ctrl-C's, not a missing folder's error
        shutil.rmtree(tmp_path / "gone")
        raise KeyboardInterrupt
    assert not gone._lock.is_locked


def test_a_single_run_saves_to_a_predictable_folder_unless_told_not_to(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert exit_code("--k", "1", "--outer-steps", "2", *SIZES) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.endswith("_reference_FULL_k1_seed0_T8")
    assert f"saved to {folder.relative_to(tmp_path)}" in capsys.readouterr().out
    assert len(pd.read_csv(folder / "runs.csv")) == 1
    assert (folder / "history" / "reference_FULL_k1_seed0_T8.csv.gz").exists()
    assert not list(folder.glob(".writer*.json"))  # the lock's record is gone
    assert exit_code("--k", "1", "--outer-steps", "2", *SIZES, "--no-save") == 0
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_ctrl_c_stops_a_run_with_one_line(tmp_path, monkeypatch, capsys):
    import phase12.cli.single as single

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(single, "run_experiment", interrupted)
    assert exit_code("--k", "1", *SIZES, "--out", str(tmp_path / "o")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted: the run is not saved"]
    assert not (tmp_path / "o").exists()  # the folder it made for the run is gone
    (tmp_path / "kept").mkdir()  # a folder the user made stays
    assert exit_code("--k", "1", *SIZES, "--out", str(tmp_path / "kept")) == 130
    assert (tmp_path / "kept").is_dir()


def test_ctrl_c_keeps_a_sweeps_finished_rows_and_the_csv_valid(tmp_path, monkeypatch, capsys):
    real = runners.run_experiments

    def second_is_interrupted(configs, **kw):
        if configs[0].mode == "FO":
            raise KeyboardInterrupt
        return real(configs, **kw)

    monkeypatch.setattr(runners, "run_experiments", second_is_interrupted)
    assert sweep(tmp_path) == 130
    assert capsys.readouterr().err.strip().startswith("interrupted: finished runs are saved")
    assert list(rows(tmp_path)["run_id"]) == ["reference_FULL_k1_seed0_T8"]
    monkeypatch.setattr(runners, "run_experiments", real)
    assert sweep(tmp_path) == 0 and len(rows(tmp_path)) == 2  # resumes


@pytest.mark.parametrize(
    "sent, code, said",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl_c", "sigterm"],
)
def test_a_signal_during_a_sweep_with_a_runner_thread_and_a_worker(tmp_path, sent, code, said):
    """A real SIGINT to the process group, as Ctrl-C sends it, or SIGTERM to the sweep, as
    `kill` or a scheduler does, while the runner thread of this process is inside torch
    (finalizing under it used to abort: SIGABRT)."""
    grid = ["--modes", "FULL", "--k", "1,2", "--seeds", "0,1", "--outer-steps", "100000"]
    command = [sys.executable, "-m", "phase12", "sweep", "--root", str(tmp_path), "--tag", "t"]
    command += [*grid, "--meta-batch", "2", "--seq-len", "8", "--devices", "cpu,cpu"]
    sweep = subprocess.Popen(
        [*command, "--no-progress"],
        start_new_session=True,
        # Ctrl-C's disposition in a terminal: a shell that started these tests in the
        # background without job control left SIGINT ignored, and Python keeps it so.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        announced = sweep.stdout.readline()  # said just before the runners start
        time.sleep(5)  # the runner thread inside its first group
        if sent == signal.SIGINT:
            os.killpg(sweep.pid, sent)
        else:
            os.kill(sweep.pid, sent)
        out, _ = sweep.communicate(timeout=60)
    finally:  # never leave the sweep running
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    assert "4 to run on cpu, cpu" in announced, announced
    assert sweep.returncode == code, out
    assert f"{said}: finished runs are saved" in out and "terminate called" not in out


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path):
    """Default SIGTERM would skip every `finally`: the run's folder kept its lock files
    and nothing else, and no line said why."""
    out = tmp_path / "o"
    command = [sys.executable, "-m", "phase12", "--k", "1", "--outer-steps", "100000"]
    run = subprocess.Popen([*command, *SIZES, "--out", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".writer.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)  # into the run
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated: the run is not saved"
    assert not out.exists()  # the folder it made for the run is gone


def test_sigterm_handler_is_the_commands_only():
    from phase12.cli import Terminated, sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_worker_mid_group_exits_when_its_sweep_is_killed(tmp_path):
    """SIGKILL (or a parent that exits without ending them) must not leave a worker
    process training for nobody: it notices within seconds and exits."""
    grid = ["--modes", "FULL", "--k", "1,2", "--seeds", "0", "--outer-steps", "100000"]
    command = [sys.executable, "-m", "phase12", "sweep", "--root", str(tmp_path), "--tag", "t"]
    command += [*grid, "--meta-batch", "2", "--seq-len", "8", "--devices", "cpu,cpu"]
    sweep = subprocess.Popen(
        [*command, "--no-progress"], start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    try:
        assert "2 to run on cpu, cpu" in sweep.stdout.readline()
        time.sleep(8)  # the worker inside its group (or still starting: it exits either way)
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait()  # reaped: what is left of its group is the worker and the tracker
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(sweep.pid, 0)  # any process of the sweep's group left?
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("a worker of the killed sweep is still running")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()


def test_sweep_and_pipeline_default_to_what_runs_on_a_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a CPU machine outside the tests
    args = ["--modes", "FO", "--k", "1", "--seeds", "0", "--outer-steps", "2", *SIZES]
    assert exit_code("sweep", "--root", str(tmp_path), "--tag", "d", *args) == 0
    assert "(reference x FO x k 1 x seeds 0 x T 8)" in capsys.readouterr().out
    assert list(rows(tmp_path, "d")["backend"]) == ["reference"]


def test_a_single_run_does_not_write_into_a_sweep_or_repeat_a_run(tmp_path, capsys):
    assert sweep(tmp_path) == 0
    capsys.readouterr()
    run = ["--k", "1", "--outer-steps", "2", *SIZES]
    assert exit_code(*run, "--out", str(tmp_path / "t")) == 2
    assert "is a sweep's folder" in one_error_line(capsys)
    assert exit_code(*run, "--out", str(tmp_path / "single")) == 0
    assert exit_code(*run, "--out", str(tmp_path / "single")) == 2
    assert "already holds run reference_FULL_k1_seed0_T8" in one_error_line(capsys)
    # The refusal let the folder go, and a torn last line is moved aside, not refused.
    runs_csv = tmp_path / "single" / "runs.csv"
    runs_csv.write_bytes(runs_csv.read_bytes() + b"reference,FO,1")
    assert exit_code(*run, "--seed", "1", "--out", str(tmp_path / "single")) == 0
    assert len(pd.read_csv(runs_csv)) == 2 and "partial line" in capsys.readouterr().err


def test_runs_of_other_settings_are_refused_where_no_sweep_record_says_so(tmp_path, capsys):
    folder = tmp_path / "t"
    run = ["--k", "1", *SIZES, "--out", str(folder)]
    assert exit_code(*run, "--outer-steps", "3") == 0  # a single run's folder: no sweep.json
    capsys.readouterr()
    assert exit_code(*run, "--outer-steps", "2", "--seed", "1") == 2
    assert "outer_steps 3 there, 2 now" in one_error_line(capsys)
    assert sweep(tmp_path, "--outer-steps", "2") == 2
    assert "holds runs with other settings (outer_steps 3 there, 2 now)" in one_error_line(capsys)
    assert list(rows(tmp_path)["outer_steps"]) == [3]  # untouched
    assert sweep(tmp_path) == 0 and set(rows(tmp_path)["outer_steps"]) == {3}  # same settings
    # Settings the row does not hold (noise, shots, classes): from the runs' meta JSON.
    root = tmp_path / "other"
    single = ["--k", "1", *SIZES, "--outer-steps", "3", "--out", str(root / "t")]
    assert exit_code(*single) == 0
    capsys.readouterr()
    for flag, value in (("--noise-std", "2.0"), ("--shots", "4"), ("--num-classes", "3")):
        assert exit_code(*single, "--seed", "7", flag, value) == 2
        name = flag[2:].replace("-", "_")
        assert f"holds runs with other settings ({name} " in one_error_line(capsys)
        assert sweep(root, flag, value) == 2
        assert f"holds runs with other settings ({name} " in one_error_line(capsys)
    assert len(rows(root)) == 1  # nothing added
    (meta,) = (root / "t" / "meta").iterdir()
    meta.write_text(meta.read_text()[:40])  # cut short: the run's settings are unknown
    assert exit_code(*single, "--seed", "7") == 2
    assert f"{meta} cannot be read (JSONDecodeError)" in one_error_line(capsys)
    assert sweep(root) == 2 and "cannot be read" in one_error_line(capsys)


def test_risk_checks_of_other_settings_or_shapes_stay_out_of_a_sweeps_folder(tmp_path, capsys):
    assert sweep(tmp_path) == 0
    checks = ["--no-gradgradcheck", "--backends", "reference"]
    capsys.readouterr()
    assert risk(tmp_path, "--outer-steps", "2", *checks) == 2
    assert "holds a sweep with other settings (outer_steps 3 there, 2 now)" in one_error_line(
        capsys
    )
    assert risk(tmp_path, "--seq-len", "16", *checks) == 2
    assert "holds a sweep of seq_lens 8, not 16" in one_error_line(capsys)
    assert not (tmp_path / "t" / "risk_checks.csv").exists()
    assert risk(tmp_path, *checks) == 0
    assert (tmp_path / "t" / "risk_checks.csv").exists()
    # A folder without a sweep record: its runs' rows and meta JSON say their settings.
    single = ["--k", "1", *SIZES, "--outer-steps", "3", "--out", str(tmp_path / "u" / "t")]
    assert exit_code(*single) == 0
    capsys.readouterr()
    for flag, value in (("--outer-steps", "7"), ("--noise-std", "2.0")):
        assert risk(tmp_path / "u", flag, value, *checks) == 2
        assert "holds runs with other settings" in one_error_line(capsys)
    assert not (tmp_path / "u" / "t" / "risk_checks.csv").exists()


def test_risk_checks_refuse_a_backend_asked_for_that_cannot_run_here(tmp_path, capsys):
    assert sweep(tmp_path, "--num-classes", "17") == 0
    capsys.readouterr()
    asked = ["--no-gradgradcheck", "--num-classes", "17", "--backends", "reference,triton_step"]
    assert risk(tmp_path, *asked) == 2
    assert "--backends triton_step cannot run here: the fused inner step supports up to 16" in (
        one_error_line(capsys)
    )
    assert not (tmp_path / "t" / "risk_checks.csv").exists()


def test_a_damaged_runs_csv_stops_a_resumed_sweep_before_any_work(tmp_path, capsys):
    assert sweep(tmp_path) == 0
    runs_csv = tmp_path / "t" / "runs.csv"
    header, first, second = runs_csv.read_text().splitlines(keepends=True)
    damaged = {
        "holds runs more than once": header + first + first + second,
        "runs.csv, line 3: not a row": header + first + "reference,FO,1\n",  # fields missing
        "runs.csv, line 2: not a row": header + first.replace(",OK,", ",,", 1) + second,
    }
    for message, text in damaged.items():
        runs_csv.write_text(text)
        capsys.readouterr()
        assert sweep(tmp_path) == 2
        assert message in one_error_line(capsys)
        assert runs_csv.read_text() == text  # nothing run, nothing written


def test_error_rows_outside_the_grid_stay_and_restart_takes_an_older_folder(
    tmp_path, monkeypatch, capsys
):
    sweep_with_full_failing(tmp_path, monkeypatch)
    assert sweep(tmp_path, "--modes", "FO") == 0  # the FULL cell is not in this grid
    assert sorted(rows(tmp_path)["status"]) == ["ERROR", "OK"]
    assert not (tmp_path / "t" / "errors.csv").exists()
    # A folder this version cannot read: refused, and --restart moves it aside.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "runs.csv").write_text("backend,mode\nreference,FULL\n")
    (tmp_path / "old" / "sweep.json").write_text("{not json")
    args = ["sweep", "--root", str(tmp_path), "--tag", "old", *GRID]
    capsys.readouterr()
    assert exit_code(*args) == 2 and "--restart" in one_error_line(capsys)
    assert exit_code(*args, "--restart") == 0 and len(rows(tmp_path, "old")) == 2
    assert (next(tmp_path.glob("old.replaced-*")) / "sweep.json").read_text() == "{not json"


@pytest.mark.parametrize(
    "name, make, kind",
    [("history", "write_text", "file"), ("meta", "write_text", "file")]
    + [(name, "mkdir", "folder") for name in ("runs.csv", "runs.csv.lock", "risk_checks.csv")],
)
def test_a_results_folder_holding_the_wrong_kind_of_entry_is_refused_before_work(
    tmp_path, capsys, name, make, kind
):
    folder = tmp_path / "t"
    folder.mkdir()
    path = folder / name
    path.write_text("x") if make == "write_text" else path.mkdir()
    message = f"{path} is a {kind} where this program keeps"
    for command in (
        lambda: sweep(tmp_path),
        lambda: exit_code("--k", "1", "--outer-steps", "2", *SIZES, "--out", str(folder)),
        lambda: risk(tmp_path, "--no-gradgradcheck"),
        lambda: exit_code("report", "--root", str(tmp_path), "--tag", "t"),
    ):
        code = command()
        err = capsys.readouterr().err
        if code == 2 and "no runs.csv" in err:  # report: nothing to report on yet
            continue
        assert code == 2 and message in err, err
    assert sorted(p.name for p in folder.iterdir()) == [name]  # nothing written
