"""The fused inner-step kernels in float32 on CUDA against the float64 reference model."""

import pytest
import torch

from phase12.config import PARAMS
from phase12.fused_step.launch import (
    support_hvp,
    support_loss_and_grad,
    support_step,
    support_step_and_attention,
)
from phase12.model import init_params, loss

pytestmark = pytest.mark.gpu


def rel_err(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def reference_loss(params, x, y):
    return loss(dict(zip(PARAMS, params, strict=True)), x, y)


# (tasks, n, T, D, C): the Phase 12 task, long sequences, tails, and 32- and 64-row blocks
# (the task kernels' dots: tf32x3 up to 32 rows, ieee at 64: launch.dot_precision).
SHAPES = [
    (16, 16, 32, 64, 5),
    (4, 16, 512, 64, 5),
    (2, 8, 4096, 64, 5),
    (3, 5, 33, 24, 3),
    (2, 32, 17, 64, 7),
    (2, 64, 17, 64, 7),
]


@pytest.mark.parametrize("tasks,n,t,d,c", SHAPES)
def test_step_kernels_float32_match_float64_reference(tasks, n, t, d, c, kernel_set):
    g = torch.Generator().manual_seed(7)
    params64 = tuple(
        torch.stack([init_params(d, c, g, dtype=torch.float64)[k] for _ in range(tasks)]).cuda()
        for k in PARAMS
    )
    x64 = torch.randn(tasks, n, t, d, generator=g, dtype=torch.float64).cuda()
    y = torch.randint(0, c, (tasks, n), generator=g).cuda()
    v64 = tuple(torch.randn_like(p) for p in params64)
    params, x, v = (tuple(p.float() for p in params64), x64.float(), tuple(w.float() for w in v64))

    losses, _, grads = support_loss_and_grad(params, x, y)
    steps = support_step(params, x, y, 0.4)
    hvps = support_hvp(params, x, y, v, 0.0, 1.0)
    attention = support_step_and_attention(params, x, y, 0.4)[1]  # second-order MAML's
    assert (attention is None) == (kernel_set == "example")
    saved_hvps = support_hvp(params, x, y, v, 0.0, 1.0, attention=attention)
    grad_fn = torch.func.vmap(torch.func.grad(reference_loss))
    ref_grads = grad_fn(params64, x64, y)
    _, ref_hvps = torch.func.jvp(lambda p: grad_fn(p, x64, y), (params64,), (v64,))
    ref_losses = torch.func.vmap(reference_loss)(params64, x64, y)
    assert rel_err(losses, ref_losses) < 1e-5
    for name, got, want in zip(PARAMS, grads, ref_grads, strict=True):
        assert rel_err(got, want) < 1e-5, name
    for name, got, p, want in zip(PARAMS, steps, params64, ref_grads, strict=True):
        assert rel_err(got, p - 0.4 * want) < 1e-5, name
    for name, got, saved, want in zip(PARAMS, hvps, saved_hvps, ref_hvps, strict=True):
        assert rel_err(got, want) < 1e-5 and rel_err(saved, want) < 1e-5, name


@pytest.mark.parametrize("operand", [torch.bfloat16, torch.float16])
def test_step_kernels_round_what_they_read_as_autocast_would(operand, kernel_set):
    """Under autocast: the float64 model at x, W and V rounded to `operand` (torch's
    rounding: to nearest, ties to even); the update and alpha V take W and V as they are."""
    tasks, n, t, d, c = 4, 16, 256, 64, 5
    g = torch.Generator().manual_seed(11)
    params = tuple(
        torch.stack([init_params(d, c, g)[k] for _ in range(tasks)]).cuda() for k in PARAMS
    )
    x = torch.randn(tasks, n, t, d, generator=g).cuda()
    y = torch.randint(0, c, (tasks, n), generator=g).cuda()
    v = tuple(torch.randn_like(p) for p in params)
    rounded = lambda ts: tuple(w.to(operand).double() for w in ts)  # noqa: E731
    grads = support_loss_and_grad(params, x, y, operand)[2]
    steps = support_step(params, x, y, 0.4, operand)
    hvps = support_hvp(params, x, y, v, 0.5, 1.0, operand)
    attention = support_step_and_attention(params, x, y, 0.4, operand)[1]
    assert (attention is None) == (kernel_set == "example")
    saved_hvps = support_hvp(params, x, y, v, 0.5, 1.0, operand, attention)
    grad_fn = torch.func.vmap(torch.func.grad(reference_loss))
    (x64,) = rounded([x])
    ref_grads = grad_fn(rounded(params), x64, y)
    _, ref_hvps = torch.func.jvp(lambda p: grad_fn(p, x64, y), (rounded(params),), (rounded(v),))
    for name, got, want, p, w, hv, saved, want_hv in zip(
        PARAMS, grads, ref_grads, params, v, hvps, saved_hvps, ref_hvps, strict=True
    ):
        assert rel_err(got, want) < 1e-5, name
        assert rel_err(steps[PARAMS.index(name)], p.double() - 0.4 * want) < 1e-5, name
        assert rel_err(hv, 0.5 * w.double() + want_hv) < 1e-5, name
        assert rel_err(saved, 0.5 * w.double() + want_hv) < 1e-5, name
