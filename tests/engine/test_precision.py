"""Low precision: each precision's meta-gradient against float64's within its stated
tolerance (phase12.schema.FLOAT64_TOLERANCE), what the rows say, and what is refused."""

import pytest
import torch
from support import SMALL, fresh

from phase12.config import DTYPES, RunConfig
from phase12.maml import meta_gradient, relative_difference
from phase12.model import apply, init_params
from phase12.schema import FLOAT64_TOLERANCE
from phase12.train import run_experiment

LOW = [d for d in DTYPES if d not in ("float64",)]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mode", ["FULL", "FO"])
def test_the_meta_gradient_is_float64s_within_the_stated_tolerance(dtype, mode):
    config = RunConfig(device="cpu", meta_batch=2, inner_steps=5, dtype=dtype)
    params, tasks = fresh(config.replace(dtype="float64"))
    kw = dict(mode=mode, steps=5, lr=config.inner_lr, backend="reference")
    want = meta_gradient(params, tasks, **kw)
    kw["loss_scale"] = config.loss_scale
    low = lambda t: t.to(config.torch_dtype) if t.is_floating_point() else t  # noqa: E731
    got = meta_gradient(
        {n: low(p) for n, p in params.items()},
        type(tasks)(*map(low, tasks)),
        autocast=config.autocast(torch.device("cpu")),
        **kw,
    )
    error = relative_difference(want, {n: g.double() for n, g in got.items()}).item()
    assert error < FLOAT64_TOLERANCE[dtype]
    if dtype != "float32":  # the precision is really lower, not float32 in disguise
        assert error > FLOAT64_TOLERANCE["float32"]


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("backend", ["triton_fused", "triton_step"])
@pytest.mark.parametrize("dtype", LOW)
def test_the_triton_backends_meet_the_same_tolerances_in_the_interpreter(backend, dtype):
    config = RunConfig(device="cpu", meta_batch=2, inner_steps=2, seq_len=8, dim=8)
    config = config.replace(dtype=dtype, backend=backend)
    params, tasks = fresh(config.replace(dtype="float64"))
    kw = dict(mode="FULL", steps=2, lr=config.inner_lr)
    want = meta_gradient(params, tasks, backend="reference", **kw)
    low = lambda t: t.to(config.torch_dtype) if t.is_floating_point() else t  # noqa: E731
    got = meta_gradient(
        {n: low(p) for n, p in params.items()},
        type(tasks)(*map(low, tasks)),
        backend=backend,
        autocast=config.autocast(torch.device("cpu")),
        loss_scale=config.loss_scale,
        **kw,
    )
    error = relative_difference(want, {n: g.double() for n, g in got.items()}).item()
    assert error < FLOAT64_TOLERANCE[dtype]
    if dtype != "float32":
        assert error > FLOAT64_TOLERANCE["float32"]


def test_float16_compute_needs_its_loss_scale_at_long_sequences():
    """At T = 256 the attention parameters' gradients reach float16's subnormals: without
    the loss scale the meta-gradient misses the tolerance, with it (2**10) it is within.
    At the default meta-batch of 16 both sides hold by a wide margin on every draw; with
    fewer tasks an unscaled draw can land just inside the tolerance."""
    config = RunConfig(device="cpu", inner_steps=5, seq_len=256)
    config = config.replace(dtype="autocast_float16")
    params, tasks = fresh(config.replace(dtype="float64"))
    kw = dict(mode="FULL", steps=5, lr=config.inner_lr, backend="reference")
    want = meta_gradient(params, tasks, **kw)
    narrow = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731
    params32, tasks32 = {n: narrow(p) for n, p in params.items()}, type(tasks)(*map(narrow, tasks))

    def error(scale):
        got = meta_gradient(
            params32, tasks32, autocast=config.autocast(torch.device("cpu")), loss_scale=scale, **kw
        )
        return relative_difference(want, {n: g.double() for n, g in got.items()}).item()

    assert config.loss_scale == 2.0**10
    assert error(1.0) > FLOAT64_TOLERANCE["autocast_float16"] > error(config.loss_scale)


@pytest.mark.parametrize("dtype", ["bfloat16", "autocast_bfloat16", "autocast_float16"])
def test_a_low_precision_run_trains_and_says_its_precision(dtype):
    config = SMALL.replace(dtype=dtype, outer_steps=4, metric_window=2)
    row = run_experiment(config).row
    assert row["status"] == "OK"
    assert row["dtype"] == dtype and row["run_id"].endswith(dtype)
    assert row["compute_dtype"] == dtype.removeprefix("autocast_")
    assert row["autocast"] == dtype.startswith("autocast")
    assert row["loss_scale"] == {"autocast_float16": 2.0**10}.get(dtype, 1.0)
    assert 0 < row["float64_meta_grad_error"] < FLOAT64_TOLERANCE[dtype]


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16])
def test_under_autocast_the_logits_of_adapted_parameters_are_in_the_compute_dtype(compute):
    """Linear layers in the compute dtype, as the README's precision table says: for the
    adapted (per-task, batched) parameters of the query pass too, not only the meta-
    parameters."""
    params = init_params(8, 3, torch.Generator().manual_seed(0))
    adapted = {n: torch.stack([p, 2 * p]) for n, p in params.items()}
    x = torch.randn(2, 4, 5, 8)
    with torch.autocast("cpu", dtype=compute):
        assert apply(params, x[0]).dtype == compute
        assert torch.func.vmap(apply)(adapted, x).dtype == compute


def test_float16_parameters_throughout_go_non_finite_and_are_recorded():
    """Adam's second moment (1 - beta2) g^2 underflows float16, and its eps (1e-8) is 0
    there: the first update divides by zero. The run says so instead of hiding it."""
    row = run_experiment(SMALL.replace(dtype="float16", outer_steps=4)).row
    assert row["status"] == "NONFINITE" and row["nonfinite_step"] is not None


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", ["bfloat16", "autocast_float16"])
def test_triton_step_trains_in_low_precision(dtype):
    config = SMALL.replace(backend="triton_step", dtype=dtype, outer_steps=2, metric_window=1)
    row = run_experiment(config).row
    assert row["status"] == "OK" and row["compute_dtype"] == dtype.removeprefix("autocast_")
    assert 0 < row["float64_meta_grad_error"] < FLOAT64_TOLERANCE[dtype]


def test_run_ids_name_the_shape_and_precision_only_when_not_the_defaults():
    assert RunConfig().run_id == "reference_FULL_k20_seed0"
    changed = RunConfig(seq_len=128, dim=32, dtype="autocast_bfloat16")
    assert changed.run_id == "reference_FULL_k20_seed0_T128_D32_autocast_bfloat16"
