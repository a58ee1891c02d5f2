"""Risk checks: the numbers that say whether a sweep's results can be trusted.

Each check returns one row: check, status (PASS / WARN / FAIL / SKIP), value, details.

* seed_determinism        the same short run twice: max |difference| of the histories
                          (tolerance 0 on CPU; 1e-6 on CUDA, where reductions may be
                          scheduled differently)
* attention_parity_*      triton_fused vs float64 reference on the model's attention shape
                          (N = 1, M = T, D = 64) for forward, backward, double backward
* meta_grad_parity_*      FULL meta-gradient on the model, each Triton backend vs reference
* fo_vs_fo_strict_*       FO and FO_STRICT meta-gradients are equal, per backend
* full_vs_fo_*            rel_diff of FULL vs FO meta-gradients: clearly non-zero, per backend
* triton_gradgradcheck    gradcheck and gradgradcheck of the Triton op in float64
                          (kernels.gradcheck): the compiled kernels on CUDA; on the CPU
                          Triton's interpreter, in a process of its own when this one
                          has not set TRITON_INTERPRET=1
* nonfinite_guard         status counts of the sweep's runs.csv
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from kernels import attention
from kernels.reference import attention_reference
from phase12.backends import NAMES, device_for
from phase12.config import ConfigError, RunConfig, settings
from phase12.maml import meta_gradient, relative_difference
from phase12.schema import REGIME_FIELDS, RISK_COLUMNS, RUNS_CSV
from phase12.tasks import sample_tasks, task_generator
from phase12.train import build_step, initial_params


def _row(check: str, status: str, value=None, details: str = "") -> dict:
    return {"check": check, "status": status, "value": value, "details": details}


def _triton_available(
    base: RunConfig, backends: tuple[str, ...], backend: str = "triton_fused"
) -> str | None:
    """Why `backend` (a Triton backend) cannot be checked here (None if it can): the
    run configuration's own checks (device, interpreter, the sizes triton_step holds)."""
    if backend not in backends:
        return f"{backend} not among the requested backends"
    try:
        device_for(base.replace(backend=backend))
        return None
    except ConfigError as e:
        return str(e)


def seed_determinism(base: RunConfig, device: torch.device, steps: int = 10) -> dict:
    cfg = base.replace(
        mode="FULL", inner_steps=5, outer_steps=steps, backend="reference", cuda_graph="off"
    )
    histories = []
    for _ in range(2):
        state = build_step([cfg], device)
        for _ in range(steps):
            state()
        histories.append(state.history)
    a, b = histories  # (1, steps, METRICS): loss first
    kind = lambda t: torch.where(t.isnan(), 2.0, t.isinf() * t.sign())  # noqa: E731
    same_nonfinite = torch.equal(kind(a), kind(b))  # NaN at the same steps, inf of one sign
    # Compared at the steps whose loss is finite in both (a non-finite model's accuracy,
    # an argmax of NaN logits, is finite and means nothing), where each metric is finite.
    steps_ok = (torch.isfinite(a[..., :1]) & torch.isfinite(b[..., :1])).expand_as(a)
    finite = steps_ok & torch.isfinite(a) & torch.isfinite(b)
    diff = (a - b)[finite].abs().max().item() if finite.any() else float("nan")
    tol = 0.0 if device.type == "cpu" else 1e-6
    details = f"{device.type}, reference, eager, FULL k=5, {steps} steps twice; tolerance {tol}"
    if not same_nonfinite:
        return _row(
            "seed_determinism", "FAIL", diff, details + "; the runs went non-finite differently"
        )
    if not finite.any():
        details += "; non-finite from the first step in both: nothing finite to compare"
        return _row("seed_determinism", "SKIP", None, details)
    if not steps_ok.all():
        first = int((~steps_ok[..., 0]).any(0).nonzero()[0])
        details += f"; non-finite from step {first} in both alike (compared before it)"
    return _row("seed_determinism", "PASS" if diff <= tol else "FAIL", diff, details)


def attention_parity(
    base: RunConfig, device: torch.device, backends: tuple[str, ...]
) -> list[dict]:
    """On the attention shapes of one outer step: B = meta_batch * examples, N = 1, M = T."""
    why = _triton_available(base, backends)
    names = ("forward", "backward", "double_backward")
    if why:
        return [_row(f"attention_parity_{n}", "SKIP", details=why) for n in names]
    g = torch.Generator(device=device).manual_seed(0)
    batch, seq_len, dim = base.meta_batch * (base.shots + base.queries), base.seq_len, base.dim
    shapes = [(batch, 1, dim), (batch, seq_len, dim), (batch, seq_len, dim)]
    inputs = [torch.randn(s, device=device, generator=g) for s in shapes]
    do = torch.randn(batch, 1, dim, device=device, generator=g)
    us = [torch.randn(s, device=device, generator=g) for s in shapes]

    def passes(backend, dtype):
        q, k, v = (t.to(dtype).requires_grad_() for t in inputs)
        fn = (
            attention_reference
            if backend == "reference"
            else (lambda *a: attention(*a, backend=backend))
        )
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), do.to(dtype), create_graph=True)
        second = torch.autograd.grad(grads, (q, k, v), [u.to(dtype) for u in us])
        return [out], grads, second

    fused, ref = passes("triton_fused", torch.float32), passes("reference", torch.float64)
    tol = 1e-5
    rows = []
    for name, a, b in zip(names, fused, ref, strict=True):
        abs_err = max((x.double() - y).abs().max().item() for x, y in zip(a, b, strict=True))
        rel = max(((x.double() - y).norm() / y.norm()).item() for x, y in zip(a, b, strict=True))
        rows.append(
            _row(
                f"attention_parity_{name}",
                "PASS" if rel < tol else "WARN",
                rel,
                f"float32 triton_fused vs float64 reference, B={batch} N=1 "
                f"M={seq_len} D={dim}: max_abs_err={abs_err:.3e} rel_err={rel:.3e} (tol {tol})",
            )
        )
    return rows


def meta_gradient_checks(
    base: RunConfig, device: torch.device, backends: tuple[str, ...]
) -> list[dict]:
    cfg = base.replace(meta_batch=4)
    params = initial_params(cfg, device)
    tasks = sample_tasks(cfg, task_generator(cfg.seed + 17, device), device)
    kw = dict(steps=cfg.inner_steps, lr=cfg.inner_lr)
    rows, full_by_backend, skipped = [], {}, {}
    triton_backends = [b for b in NAMES if b != "reference"]
    for backend in ("reference", *triton_backends):
        why = _triton_available(cfg, backends, backend) if backend != "reference" else None
        if why:
            skipped[backend] = why
            rows += [
                _row(f"fo_vs_fo_strict_{backend}", "SKIP", details=why),
                _row(f"full_vs_fo_{backend}", "SKIP", details=why),
            ]
            continue
        grads = {
            m: meta_gradient(params, tasks, mode=m, backend=backend, **kw)
            for m in ("FULL", "FO", "FO_STRICT")
        }
        full_by_backend[backend] = grads["FULL"]
        eq = relative_difference(grads["FO"], grads["FO_STRICT"]).item()
        rows.append(
            _row(
                f"fo_vs_fo_strict_{backend}",
                "PASS" if eq < 1e-6 else "FAIL",
                eq,
                f"||g_FO - g_FO_STRICT|| / ||g_FO||, k={cfg.inner_steps}",
            )
        )
        rd = relative_difference(grads["FULL"], grads["FO"]).item()
        rows.append(
            _row(
                f"full_vs_fo_{backend}",
                "PASS" if rd > 1e-2 else "WARN",
                rd,
                f"||g_FULL - g_FO|| / ||g_FULL||, k={cfg.inner_steps} (must be clearly non-zero)",
            )
        )
    for backend in triton_backends:
        check = f"meta_grad_parity_{backend}"
        if backend not in full_by_backend:
            rows.append(_row(check, "SKIP", details=skipped[backend]))
            continue
        rel = relative_difference(full_by_backend["reference"], full_by_backend[backend]).item()
        rows.append(
            _row(
                check,
                "PASS" if rel < 1e-4 else "FAIL",
                rel,
                f"FULL meta-gradient, {backend} vs reference, {cfg.dtype}, k={cfg.inner_steps}",
            )
        )
    return rows


def triton_gradgradcheck(device: torch.device) -> dict:
    """kernels.gradcheck on `device`'s kernels: in this process on CUDA or when the
    interpreter is already on, else in a child process with TRITON_INTERPRET=1."""
    from kernels.common import interpreter_enabled

    if device.type == "cuda" or interpreter_enabled():
        from kernels.gradcheck import check

        where = "compiled kernels on CUDA" if device.type == "cuda" else "CPU interpreter"
        try:
            ok = check(device)
        except Exception as e:  # a kernel that does not build or run fails the check
            return _row("triton_gradgradcheck", "FAIL", False, f"{where}: {type(e).__name__}: {e}")
        return _row(
            "triton_gradgradcheck",
            "PASS" if ok else "FAIL",
            ok,
            f"gradcheck and gradgradcheck, float64, {where}, causal and not",
        )
    # The child imports what this process imports (the same tree, installed or not).
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.gradcheck"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    versions = lines[0] if lines else ""
    if proc.returncode == 0 and lines[-1:] == ["OK"]:
        return _row(
            "triton_gradgradcheck",
            "PASS",
            True,
            f"{versions}: gradcheck and gradgradcheck, float64, CPU interpreter, causal and not",
        )
    if lines[-1:] == ["FAILED"]:
        return _row("triton_gradgradcheck", "FAIL", False, f"{versions}: gradgradcheck failed")
    # The interpreter itself could not run (e.g. Triton 3.6's with NumPy >= 2.4):
    # nothing was checked, which is not the same as a failed check.
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
    return _row(
        "triton_gradgradcheck",
        "SKIP",
        None,
        f"{versions}: the Triton interpreter could not run here: {' '.join(last)}",
    )


def nonfinite_guard(sweep_folder: Path | None) -> dict:
    path = None if sweep_folder is None else sweep_folder / RUNS_CSV
    if path is None or not path.exists():
        return _row("nonfinite_guard", "SKIP", details="no sweep runs.csv to summarise")
    # An empty file (created, then killed before its header) holds no runs either.
    counts = pd.read_csv(path)["status"].value_counts().to_dict() if path.stat().st_size else {}
    if not counts:
        return _row("nonfinite_guard", "SKIP", details="no runs in the sweep's runs.csv yet")
    bad = counts.get("NONFINITE", 0) + counts.get("ERROR", 0)
    return _row(
        "nonfinite_guard",
        "PASS" if bad == 0 else "WARN",
        bad,
        ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
    )


def run_risk_checks(
    base: RunConfig,
    sweep_folder: Path | None = None,
    gradgradcheck: bool = True,
    backends: tuple[str, ...] = ("reference", "triton_fused"),
) -> pd.DataFrame:
    """All checks for the model setting `base`; Triton checks only if requested. Each row
    records the setting (RISK_COLUMNS' "setting"), so that a report can tell checks of
    its runs' setting from others."""
    device = device_for(base)
    rows = [seed_determinism(base, device)]
    rows += attention_parity(base, device, backends)
    rows += meta_gradient_checks(base, device, backends)
    if not gradgradcheck:
        rows.append(
            _row("triton_gradgradcheck", "SKIP", details="switched off (--no-gradgradcheck)")
        )
    elif "triton_fused" not in backends:
        why = _triton_available(base, backends)
        rows.append(_row("triton_gradgradcheck", "SKIP", details=why))
    else:
        rows.append(triton_gradgradcheck(device))
    rows.append(nonfinite_guard(sweep_folder))
    setting = settings(base) | {name: getattr(base, name) for name in REGIME_FIELDS}
    setting["device"] = device.type  # not a setting runs share: the report names it
    return pd.DataFrame([{**r, "setting": json.dumps(setting)} for r in rows], columns=RISK_COLUMNS)
