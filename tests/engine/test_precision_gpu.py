"""Low precision on the GPU: each backend's meta-gradient in each precision against the
float64 reference within the stated tolerance, and a graphed low-precision run."""

import pytest
import torch

from phase12.config import RunConfig
from phase12.maml import meta_gradient, relative_difference
from phase12.model import init_params
from phase12.schema import FLOAT64_TOLERANCE
from phase12.tasks import sample_tasks
from phase12.train import run_experiment

pytestmark = pytest.mark.gpu
PRECISIONS = ["float32", "bfloat16", "float16", "autocast_bfloat16", "autocast_float16"]


@pytest.mark.parametrize("backend", ["reference", "triton_fused", "triton_step"])
@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("seq_len", [32, 256])
def test_meta_gradient_is_float64s_within_the_tolerance(backend, dtype, seq_len):
    device = torch.device("cuda")
    config = RunConfig(device="cuda", meta_batch=4, inner_steps=5, seq_len=seq_len, dtype=dtype)
    seed = torch.randint(0, 2**31, ()).item()
    params = init_params(
        64, 5, torch.Generator().manual_seed(seed), device=device, dtype=config.torch_dtype
    )
    tasks = sample_tasks(config, torch.Generator(device).manual_seed(seed), device)
    cast = lambda t, d: t.to(d) if t.is_floating_point() else t  # noqa: E731
    kw = dict(mode="FULL", steps=5, lr=config.inner_lr, loss_scale=config.loss_scale)
    want = meta_gradient(
        {n: cast(p, torch.float64) for n, p in params.items()},
        type(tasks)(*(cast(t, torch.float64) for t in tasks)),
        backend="reference",
        **kw | dict(loss_scale=1.0),
    )
    got = meta_gradient(
        params,
        tasks,
        backend=backend,
        autocast=config.autocast(device),
        **kw,
    )
    error = relative_difference(want, {n: g.double() for n, g in got.items()}).item()
    assert error < FLOAT64_TOLERANCE[dtype], f"seed {seed}"


@pytest.mark.parametrize("backend", ["triton_fused", "triton_step"])
@pytest.mark.parametrize("dtype", ["bfloat16", "autocast_bfloat16", "autocast_float16"])
def test_a_low_precision_run_replays_as_a_cuda_graph(backend, dtype):
    config = RunConfig(
        device="cuda",
        backend=backend,
        dtype=dtype,
        inner_steps=2,
        outer_steps=20,
        cuda_graph="on",
    )
    row = run_experiment(config).row
    assert row["status"] == "OK" and row["cuda_graph"]
    assert row["float64_meta_grad_error"] < FLOAT64_TOLERANCE[dtype]
