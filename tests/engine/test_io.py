"""Result files: the write order of a run, the non-finite scan, torn lines, the lock."""

import json

import pandas as pd
import pytest
import torch
from tqdm import tqdm

import phase12.io as io_module
from phase12.io import FolderBusy, FolderLock, read_rows, repair_torn_tail, save_run
from phase12.schema import HISTORY_COLUMNS, METRICS, RUN_COLUMNS, RunResult
from phase12.train import train_loop


def test_a_row_in_runs_csv_means_the_runs_files_are_on_disk(tmp_path, monkeypatch):
    """save_run writes the history and the metadata before it appends the row."""
    history = {c: [0.5, None] for c in HISTORY_COLUMNS} | {"step": [0, 1]}
    result = RunResult(row={"run_id": "r", "status": "OK"}, history=history)
    real = io_module.append_row

    def append_after_the_files(path, row, *args):
        assert (tmp_path / "history" / "r.csv.gz").exists(), "row before its history"
        assert (tmp_path / "meta" / "r.json").exists(), "row before its metadata"
        real(path, row, *args)

    monkeypatch.setattr(io_module, "append_row", append_after_the_files)
    save_run(tmp_path, result, {"config": {}})
    assert (tmp_path / "runs.csv").read_text().count("\n") == 2


def test_a_history_is_gzip_csv_with_the_same_bytes_each_time(tmp_path):
    history = {c: [0.25, None] for c in HISTORY_COLUMNS} | {"step": [0, 1]}
    result = RunResult(row={"run_id": "r", "status": "OK"}, history=history)
    save_run(tmp_path / "a", result)
    save_run(tmp_path / "b", result)
    a, b = (tmp_path / d / "history" / "r.csv.gz" for d in "ab")
    assert a.read_bytes()[4:8] == bytes(4)  # the gzip header's timestamp: none
    assert a.read_bytes() == b.read_bytes()
    table = pd.read_csv(a)
    assert list(table.columns) == HISTORY_COLUMNS
    assert table["loss"].tolist()[0] == 0.25 and table["loss"].isna().tolist() == [False, True]


@pytest.mark.parametrize("column", range(len(METRICS)))
def test_the_non_finite_scan_reads_every_metric(column):
    """A finite loss with a non-finite meta-gradient norm (or any metric) stops the run."""
    steps, bad_step = 12, 7
    history = torch.full((1, steps, len(METRICS)), float("nan"))
    counter = [0]

    def step():
        row = torch.ones(len(METRICS))
        if counter[0] == bad_step:
            row[column] = float("inf")
        history[0, counter[0]] = row
        counter[0] += 1

    loop = train_loop(step, history, steps, check_every=5, bar=tqdm(disable=True))
    assert loop.nonfinite == [bad_step]
    assert counter[0] == 10  # stopped at the check after the bad step


def test_torn_tail_is_cut_and_kept(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_bytes(b"a,b,c\n1,2,3\n4,5")
    side = repair_torn_tail(path)
    assert path.read_bytes() == b"a,b,c\n1,2,3\n" and side.read_bytes() == b"4,5"
    assert repair_torn_tail(path) is None


def test_a_last_row_with_every_field_but_no_line_end_is_left_for_the_user(tmp_path):
    """A whole row saved without its newline (an editor) or a write cut in its last field:
    which one cannot be told, so neither moving it aside nor keeping it is safe."""
    path = tmp_path / "runs.csv"
    path.write_bytes(b"a,b,c\n1,2,3\n4,5,6")
    with pytest.raises(ValueError, match="every field but no line end"):
        repair_torn_tail(path)
    assert path.read_bytes() == b"a,b,c\n1,2,3\n4,5,6"
    assert not list(tmp_path.glob("*.torn-*"))


def test_bytes_that_are_not_text_past_the_header_are_one_error(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_bytes(",".join(RUN_COLUMNS).encode() + b"\n" + b"x" * 9000 + b"\xff\n")
    with pytest.raises(ValueError, match="is not a CSV this program wrote"):
        read_rows(path)


def test_folder_lock_is_exclusive_and_released(tmp_path):
    with FolderLock(tmp_path / "f"):
        with pytest.raises(FolderBusy, match="being written by pid"), FolderLock(tmp_path / "f"):
            pass
    with FolderLock(tmp_path / "f"):  # free again
        pass


def test_settings_are_compared_field_by_field_and_absent_ones_as_told():
    from phase12.config import RunConfig, changed_settings, settings

    config = RunConfig(outer_steps=2, shots=4)
    recorded = settings(config)
    assert changed_settings(recorded, config, absent_differs=True) is None
    assert changed_settings(recorded | {"outer_steps": 3}, config, absent_differs=False) == (
        "outer_steps 3 there, 2 now"
    )
    older = {k: v for k, v in recorded.items() if k != "shots"}  # a version before shots
    assert changed_settings(older, config, absent_differs=False) is None
    assert changed_settings(older, config, absent_differs=True) == "shots absent there, 4 now"
    grid = config.replace(seed=5, backend="triton_step", seq_len=16)  # grid axes: not settings
    assert changed_settings(recorded, grid, absent_differs=True) is None


def test_records_from_before_a_setting_read_it_as_what_their_runs_did(tmp_path):
    # probe_every came later; runs before it probed at the end only (probe_every 0).
    from phase12 import records
    from phase12.config import RunConfig, changed_settings, settings
    from phase12.io import run_config

    config = RunConfig(outer_steps=2)
    older = {k: v for k, v in settings(config).items() if k != "probe_every"}
    (tmp_path / "sweep.json").write_text(json.dumps({"settings": older, "grid": {}}))
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "r.json").write_text(json.dumps({"config": older}))
    row = dict.fromkeys(RUN_COLUMNS, "") | {"run_id": "r", "outer_steps": "2"}
    for before, absent_differs in [
        (records.sweep_record(tmp_path)["settings"], True),
        (run_config(row, tmp_path), False),
    ]:
        assert changed_settings(before, config, absent_differs=absent_differs) is None
        assert changed_settings(before, config.replace(probe_every=5), absent_differs=False) == (
            "probe_every 0 there, 5 now"
        )
    # A run without a meta JSON records nothing of it: any probe_every may join it.
    (tmp_path / "meta" / "r.json").unlink()
    lone = run_config(row, tmp_path)
    assert changed_settings(lone, config.replace(probe_every=5), absent_differs=False) is None


def test_a_meta_json_of_another_shape_than_its_row_is_refused(tmp_path):
    from phase12.config import ConfigError
    from phase12.io import run_config

    (tmp_path / "meta").mkdir()
    meta = tmp_path / "meta" / "r.json"
    row = dict.fromkeys(RUN_COLUMNS, "") | {"run_id": "r", "seq_len": "32", "dim": "64"}
    meta.write_text(json.dumps({"config": {"seq_len": 99, "dim": 64}}))
    with pytest.raises(ConfigError, match=r"records seq_len 99 but the run's row in .* 32; fix"):
        run_config(row, tmp_path)
    meta.write_text(json.dumps({"config": {"seq_len": 32, "dim": 64}}))
    assert run_config(row, tmp_path) == {"seq_len": 32, "dim": 64, "probe_every": 0}


@pytest.mark.parametrize(
    "column, cell, field, recorded",
    [
        ("meta_batch", "8", "meta_batch", 2),
        ("outer_lr", "0.01", "outer_lr", 0.001),
        ("num_signal_positions", "3", "signal_positions", 4),
        ("mode", "FO", "mode", "FULL"),
        ("ablation", "none", "ablation", "no_attention_curvature"),
    ],
)
def test_a_row_edited_against_its_meta_json_is_refused(tmp_path, column, cell, field, recorded):
    """A hand-edited setting of a row would be the setting risk and the report use."""
    from phase12.config import ConfigError
    from phase12.io import run_config

    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "r.json").write_text(json.dumps({"config": {field: recorded}}))
    row = dict.fromkeys(RUN_COLUMNS, "") | {"run_id": "r", column: cell}
    with pytest.raises(ConfigError, match=rf"records {field} .* but the run's row in .* {cell}"):
        run_config(row, tmp_path)
    row[column] = str(recorded)  # as the CSV writes it
    assert run_config(row, tmp_path)[field] == recorded


def test_the_names_a_run_row_takes_are_the_configs():
    """The analysis checks a row's backend, mode, ablation and dtype against the schema's names:
    they are the ones the engine runs."""
    from phase12.backends import NAMES
    from phase12.config import ABLATIONS, DTYPES, Mode
    from phase12.schema import ABLATION_NAMES, BACKEND_NAMES, FLOAT64_TOLERANCE, MODES

    assert NAMES == BACKEND_NAMES
    assert tuple(m.value for m in Mode) == MODES
    assert tuple(ABLATIONS) == ABLATION_NAMES
    assert set(DTYPES) == set(FLOAT64_TOLERANCE)


def test_the_seeds_setting_is_the_configs_defaults():
    """The report compares with the seed's numbers only at SEED_SETTING."""
    from phase12.config import RunConfig
    from phase12.schema import SEED_SETTING

    assert {k: getattr(RunConfig(), k) for k in SEED_SETTING} == SEED_SETTING


def test_the_loss_scale_of_each_precision_is_its_compute_dtypes():
    """2**10 exactly where the model computes in float16 (its subnormals), 1 elsewhere."""
    import torch

    from phase12.config import DTYPES, RunConfig

    for dtype in DTYPES:
        config = RunConfig(dtype=dtype)
        assert config.loss_scale == (1024.0 if config.compute_dtype == torch.float16 else 1.0)
