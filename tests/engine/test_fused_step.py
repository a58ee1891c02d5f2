"""The `triton_step` backend (fused inner-step kernels) against the reference model, in
the CPU interpreter, in float64, on fresh random inputs.

The reference is torch.func on phase12.model with PyTorch attention: its gradient for
the step kernel, torch.func.jvp of that gradient for the Hessian-vector product kernel,
and the engine's meta-gradients with backend="reference".
"""

import pytest
import torch
from support import SMALL, TINY, fresh, loop_meta_gradient, rel

from phase12.backends import device_for
from phase12.config import PARAMS, ConfigError
from phase12.fused_step import query_metrics, sgd_step
from phase12.fused_step.launch import (
    support_hvp,
    support_loss_and_grad,
    support_step,
    support_step_and_attention,
)
from phase12.maml import meta_batch_metrics, meta_gradient
from phase12.model import apply, init_params, loss

pytestmark = pytest.mark.usefixtures("interpreter")

F64 = torch.float64


def problem(tasks, n, t, d, c, shared=False):
    """Parameters (one set per task, or one set expanded over the tasks) and data, drawn
    from a fresh seed, printed so that a failing test's report shows it."""
    seed = torch.randint(0, 2**31, ()).item()
    print(f"problem{(tasks, n, t, d, c, shared)}: seed {seed}")
    g = torch.Generator().manual_seed(seed)
    sets = [init_params(d, c, g, dtype=F64) for _ in range(1 if shared else tasks)]
    params = tuple(
        torch.stack([s[name] for s in sets]).expand(tasks, *sets[0][name].shape) for name in PARAMS
    )
    x = torch.randn(tasks, n, t, d, generator=g, dtype=F64)
    y = torch.randint(0, c, (tasks, n), generator=g)
    return params, x, y


def reference_loss(params, x, y):
    return loss(dict(zip(PARAMS, params, strict=True)), x, y)


def assert_tuples_close(actual, expected, rtol=1e-11):
    for a, e, name in zip(actual, expected, PARAMS, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item(), msg=name)


# (n examples, T positions, D, C, shared parameters): n below, at and above the 16-row
# block, T with and without a tail block (the interpreter walks 2 positions per block), D
# and C padded to 16.
SHAPES = [(5, 7, 16, 5, False), (3, 6, 8, 3, True), (17, 5, 32, 5, False), (16, 1, 4, 2, True)]


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty filled with NaN: a kernel output or workspace element read before the
    kernels write it shows up as NaN (on the CPU, fresh memory is often zeros)."""
    empty = torch.empty

    def nan_filled(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_filled)


@pytest.mark.parametrize("n,t,d,c,shared", SHAPES)
def test_step_kernels_equal_the_reference_model(n, t, d, c, shared, kernel_set, nan_empty):
    params, x, y = problem(3, n, t, d, c, shared)
    lr, alpha, beta = 0.37, 0.6, -1.3
    losses, accuracy, grads = support_loss_and_grad(params, x, y)
    steps = support_step(params, x, y, lr)
    v = tuple(torch.randn_like(p) for p in params)
    hvps = support_hvp(params, x, y, v, alpha, beta)
    for b in range(x.shape[0]):
        p, vb = tuple(q[b] for q in params), tuple(w[b] for w in v)
        ref_grad = torch.func.grad(reference_loss)(p, x[b], y[b])
        task_grad = torch.func.grad(lambda q, xb=x[b], yb=y[b]: reference_loss(q, xb, yb))
        _, ref_hv = torch.func.jvp(task_grad, (p,), (vb,))
        logits = apply(dict(zip(PARAMS, p, strict=True)), x[b])
        torch.testing.assert_close(losses[b], reference_loss(p, x[b], y[b]), rtol=1e-12, atol=0)
        torch.testing.assert_close(accuracy[b], (logits.argmax(-1) == y[b]).to(F64).mean())
        assert_tuples_close(tuple(g[b] for g in grads), ref_grad)
        assert_tuples_close(
            tuple(s[b] for s in steps), tuple(q - lr * r for q, r in zip(p, ref_grad, strict=True))
        )
        expected = tuple(alpha * w + beta * r for w, r in zip(vb, ref_hv, strict=True))
        assert_tuples_close(tuple(h[b] for h in hvps), expected)


def attention_of_the_model(params, x, y):
    """Each example's attention weights p_t = softmax_t(k_t . q s) and the centred score
    gradient dL/ds_t / p_t = dp_t - delta, written out from the model's definition."""
    wq, wk, wv, wc, bc = params
    q = x[:, 0] @ wq.T
    scores = torch.einsum("ntd,nd->nt", x @ wk.T, q) * x.shape[-1] ** -0.5

    def loss_of_scores(s):
        h = torch.einsum("nt,ntd->nd", s.softmax(-1), x @ wv.T)
        return torch.nn.functional.cross_entropy(h @ wc.T + bc, y)

    return scores.softmax(-1), torch.func.grad(loss_of_scores)(scores) / scores.softmax(-1)


@pytest.mark.parametrize("kernel_set", ["task"], indirect=True)
@pytest.mark.parametrize("n,t,d,c,shared", SHAPES)
def test_saved_attention_is_the_models_and_the_hvp_reads_it(n, t, d, c, shared, kernel_set,
                                                            nan_empty):  # fmt: skip
    params, x, y = problem(3, n, t, d, c, shared)
    lr, alpha, beta = 0.37, 0.6, -1.3
    steps, (p, dp_centred) = support_step_and_attention(params, x, y, lr)
    for a, b in zip(steps, support_step(params, x, y, lr), strict=True):
        assert torch.equal(a, b)
    v = tuple(torch.randn_like(w) for w in params)
    recomputed = support_hvp(params, x, y, v, alpha, beta)
    read = support_hvp(params, x, y, v, alpha, beta, attention=(p, dp_centred))
    assert_tuples_close(read, recomputed)
    for b in range(x.shape[0]):
        want_p, want_dp = attention_of_the_model(tuple(w[b] for w in params), x[b], y[b])
        torch.testing.assert_close(p[b], want_p, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(dp_centred[b], want_dp, rtol=1e-10, atol=1e-12)
    # What is read is used: other attention weights, or other score gradients, give
    # another HVP (shifted, as dp - delta is 0 at T = 1).
    for other in ((p * 0.5, dp_centred), (p, dp_centred + 1.0)):
        changed = support_hvp(params, x, y, v, alpha, beta, attention=other)
        assert any((a - b).abs().max() > 1e-6 for a, b in zip(changed, read, strict=True))


@pytest.mark.parametrize("kernel_set", ["task"], indirect=True)
def test_saved_attention_of_the_wrong_shape_or_dtype_is_refused(kernel_set):
    params, x, y = problem(2, 3, 4, 8, 3)
    v = params
    _, (p, dp) = support_step_and_attention(params, x, y, 0.1)
    for bad in ((p[:, :, :-1], dp), (p, dp.float())):
        with pytest.raises(ValueError, match="saved attention must be"):
            support_hvp(params, x, y, v, 1.0, 1.0, attention=bad)


def reference_step_vjp(params, x, y, lr, w):
    """w - lr H w per task, H the reference model's support-loss Hessian at params."""
    task_grad = torch.func.grad(reference_loss)
    hw = torch.func.vmap(lambda p, xb, yb, wb: torch.func.jvp(
        lambda q: task_grad(q, xb, yb), (p,), (wb,))[1])(params, x, y, w)  # fmt: skip
    return tuple(wi - lr * h for wi, h in zip(w, hw, strict=True))


@pytest.mark.parametrize("kernel_set", ["task"], indirect=True)
def test_the_step_backward_reads_the_attention_its_forward_saved(kernel_set, monkeypatch):
    from phase12.fused_step import functions, launch

    params, x, y = problem(2, 4, 5, 8, 3)
    w = tuple(torch.randn_like(p) for p in params)

    def vjp():
        _, pullback = torch.func.vjp(
            lambda p: sgd_step(dict(zip(PARAMS, p, strict=True)), x, y, 0.5,
                               second_order=True), params)  # fmt: skip
        return pullback(dict(zip(PARAMS, w, strict=True)))[0]

    expected = reference_step_vjp(params, x, y, 0.5, w)
    assert_tuples_close(vjp(), expected)

    def halved(*args):
        steps, (p, dp_centred) = launch.support_step_and_attention(*args)
        return steps, (p * 0.5, dp_centred)

    monkeypatch.setattr(functions, "support_step_and_attention", halved)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(vjp(), expected, strict=True))


@pytest.mark.parametrize("kernel_set", ["task"], indirect=True)
def test_an_unrecorded_step_saves_no_attention(kernel_set, monkeypatch):
    """FO_STRICT's inner loop runs without autograd recording: nothing would read it."""
    from phase12.fused_step import functions

    def refuse(*args):
        raise AssertionError("saved attention that no backward reads")

    monkeypatch.setattr(functions, "support_step_and_attention", refuse)
    params, x, y = problem(1, 3, 4, 8, 3)
    with torch.no_grad():
        sgd_step(dict(zip(PARAMS, params, strict=True)), x, y, 0.5, second_order=True)


@pytest.mark.parametrize("kernel_set", ["task"], indirect=True)
def test_vmapped_backwards_through_the_saved_attention(kernel_set, monkeypatch):
    """The backward run under vmap: over tasks (the attention batched), over cotangents
    (the attention shared by every cotangent), and grad of grad of the query loss (no
    attention)."""
    from phase12.fused_step import functions

    read = []  # per HVP launch: whether it was given saved attention
    hvp = functions.support_hvp
    monkeypatch.setattr(
        functions, "support_hvp", lambda *a: read.append(a[-1] is not None) or hvp(*a)
    )
    params, x, y = problem(3, 4, 5, 8, 3)
    w = tuple(torch.randn_like(p) for p in params)
    expected = reference_step_vjp(params, x, y, 0.5, w)

    def inner(p, xb, yb, wb):  # <phi(p), w> for one task
        phi = sgd_step(dict(zip(PARAMS, p, strict=True)), xb, yb, 0.5, second_order=True)
        return sum((phi[n] * wi).sum() for n, wi in zip(PARAMS, wb, strict=True))

    assert_tuples_close(torch.func.vmap(torch.func.grad(inner))(params, x, y, w), expected)
    assert read == [True]

    def step(p):
        return tuple(sgd_step(dict(zip(PARAMS, p, strict=True)), x, y, 0.5,
                              second_order=True).values())  # fmt: skip

    _, pullback = torch.func.vjp(step, params)
    cotangents = tuple(torch.stack([wi, 2 * wi]) for wi in w)
    both = torch.func.vmap(pullback)(cotangents)[0]
    assert_tuples_close(tuple(b[0] for b in both), expected)
    twice = reference_step_vjp(params, x, y, 0.5, tuple(2 * wi for wi in w))
    assert_tuples_close(tuple(b[1] for b in both), twice)
    assert read == [True, True]

    def directional(p, xb, yb, d):  # <grad of the query loss, d>: its gradient is H d
        g = torch.func.grad(lambda q: query_metrics(dict(zip(PARAMS, q, strict=True)), xb,
                                                 yb)[0])(p)  # fmt: skip
        return sum((gi * di).sum() for gi, di in zip(g, d, strict=True))

    hd = torch.func.vmap(torch.func.grad(directional))(params, x, y, w)
    # reference_step_vjp with lr = -1 is w + H w.
    want = tuple(e - wi for e, wi in zip(reference_step_vjp(params, x, y, -1.0, w), w, strict=True))
    assert_tuples_close(hd, want)
    assert read == [True, True, False]


@pytest.mark.parametrize("kernel_set", ["example"], indirect=True)
def test_the_example_kernels_save_no_attention_and_refuse_it(kernel_set):
    params, x, y = problem(2, 3, 4, 8, 3)
    steps, attention = support_step_and_attention(params, x, y, 0.1)
    assert attention is None
    for a, b in zip(steps, support_step(params, x, y, 0.1), strict=True):
        assert torch.equal(a, b)
    p = torch.ones(x.shape[:-1], dtype=x.dtype)
    with pytest.raises(ValueError, match="read only by the task kernels"):
        support_hvp(params, x, y, params, 1.0, 1.0, attention=(p, p))


@pytest.mark.parametrize("operand", [torch.bfloat16, torch.float16])
def test_kernels_compute_with_what_they_read_rounded_to_the_operand_dtype(operand, kernel_set):
    """Under autocast (float32 inputs): the gradient and the HVP are the float64 model's at
    x, W and V rounded to `operand`; the update and alpha V take W and V as they are."""
    params, x, y = problem(2, 5, 7, 16, 5)
    params, x = tuple(p.float() for p in params), x.float()
    v = tuple(torch.randn_like(p) for p in params)
    lr, alpha, beta = 0.37, 0.6, -1.3
    wide = lambda ts: tuple(t.double() for t in ts)  # noqa: E731
    rounded = lambda ts: wide(t.to(operand) for t in ts)  # noqa: E731
    losses, _, grads = support_loss_and_grad(params, x, y, operand)
    steps = support_step(params, x, y, lr, operand)
    hvps = support_hvp(params, x, y, v, alpha, beta, operand)
    for b in range(x.shape[0]):
        p, vb, (xb,) = tuple(q[b] for q in params), tuple(w[b] for w in v), rounded([x[b]])
        ref_grad = torch.func.grad(reference_loss)(rounded(p), xb, y[b])
        task_grad = torch.func.grad(lambda q, xb=xb, yb=y[b]: reference_loss(q, xb, yb))
        _, ref_hv = torch.func.jvp(task_grad, (rounded(p),), (rounded(vb),))
        want_loss = reference_loss(rounded(p), xb, y[b])
        torch.testing.assert_close(losses[b].double(), want_loss, rtol=1e-6, atol=0)
        assert_tuples_close(wide(g[b] for g in grads), ref_grad, rtol=1e-5)
        want_step = tuple(q - lr * r for q, r in zip(wide(p), ref_grad, strict=True))
        assert_tuples_close(wide(s[b] for s in steps), want_step, rtol=1e-5)
        want_hvp = tuple(alpha * w + beta * r for w, r in zip(wide(vb), ref_hv, strict=True))
        assert_tuples_close(wide(h[b] for h in hvps), want_hvp, rtol=1e-5)
        # The backwards keep the operand dtype: the step's VJP is v - lr H v and the query
        # loss's gradient dL/dW, both at the rounded inputs.
        leaves = tuple(q.clone().requires_grad_() for q in p)
        named = dict(zip(PARAMS, leaves, strict=True))
        phi = sgd_step(named, x[b], y[b], lr, second_order=True, operand=operand)
        vjp = torch.autograd.grad(list(phi.values()), leaves, list(vb))
        want_vjp = tuple(w - lr * r for w, r in zip(wide(vb), ref_hv, strict=True))
        assert_tuples_close(wide(vjp), want_vjp, rtol=1e-5)
        query_grad = torch.autograd.grad(query_metrics(named, x[b], y[b], operand)[0], leaves)
        assert_tuples_close(wide(query_grad), ref_grad, rtol=1e-5)
        unrounded = wide(g[b] for g in support_loss_and_grad(params, x, y)[2])
        pairs = zip(unrounded, ref_grad, strict=True)
        misses = [(a - r).abs().max() > 1e-5 * r.abs().max() for a, r in pairs]
        assert any(misses)  # without the rounding the comparison above would fail


def test_the_bfloat16_rounding_keeps_a_nan_a_nan(kernel_set):
    """A non-finite inner step must stay non-finite when the next kernel reads it."""
    params, x, y = problem(1, 3, 4, 16, 3)
    params = tuple(p.float().contiguous() for p in params)
    params[0].view(torch.int32).view(-1)[0] = 0x7FFFFFFF  # the NaN CUDA's arithmetic makes
    loss_, _, grads = support_loss_and_grad(params, x.float(), y, torch.bfloat16)
    assert loss_.isnan().all() and all(g.isnan().any() for g in grads[:3])


def test_half_parameters_get_float32_gradients_of_the_loss_and_half_steps():
    params, x, y = problem(2, 3, 4, 8, 3)
    half, xh = tuple(p.to(torch.bfloat16) for p in params), x.to(torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in support_loss_and_grad(half, xh, y)[2])
    assert all(s.dtype == torch.bfloat16 for s in support_step(half, xh, y, 0.1))


def tiny_problem():
    """Few enough numbers for numerical gradient checks (35 parameters)."""
    (params, x, y) = problem(1, 3, 3, 3, 2)
    return tuple(p[0].clone().requires_grad_() for p in params), x[0], y[0]


def test_sgd_step_gradcheck_to_third_order(kernel_set):
    """First order: the HVP kernel (reading the step's saved attention with the task
    kernels); gradgradcheck: its backward (order 3, reference)."""
    params, x, y = tiny_problem()

    def step(*p):
        phi = sgd_step(dict(zip(PARAMS, p, strict=True)), x, y, 0.7, second_order=True)
        return tuple(phi.values())

    assert torch.autograd.gradcheck(step, params)
    assert torch.autograd.gradgradcheck(step, params)


def test_query_metrics_gradcheck_to_second_order():
    params, x, y = tiny_problem()

    def query(*p):
        return query_metrics(dict(zip(PARAMS, p, strict=True)), x, y)[0]

    assert torch.autograd.gradcheck(query, params)
    assert torch.autograd.gradgradcheck(query, params)


def test_first_order_step_backward_is_the_identity():
    params, x, y = tiny_problem()
    phi = sgd_step(dict(zip(PARAMS, params, strict=True)), x, y, 0.7, second_order=False)
    v = [torch.randn_like(p) for p in phi.values()]
    back = torch.autograd.grad(list(phi.values()), params, v)
    for b, w in zip(back, v, strict=True):
        assert torch.equal(b, w)


def test_nested_torch_func_grad_through_query_metrics_and_vmap(kernel_set):
    """grad(grad) of the query loss after a fused step, vmapped over tasks, equals the
    reference model's."""
    params, x, y = problem(2, 4, 5, 8, 3)
    theta = tuple(p[0] for p in params)
    direction = tuple(torch.randn_like(p) for p in theta)

    def objective(backend):
        def per_task(p, xb, yb):
            named = dict(zip(PARAMS, p, strict=True))
            if backend == "triton_step":
                phi = sgd_step(named, xb, yb, 0.5, second_order=True)
                return query_metrics(phi, xb, yb)[0]
            grads = torch.func.grad(loss)(named, xb, yb)
            phi = {n: named[n] - 0.5 * grads[n] for n in PARAMS}
            return loss(phi, xb, yb)

        def mean_loss(p):
            return torch.func.vmap(per_task, in_dims=(None, 0, 0))(p, x, y).mean()

        def directional(p):  # <grad, direction>: its gradient is a Hessian-vector product
            g = torch.func.grad(mean_loss)(p)
            return sum((gi * di).sum() for gi, di in zip(g, direction, strict=True))

        return torch.func.grad(directional)(theta)

    assert_tuples_close(objective("triton_step"), objective("reference"), rtol=1e-10)


@pytest.mark.parametrize("mode", ["FULL", "FO", "FO_STRICT"])
def test_engine_meta_gradient_equals_reference(mode, kernel_set):
    params, tasks = fresh(SMALL)
    kw = dict(steps=SMALL.inner_steps, lr=SMALL.inner_lr)
    fused = meta_gradient(params, tasks, mode=mode, backend="triton_step", **kw)
    assert rel(meta_gradient(params, tasks, mode=mode, backend="reference", **kw), fused) < 1e-10
    if mode == "FULL":  # and the independent loop of test_engine, to 1e-10 as required
        assert (
            rel(loop_meta_gradient(params, tasks, SMALL.inner_steps, SMALL.inner_lr), fused) < 1e-10
        )
    ref_metrics = meta_batch_metrics(params, tasks, mode=mode, backend="reference", **kw)
    fused_metrics = meta_batch_metrics(params, tasks, mode=mode, backend="triton_step", **kw)
    torch.testing.assert_close(fused_metrics, ref_metrics, rtol=1e-12, atol=1e-14)


def test_seed_batched_run_equals_the_reference_run():
    """Two seeds as one computation (nested vmap: the task stride and the seed stride)."""
    from phase12.train import run_experiments

    cfg = SMALL.replace(outer_steps=3, metric_window=2)
    configs = [cfg.replace(seed=s) for s in (0, 5)]
    fused = run_experiments([c.replace(backend="triton_step") for c in configs])
    for config, result in zip(configs, fused, strict=True):
        assert result.row["status"] == "OK" and result.row["seeds_batched"] == 2
        assert result.row["sdpa_input_gradgrad_ok"] is True
        reference = run_experiments([config])[0]
        for name in ("loss", "acc", "attn_grad_norm_q", "attn_grad_norm_k", "attn_grad_norm_v"):
            torch.testing.assert_close(
                result.history[name], reference.history[name], rtol=1e-10, atol=0
            )


def test_unsupported_sizes_are_refused_before_any_work():
    with pytest.raises(ConfigError, match="triton_step.*examples per task"):
        device_for(TINY.replace(backend="triton_step", queries=65))
    with pytest.raises(ConfigError, match="triton_step.*D <= 64"):
        device_for(TINY.replace(backend="triton_step", dim=128))
    with pytest.raises(ConfigError, match="triton_step.*classes"):
        device_for(TINY.replace(backend="triton_step", num_classes=17))
    params, x, y = problem(2, 3, 4, 8, 3)
    with pytest.raises(ValueError, match="int64"):
        support_step(params, x, y.int(), 0.1)
    with pytest.raises(ValueError, match="shape"):
        support_step(params, x[:1], y[:1], 0.1)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., n, T, D\)"):
        support_step(params, x[0, 0], y, 0.1)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        no_classes = (*params[:3], params[3][:, :0], params[4][:, :0])
        support_step(no_classes, x, y, 0.1)
    with pytest.raises(ValueError, match="examples must be >= 1"):
        support_step(params, x[:, :0], y[:, :0], 0.1)
    with pytest.raises(ValueError, match="x's dtype and device"):
        support_step(tuple(p.float() for p in params), x, y, 0.1)
    with pytest.raises(ValueError, match="operand rounds float32 inputs"):
        support_step(params, x, y, 0.1, operand=torch.bfloat16)  # float64 inputs


def test_outside_the_interpreter_the_cpu_and_float64_are_refused(monkeypatch):
    params, x, y = problem(2, 3, 4, 8, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA, or on the CPU in Triton's interpreter"):
        support_step(params, x, y, 0.1)
    if torch.cuda.is_available():
        cuda = tuple(p.cuda() for p in params)
        with pytest.raises(ValueError, match="float64 runs only in Triton's interpreter"):
            support_step(cuda, x.cuda(), y.cuda(), 0.1)
