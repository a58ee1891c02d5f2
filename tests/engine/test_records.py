"""What a results folder records of how its results were made: the risk command's
defaults, read from every committed sweep record, and hand edits refused by name."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from phase12 import records
from phase12.config import ConfigError

RESULTS = Path(__file__).parents[2] / "results"


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in RESULTS.glob("*/sweep.json")))
def test_the_risk_defaults_of_every_committed_sweep_record(folder):
    # Three formats: {"base": ...}, settings holding the shape, a grid holding it.
    source, flags = records.recorded_flags(RESULTS / folder)
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
        records.recorded_flags(tmp_path)


def test_only_settings_become_risk_defaults(tmp_path):
    record = {"settings": {"outer_steps": 2, "no_gradgradcheck": True, "root": "/"}, "grid": {}}
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    flags = {"outer_steps": 2, "probe_every": 0}  # a setting it predates, as runs then had it
    assert records.recorded_flags(tmp_path) == (str(tmp_path / "sweep.json"), flags)
    (tmp_path / "sweep.json").unlink()
    assert records.recorded_flags(tmp_path) == (None, {})
    (tmp_path / "sweep.json").mkdir()
    with pytest.raises(ConfigError, match="not a sweep record this program can read"):
        records.recorded_flags(tmp_path)
