"""Risk checks on the CPU, Triton checks through the interpreter."""

import pandas as pd
import pytest
from numpy import inf, nan
from support import TINY

from phase12.risk import run_risk_checks

pytestmark = pytest.mark.usefixtures("interpreter")


def test_risk_checks_pass_on_cpu(tmp_path):
    base = TINY
    pd.DataFrame([{"run_id": "a", "status": "OK"}, {"run_id": "b", "status": "NONFINITE"}]).to_csv(
        tmp_path / "runs.csv", index=False
    )
    backends = ("reference", "triton_fused", "triton_step")
    df = run_risk_checks(base, tmp_path, backends=backends).set_index("check")
    expected = {
        "seed_determinism": "PASS",
        "attention_parity_forward": "PASS",
        "attention_parity_backward": "PASS",
        "attention_parity_double_backward": "PASS",
        "fo_vs_fo_strict_reference": "PASS",
        "full_vs_fo_reference": "PASS",
        "fo_vs_fo_strict_triton_fused": "PASS",
        "full_vs_fo_triton_fused": "PASS",
        "fo_vs_fo_strict_triton_step": "PASS",
        "full_vs_fo_triton_step": "PASS",
        "meta_grad_parity_triton_fused": "PASS",
        "meta_grad_parity_triton_step": "PASS",
        "triton_gradgradcheck": "PASS",
        "nonfinite_guard": "WARN",
    }
    assert df["status"].to_dict() == expected
    assert df.loc["seed_determinism", "value"] == 0.0
    assert df.loc["full_vs_fo_triton_fused", "value"] > 1e-2
    assert df.loc["meta_grad_parity_triton_step", "value"] < 1e-5
    assert "NONFINITE=1" in df.loc["nonfinite_guard", "details"]


def test_a_backend_the_setting_does_not_fit_is_skipped_with_the_reason():
    from phase12.backends import device_for
    from phase12.risk import meta_gradient_checks

    base = TINY.replace(num_classes=17)  # more classes than triton_step holds
    rows = {
        r["check"]: r
        for r in meta_gradient_checks(base, device_for(base), ("reference", "triton_step"))
    }
    assert rows["full_vs_fo_reference"]["status"] == "PASS"
    for check in ("fo_vs_fo_strict_triton_step", "meta_grad_parity_triton_step"):
        assert rows[check]["status"] == "SKIP"
    assert "classes" in rows["full_vs_fo_triton_step"]["details"]
    assert "classes" in rows["meta_grad_parity_triton_step"]["details"]  # the same reason
    assert "not among the requested" in rows["full_vs_fo_triton_fused"]["details"]


def test_a_gradgradcheck_not_run_says_why(tmp_path):
    def why(**kw) -> str:
        df = run_risk_checks(TINY, tmp_path, **kw).set_index("check")
        assert df.loc["triton_gradgradcheck", "status"] == "SKIP"
        return df.loc["triton_gradgradcheck", "details"]

    assert why(backends=("reference",)) == "triton_fused not among the requested backends"
    assert why(gradgradcheck=False) == "switched off (--no-gradgradcheck)"


def test_the_nonfinite_guard_of_a_runs_csv_without_rows_is_skipped(tmp_path):
    from phase12.risk import nonfinite_guard

    pd.DataFrame(columns=["run_id", "status"]).to_csv(tmp_path / "runs.csv", index=False)
    row = nonfinite_guard(tmp_path)
    assert row["status"] == "SKIP" and "no runs" in row["details"]


@pytest.mark.parametrize(
    "first, second, status, said",
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], "PASS", "tolerance 0.0"),
        ([1.0, 2.0, 3.0], [1.0, 2.5, 3.0], "FAIL", "tolerance 0.0"),
        ([1.0, nan, nan], [1.0, nan, nan], "PASS", "non-finite from step 1 in both alike"),
        ([1.0, nan, nan], [2.0, nan, nan], "FAIL", "non-finite from step 1 in both alike"),
        ([1.0, 2.0, nan], [1.0, 2.0, 3.0], "FAIL", "the runs went non-finite differently"),
        ([1.0, inf, inf], [1.0, -inf, -inf], "FAIL", "the runs went non-finite differently"),
        ([nan, nan, nan], [nan, nan, nan], "SKIP", "nothing finite to compare"),
    ],
)
def test_seed_determinism_compares_where_finite(monkeypatch, first, second, status, said):
    """NaN is never equal to NaN: two runs non-finite at the same steps are alike; one
    that compared nothing is no pass."""
    import torch

    import phase12.risk as risk

    histories = iter([first, second])

    class Run:  # build_step's stand-in: its history is given
        def __init__(self, configs, device):
            values = torch.tensor(next(histories))
            self.history = values[None, :, None].expand(1, 3, 5).clone()

        def __call__(self):
            pass

    monkeypatch.setattr(risk, "build_step", Run)
    row = risk.seed_determinism(TINY, torch.device("cpu"), steps=3)
    assert row["status"] == status and said in row["details"], row
    assert "reference, eager" in row["details"]


def test_seed_determinism_of_a_run_nonfinite_from_the_start_is_a_skip():
    """Its accuracy (an argmax of NaN logits) stays finite: it is not evidence."""
    import torch

    from phase12.risk import seed_determinism

    row = seed_determinism(TINY.replace(inner_lr=1e30), torch.device("cpu"), steps=3)
    assert row["status"] == "SKIP" and "nothing finite to compare" in row["details"], row
