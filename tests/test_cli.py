"""The command line: bad input is refused before any work, results are written whole."""

import json

import pandas as pd
import pytest

import run

FAST = ["--outer-steps", "3", "--meta-batch", "2", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--mode", "SECOND"], "invalid choice"),
        (["--backend", "flash"], "invalid choice"),
        (["--k", "-1"], "--k must be >= 0"),
        (["--signal-positions", "32"], "signal_positions must be in 1..seq_len-1"),
        (["--seq-len", "4", "--signal-positions", "4"], "signal_positions"),
        (["--meta-batch", "0"], "meta_batch must be positive"),
        (["--outer-steps", "-5"], "outer_steps must be positive"),
        (["--inner-lr", "0"], "inner_lr must be a positive finite"),
        (["--outer-lr", "nan"], "outer_lr must be a positive finite"),
        (["--device", "cuda"], "no CUDA device is available"),
        (["--device", "tpu"], "not a device name"),
        (["--cuda-graph", "on"], "--cuda-graph on needs a CUDA device"),
        (["--cuda-graph", "always"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_before_writing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    args = ["--device", "cpu", "--out", str(out), *argv]
    if "--device" in argv:
        args = args[2:]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(run.main(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not out.exists()


@pytest.mark.parametrize("backend", ["triton_fused", "triton_step"])
def test_triton_on_cpu_without_interpreter_is_refused(tmp_path, capsys, monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code = run.main(["--backend", backend, "--device", "cpu", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TRITON_INTERPRET=1" in err[0] and err[0].startswith("error:")
    assert backend in err[0] and not (tmp_path / "o").exists()


def test_single_run_json_and_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main(["--mode", "FO_STRICT", "--k", "2", *FAST, "--out", str(out), "--json"]) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    row = json.loads(stdout[-1])
    assert row["status"] == "OK" and row["mode"] == "FO_STRICT" and row["inner_steps"] == 2
    assert "final acc" in "\n".join(stdout[:-1])
    import pandas as pd

    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 1 and runs.loc[0, "run_id"] == "reference_FO_STRICT_k2_seed0"
    history = pd.read_csv(out / "history" / "reference_FO_STRICT_k2_seed0.csv")
    assert list(history["step"]) == [0, 1, 2]
    meta = json.loads((out / "meta" / "reference_FO_STRICT_k2_seed0.json").read_text())
    assert meta["config"]["mode"] == "FO_STRICT" and "torch" in meta
    # A second run appends; the header is not repeated.
    assert run.main(["--k", "1", *FAST, "--out", str(out)]) == 0
    assert len(pd.read_csv(out / "runs.csv")) == 2


def test_nonfinite_run_stops_and_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    code = run.main(["--inner-lr", "1e30", *FAST, "--out", str(out), "--json"])
    assert code == 3
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["status"] == "NONFINITE" and row["nonfinite_step"] == 0
    assert "non-finite at outer step 0" in row["error"]


def test_bench_step_writes_tables_and_plot(tmp_path):
    out = tmp_path / "bench"
    args = [
        "bench",
        "step",
        "--device",
        "cpu",
        "--modes",
        "FO_STRICT",
        "--k",
        "1",
        "--backends",
        "reference",
        "--meta-batch",
        "2",
        "--seq-len",
        "8",
        "--reps",
        "1",
        "--warmup",
        "1",
        "--scaling",
        "--scaling-k",
        "1,2",
        "--scaling-meta-batch",
        "2,4",
        "--scaling-seq-len",
        "8,16",
        "--out",
        str(out),
    ]
    assert run.main(args) == 0
    import pandas as pd

    step = pd.read_csv(out / "step.csv")
    assert list(step["mode"]) == ["FO_STRICT"] and (step["median_step_ms"] > 0).all()
    scaling = pd.read_csv(out / "scaling.csv")
    assert len(scaling) == 2 * (2 + 2 + 2)  # FULL and FO_STRICT at every axis value
    assert (out / "scaling.png").stat().st_size > 10_000


def test_bench_tiles_refuses_bad_cells_and_needs_cuda(capsys):
    assert run.main(["bench", "tiles", "--cells", "fp32:4096:64:backward"]) == 2
    assert "bad cell 'fp32:4096:64:backward'" in capsys.readouterr().err
    assert (
        run.main(["bench", "tiles", "--cells", "bf16:1024:64:bwd", "--candidates", "32x32x4"]) == 2
    )
    assert "bad candidate '32x32x4'" in capsys.readouterr().err
    assert run.main(["bench", "tiles", "--candidates", "24x32x4x1"]) == 2
    assert "powers of two >= 16" in capsys.readouterr().err
    assert run.main(["bench", "tiles", "--cells", "bf16:1024:64:bwd"]) == 2
    assert "error: the tile sweep needs a CUDA device" in capsys.readouterr().err


def test_bench_attention_needs_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the message shown without CUDA")
    assert run.main(["bench", "attention"]) == 2
    assert "error: the attention benchmark needs a CUDA device" in capsys.readouterr().err


def test_bench_attention_refuses_unknown_names(capsys):
    assert run.main(["bench", "attention", "--passes", "fwd,backward"]) == 2
    assert "unknown 'backward'" in capsys.readouterr().err
    assert run.main(["bench", "attention", "--providers", "fused,flash"]) == 2
    assert "unknown 'flash'" in capsys.readouterr().err


def test_attention_table_puts_providers_side_by_side_with_ratios():
    from kernels.benchmark import table

    rows = [
        dict(provider=p, ms=ms, ms_graph=g, peak_bytes=2**20, status="OK")
        for p, ms, g in [("fused", 1.0, 0.2), ("sdpa_flash", 0.25, 0.1), ("sdpa_math", 3.0, 0.5)]
    ]
    rows.append(dict(provider="sdpa_cudnn", ms=float("nan"), ms_graph=float("nan"), status="OOM"))
    df = pd.DataFrame(rows).assign(dtype="bf16", d=64, n=1024, **{"pass": "fwd_bwd"})
    lines = table(df).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|")), strict=True))
    assert cells["fused"] == "1.000 ms / 1 MiB [0.200]"
    assert cells["sdpa_cudnn"] == "OOM"
    assert cells["math/fused"] == "3.00x"
    assert cells["fused/flash"] == "4.00x"
    assert cells["fused/flash [graph]"] == "2.00x"


def test_bench_help_reaches_the_named_benchmark(capsys):
    with pytest.raises(SystemExit) as e:
        run.main(["bench", "attention", "--help"])
    assert e.value.code == 0 and "--cuda-graph" in capsys.readouterr().out
    assert run.main(["bench", "--help"]) == 0
    assert "step,attention,tiles,distributed" in capsys.readouterr().out
