"""The command line: bad input is refused before any work, results are written whole."""

import importlib
import importlib.util
import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kernels import BackendUnavailable
from phase12 import cli
from phase12.cli import bytecode_note, lacks_bytecode  # before conftest's patch
from phase12.config import ConfigError

FAST = ["--outer-steps", "3", "--meta-batch", "2", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--mode", "SECOND"], "invalid choice"),
        (["--backend", "flash"], "invalid choice"),
        (["--k", "-1"], "--k must be >= 0"),
        (["--signal-positions", "32"], "--signal-positions must be in 1..seq_len-1"),
        (["--seq-len", "4", "--signal-positions", "4"], "--signal-positions"),
        (["--meta-batch", "0"], "--meta-batch must be positive"),
        (["--outer-steps", "-5"], "--outer-steps must be positive"),
        (["--inner-lr", "0"], "--inner-lr must be a positive finite"),
        (["--outer-lr", "nan"], "--outer-lr must be a positive finite"),
        (["--outer-lr=-1e-3"], "--outer-lr must be a positive finite number; got -0.001"),
        (["--inner-lr", "1e300"], "--inner-lr 1e+300 is beyond the largest float32 number"),
        (["--outer-lr", "1e39", "--dtype", "bfloat16"], "beyond the largest bfloat16 number"),
        # Adam's first step is 10x the rate: 1e38 trained into an overflow traceback
        (["--outer-lr", "1e38"], "--outer-lr 1e+38 times 10 (Adam's first step) is beyond"),
        (["--noise-std", "1e39"], "--noise-std 1e+39 times a normal draw"),  # was NONFINITE
        (["--noise-std", "7e3", "--dtype", "float16"], "largest float16 number"),
        (["--device", "cuda"], "no CUDA device is available"),
        (["--device", "tpu"], "not a device name"),
        (["--device", "cpu:1"], "the CPU is one device"),
        (["--num-classes", "1"], "--num-classes must be >= 2"),
        (["--cuda-graph", "on"], "--cuda-graph 'on' needs a CUDA device"),
        (["--cuda-graph", "always"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_before_writing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    args = ["--device", "cpu", "--out", str(out), *argv]
    if "--device" in argv:
        args = args[2:]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(cli.main(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,value",
    [
        (["--outer-lr", "-1e-3"], "-1e-3"),
        (["--outer-lr", "1e-3", "--outer-lr", "-1e-3"], "-1e-3"),  # the second one's
        (["sweep", "--k", "-1,2"], "-1,2"),
    ],
)
def test_a_negative_number_read_as_a_flag_gets_the_fix(capsys, argv, value):
    # Python before 3.14 reads -1e-3 or -1,2 as a flag (it knows -1 and -1.5 as numbers):
    # the error line then says how to write it; 3.14 reads the number, which is refused.
    with pytest.raises(SystemExit) as e:
        raise SystemExit(cli.main([*argv, "--device", "cpu"]))
    err = capsys.readouterr().err.strip().splitlines()
    flag = argv[-2]
    fix = f"({value} reads as a flag there: write {flag}={value})"
    refused = f"{flag} must be" if "," not in value else "--k must be >= 0"
    assert e.value.code == 2 and len(err) == 1 and (fix in err[0] or refused in err[0])


@pytest.mark.parametrize("backend", ["triton_fused", "triton_step"])
def test_triton_on_cpu_without_interpreter_is_refused(tmp_path, capsys, monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code = cli.main(["--backend", backend, "--device", "cpu", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TRITON_INTERPRET=1" in err[0] and err[0].startswith("error:")
    assert backend in err[0] and not (tmp_path / "o").exists()


def test_single_run_json_and_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--mode", "FO_STRICT", "--k", "2", *FAST, "--out", str(out), "--json"]) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    row = json.loads(stdout[-1])
    assert row["status"] == "OK" and row["mode"] == "FO_STRICT" and row["inner_steps"] == 2
    assert "query accuracy" in "\n".join(stdout[:-1])
    assert "means over the last 3 outer steps" in "\n".join(stdout[:-1])  # 3 ran, not 20
    assert "no earlier loss to compare" in "\n".join(stdout[:-1])  # not "fell by 0.0000"
    window = ["--metric-window", "2", "--outer-steps", "4"]  # two windows apart
    assert cli.main(["--k", "1", *FAST, "--no-save", *window]) == 0
    assert "last 2 outer steps; the loss fell by " in capsys.readouterr().out

    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 1 and runs.loc[0, "run_id"] == "reference_FO_STRICT_k2_seed0"
    history = pd.read_csv(out / "history" / "reference_FO_STRICT_k2_seed0.csv.gz")
    assert list(history["step"]) == [0, 1, 2]
    meta = json.loads((out / "meta" / "reference_FO_STRICT_k2_seed0.json").read_text())
    assert meta["config"]["mode"] == "FO_STRICT" and "torch" in meta
    # A second run appends; the header is not repeated.
    assert cli.main(["--k", "1", *FAST, "--out", str(out)]) == 0
    assert len(pd.read_csv(out / "runs.csv")) == 2


def test_nonfinite_run_stops_and_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["--inner-lr", "1e30", *FAST, "--out", str(out), "--json"])
    assert code == 3
    line = capsys.readouterr().out.strip().splitlines()[-1]
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert row["status"] == "NONFINITE" and row["nonfinite_step"] == 0
    assert "non-finite at outer step 0" in row["error"]
    assert row["final_loss"] is None  # NaN has no JSON: null


def test_a_module_lacks_bytecode_when_compiled_with_none_left_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    source = tmp_path / "fresh_source.py"
    source.write_text("X = 1\n")
    spec = importlib.util.spec_from_file_location("fresh_source", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imported (not left in sys.modules)
    assert module.X == 1 and lacks_bytecode(module)
    py_compile.compile(str(source))  # what compileall does, whatever the flag
    assert not lacks_bytecode(module)
    assert not lacks_bytecode(sys) and not lacks_bytecode(importlib.import_module("math"))


def test_a_command_says_once_that_torch_has_no_bytecode(tmp_path):
    # The GPU machine's Python: PYTHONDONTWRITEBYTECODE=1 and no .pyc for torch (a cache
    # prefix with nothing in it stands for site-packages without __pycache__).
    import torch

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=str(tmp_path))
    command = [sys.executable, "-m", "phase12", "--mode", "SECOND"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    note = bytecode_note(torch)
    site = os.path.dirname(os.path.dirname(torch.__file__))
    assert proc.stderr.splitlines()[0] == note and note.endswith(f"compileall -q -j 0 {site}")
    assert proc.stderr.count("note:") == 1 and "error: argument --mode" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


_NO_TRITON = """
import sys

class NoTriton:  # a machine without Triton's wheels (macOS, Windows)
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r}")

sys.meta_path.insert(0, NoTriton())
"""


def test_without_triton_the_reference_backend_runs_and_the_others_say_why_not(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(_NO_TRITON)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("TRITON_INTERPRET", None)
    python = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, *a], env=env, capture_output=True, text=True, timeout=300
    )
    run = lambda *a: python("-m", "phase12", "--k", "2", *FAST, "--no-save", *a)  # noqa: E731
    proc = run()  # its probes take the curvature ablations' autograd.Functions
    assert proc.returncode == 0, proc.stderr
    assert "status OK" in proc.stdout and "second-order part" in proc.stdout
    why = "need Triton, which failed to import (No module named 'triton')"
    for backend in ("triton_fused", "triton_step"):
        proc = run("--backend", backend)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().endswith(f"{why}; install triton or use the reference backend")
    bench = ["bench", "step", "--device", "cpu", "--k", "1", "--out", str(tmp_path / "b")]
    proc = python("-m", "phase12", *bench, "--backends", "triton_step")  # its limits need Triton
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and why in proc.stderr
    proc = python("-m", "phase12", "bench", "tiles", "--help")
    assert proc.returncode == 0 and "bench tiles [-h]" in proc.stdout
    proc = python("-m", "kernels.gradcheck")  # documented: exit 2 where the kernels cannot run
    assert proc.returncode == 2 and why in proc.stderr and "Traceback" not in proc.stderr
    api = "import torch; from kernels import attention; q = torch.ones(1, 1, 2, 4); "
    api += "attention(q, q, q, backend='triton_fused')"
    proc = python("-c", api)
    assert f"kernels.BackendUnavailable: the Triton kernels {why}" in proc.stderr


def test_the_run_summary_says_whether_the_loss_fell_or_rose():
    from phase12.cli.single import summary_text
    from phase12.schema import RunResult

    row = dict(run_id="r", status="OK", error="", final_acc=0.5, final_loss=1.0)
    row |= dict(rel_diff_probe=0.1, attn_grad_norm_q=1.0, attn_grad_norm_k=1.0)
    row |= dict(attn_grad_norm_v=1.0, mean_outer_step_time_s=0.01, wall_time_total_s=1.0)
    row |= dict(setup_time_s=0.5, probe_time_s=0.1, device_name="cpu")
    history = {"step": list(range(10))}
    for delta, words in ((0.25, "the loss fell by 0.2500 from the first 4"), (-0.25, "rose by")):
        result = RunResult(row | {"convergence_delta": delta}, history)
        assert words in summary_text(result, window=4)
    short = RunResult(row | {"convergence_delta": None}, {"step": list(range(7))})
    assert "shorter than two such windows" in summary_text(short, window=4)
    nothing = RunResult(row | {"status": "NONFINITE", "final_acc": float("nan")}, {"step": []})
    assert "query accuracy" not in summary_text(nothing, window=4)  # no step finished


def test_default_backends_leave_out_those_that_cannot_run_and_say_so(monkeypatch, capsys):
    from phase12.cli.parsing import default_backends

    assert default_backends("cpu") == ("reference",) and capsys.readouterr().err == ""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # CUDA, kernels that cannot run

    def check_backend(name, device):
        if name != "reference":
            raise BackendUnavailable("no Triton here")

    monkeypatch.setattr("phase12.backends.check_backend", check_backend)
    assert default_backends("auto") == ("reference",)
    err = capsys.readouterr().err.strip()
    assert err == "note: triton_fused, triton_step left out of the default backends: no Triton here"
    monkeypatch.setattr("phase12.backends.check_backend", lambda name, device: None)
    assert default_backends("cuda") == ("reference", "triton_fused", "triton_step")
    assert capsys.readouterr().err == ""


def test_a_run_that_names_no_backend_takes_the_fastest_that_computes_it(monkeypatch):
    from phase12.cli.parsing import fastest_backend
    from phase12.config import RunConfig

    assert fastest_backend(RunConfig(device="cpu")) == ("reference", None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("phase12.backends.check_backend", lambda name, device: None)
    assert fastest_backend(RunConfig()) == ("triton_step", None)  # device auto: CUDA
    assert fastest_backend(RunConfig(cuda_graph="off")) == ("triton_step", None)
    for config, backend, why in [
        (
            RunConfig(dtype="bfloat16"),
            "triton_fused",
            "triton_step: its kernels compute in float32",
        ),
        (RunConfig(dtype="autocast_float16"), "triton_fused", "not in autocast_float16)"),
        (
            RunConfig(dtype="autocast_float16", cuda_graph="off"),
            "reference",
            "; triton_fused: eager",
        ),
        (
            RunConfig(dtype="float64"),
            "reference",
            "triton_fused: in float64 it is not known to be faster",
        ),
    ]:
        picked, note = fastest_backend(config)
        assert picked == backend and why in note, (config, note)
    backend, note = fastest_backend(RunConfig(ablation="frozen_softmax_stats"))
    assert backend == "triton_fused"
    assert note.startswith(
        "running on triton_fused, the fastest backend for this run here (triton_step: "
        "its kernels have no switch for ablation frozen_softmax_stats (use reference or "
        "triton_fused)"
    )
    backend, note = fastest_backend(RunConfig(ablation="frozen_softmax_stats", cuda_graph="off"))
    assert backend == "reference" and "; triton_fused: eager (cuda_graph off)" in note
    backend, note = fastest_backend(RunConfig(dim=256))
    assert backend == "reference"
    assert "(triton_step: the fused inner step supports D <= 64; got D = 256" in note
    assert "; triton_fused: its attention kernels take head dims up to 128; got D = 256" in note

    def check_backend(name, device):
        if name != "reference":
            raise BackendUnavailable("no Triton here")

    monkeypatch.setattr("phase12.backends.check_backend", check_backend)
    assert fastest_backend(RunConfig()) == (
        "reference",
        "running on reference, the fastest backend for this run here (triton_step and "
        "triton_fused: no Triton here)",
    )


def test_the_run_command_picks_its_backend_only_when_none_is_named(monkeypatch, capsys):
    from phase12.cli import single

    picks, runs = [], []
    monkeypatch.setattr(
        single, "fastest_backend", lambda c: picks.append(c) or ("triton_fused", "why")
    )

    def stop(config):
        runs.append(config)
        raise ConfigError("stopped before the run")

    monkeypatch.setattr(single, "device_for", stop)
    assert cli.main([*FAST, "--no-save", "--seed", "7"]) == 2
    assert [(c.seed, c.device) for c in picks] == [(7, "cpu")]
    assert [c.backend for c in runs] == ["triton_fused"]
    # bad input is one line: the note comes only once the input is good
    assert capsys.readouterr().err == "error: stopped before the run\n"
    assert cli.main([*FAST, "--no-save", "--backend", "reference"]) == 2
    assert len(picks) == 1 and runs[-1].backend == "reference"


def test_the_note_on_the_backend_is_said_once_by_the_main_rank(monkeypatch, capsys):
    from phase12.cli import single

    monkeypatch.setattr(single, "fastest_backend", lambda config: ("reference", "why"))
    assert cli.main(["--k", "0", *FAST, "--no-save", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["backend"] == "reference"
    assert err.splitlines().count("note: why") == 1
    monkeypatch.setenv("RANK", "1")  # another rank of torchrun's says nothing
    assert cli.main(["--k", "0", *FAST, "--no-save"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_list_items_and_tags_are_refused_in_our_words(capsys):
    import argparse

    from phase12.cli.parsing import csv_list
    from phase12.cli.sweep import check_folder

    for kind, text, said in [
        (int, "0-2", "'0-2': '0-2' is not a whole number"),
        (int, "1,x", "'1,x': 'x' is not a whole number"),
        (float, "0.1,a", "'0.1,a': 'a' is not a number"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            csv_list(kind)(text)
    with pytest.raises(ConfigError, match="give --root runs --tag abc$"):
        check_folder(Path("x"), "runs/abc")
