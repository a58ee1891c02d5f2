"""Risk checks on the CPU, Triton checks through the interpreter."""

import pandas as pd
import pytest
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


def test_seed_determinism_of_runs_that_go_nonfinite_alike_is_a_pass(monkeypatch):
    """NaN is never equal to NaN: two runs non-finite at the same steps are deterministic."""
    import torch

    import phase12.risk as risk

    broken = TINY.replace(inner_lr=1e30)  # non-finite from the first step
    row = risk.seed_determinism(broken, torch.device("cpu"), steps=3)
    assert row["status"] == "PASS", row
    assert "non-finite from step 0 in both runs alike" in row["details"]
    assert "reference, eager" in row["details"]

    class FiniteHistory:  # a run whose non-finite metrics read 0
        def __init__(self, state):
            self.state, self.history = state, state.history

        def __call__(self):
            self.state()
            self.history.nan_to_num_(0.0)

    real, calls = risk.build_step, []

    def one_run_breaks(configs, device):
        calls.append(None)
        state = real(configs, device)
        return FiniteHistory(state) if len(calls) == 2 else state

    monkeypatch.setattr(risk, "build_step", one_run_breaks)
    row = risk.seed_determinism(broken, torch.device("cpu"), steps=3)
    assert row["status"] == "FAIL" and "non-finite in one run where" in row["details"]
