"""Curvature ablations of FULL, on every backend that has them, against an independent
reference: MAML written with plain autograd and a loop over tasks, its attention a
custom autograd.Function whose backward detaches the inputs each ablation drops (no
torch.func, no kernels, no phase12.maml). float64, fresh random inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from support import SMALL, fresh, rel

from phase12.backends import device_for
from phase12.config import ABLATIONS, ConfigError
from phase12.maml import meta_gradient

ATTENTION_ABLATIONS = [a for a, c in ABLATIONS.items() if c.attention != "exact"]


@pytest.fixture(params=["reference", "triton_fused"])
def backend(request):
    """Each backend with ablation switches (Triton in the CPU interpreter)."""
    if request.param != "reference":
        request.getfixturevalue("interpreter")
    return request.param


def backward(q, k, v, do):
    """dq, dk, dv of softmax(q k^T / sqrt(D)) v at cotangent do, in plain ops."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.softmax(s, -1)
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) / math.sqrt(q.shape[-1])
    return ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do


def frozen_stats_backward(q, k, v, do):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.exp(s - torch.logsumexp(s, -1, keepdim=True).detach())
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) / math.sqrt(q.shape[-1])
    return ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do


def policy_backward(ablation, q, k, v, do):
    """The backward, with what `ablation` drops from its own derivatives detached."""
    d = lambda *t: [x.detach() for x in t]  # noqa: E731
    if ablation == "none":
        return backward(q, k, v, do)
    if ablation == "no_attention_curvature":  # constant in q, k, v; linear in do
        return backward(*d(q, k, v), do)
    if ablation == "once_differentiable_attention":  # constant in everything
        return backward(*d(q, k, v, do))
    if ablation == "no_attention_value_curvature":  # keeps (q, k) x (q, k)
        dq, dk, _ = backward(q, k, *d(v), do)
        return dq, dk, backward(*d(q, k), v, do)[2]
    if ablation == "no_attention_score_curvature":  # keeps (q, k) x v and v x (q, k)
        dq, dk, _ = backward(*d(q, k), v, do)
        return dq, dk, backward(q, k, *d(v), do)[2]
    if ablation == "frozen_softmax_stats":
        return frozen_stats_backward(q, k, v, do)
    raise AssertionError(ablation)


class LoopAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ablation):
        ctx.save_for_backward(q, k, v)
        ctx.ablation = ablation
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return torch.softmax(s, -1) @ v

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            return (*policy_backward(ctx.ablation, q, k, v, do), None)


def loop_model(p, x, ablation):
    q = x[:, :1] @ p["Wq"].T  # (n, 1, D)
    k, v = x @ p["Wk"].T, x @ p["Wv"].T
    h = LoopAttention.apply(q, k, v, ablation)[:, 0]
    return h @ p["Wc"].T + p["bc"]


def loop_meta_gradient(params, tasks, steps, lr, ablation):
    curvature = ABLATIONS[ablation]
    attention_policy = ablation if curvature.attention != "exact" else "none"
    theta = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    total = 0
    for b in range(tasks.support_x.shape[0]):
        phi = dict(theta)
        for _ in range(steps):
            logits = loop_model(phi, tasks.support_x[b], attention_policy)
            loss = F.cross_entropy(logits, tasks.support_y[b])
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            grads = dict(zip(phi, grads, strict=True))
            grads = {n: g.detach() if n in curvature.detached else g for n, g in grads.items()}
            phi = {n: phi[n] - lr * grads[n] for n in phi}
        logits = loop_model(phi, tasks.query_x[b], "none")
        total = total + F.cross_entropy(logits, tasks.query_y[b])
    grads = torch.autograd.grad(total / tasks.support_x.shape[0], list(theta.values()))
    return dict(zip(theta, grads, strict=True))


@pytest.mark.parametrize("ablation", [a for a in ABLATIONS if a != "none"])
def test_each_ablation_equals_its_independent_definition(backend, ablation):
    params, tasks = fresh()
    kw = dict(mode="FULL", steps=2, lr=SMALL.inner_lr, backend=backend)
    engine = meta_gradient(params, tasks, **kw, ablation=ablation)
    loop = loop_meta_gradient(params, tasks, 2, SMALL.inner_lr, ablation)
    assert rel(loop, engine) < 1e-10
    full = meta_gradient(params, tasks, **kw)
    assert rel(full, engine) > 1e-6, "the ablation changed nothing"


def test_the_loop_reference_without_ablation_is_full():
    params, tasks = fresh()
    engine = meta_gradient(params, tasks, mode="FULL", steps=2, lr=0.4, backend="reference")
    assert rel(loop_meta_gradient(params, tasks, 2, 0.4, "none"), engine) < 1e-10


def test_attentions_term_splits_into_score_and_value_paths_for_one_inner_step(backend):
    """With one inner step the meta-gradient is linear in the inner Hessian, so
    FULL - no_attention_curvature = (FULL - no_score) + (FULL - no_value), exactly."""
    params, tasks = fresh()
    kw = dict(mode="FULL", steps=1, lr=0.4, backend=backend)
    g = {a: meta_gradient(params, tasks, **kw, ablation=a) for a in ATTENTION_ABLATIONS + ["none"]}
    for n in params:
        whole = g["none"][n] - g["no_attention_curvature"][n]
        score = g["none"][n] - g["no_attention_score_curvature"][n]
        value = g["none"][n] - g["no_attention_value_curvature"][n]
        torch.testing.assert_close(score + value, whole, rtol=1e-10, atol=1e-13)
    assert rel(g["none"], g["no_attention_curvature"]) > 1e-4
    # Attention's own term and the head's curvature through attention's backward differ.
    assert rel(g["no_attention_curvature"], g["once_differentiable_attention"]) > 1e-4


def test_triton_step_refuses_ablations_and_fo_takes_none():
    with pytest.raises(ConfigError, match="no switch for ablation no_attention_curvature"):
        device_for(SMALL.replace(backend="triton_step", ablation="no_attention_curvature"))
    with pytest.raises(ConfigError, match="ablation of FULL; it does not apply to mode FO"):
        SMALL.replace(mode="FO", ablation="frozen_softmax_stats")
    with pytest.raises(ConfigError, match="ablation 'x' is unknown"):
        SMALL.replace(ablation="x")


def test_an_unknown_mode_is_not_taken_for_first_order():
    from phase12.config import inner_curvature

    with pytest.raises(ConfigError, match="mode 'SECOND' is unknown"):
        inner_curvature("SECOND")


PROBED_ABLATIONS = {
    "attn_curvature_share": "no_attention_curvature",
    "attn_score_curvature_share": "no_attention_score_curvature",
    "attn_value_curvature_share": "no_attention_value_curvature",
    "softmax_stats_curvature_share": "frozen_softmax_stats",
}


def test_curvature_shares_are_the_loop_references_on_the_probe_task(backend):
    from phase12.probes import PROBE_SEED_OFFSET, Probe, curvature_shares
    from phase12.tasks import sample_tasks, task_generator

    config = SMALL.replace(backend=backend, seed=torch.randint(0, 2**31, ()).item())
    params, _ = fresh(config)
    gen = task_generator(config.seed + PROBE_SEED_OFFSET, torch.device("cpu"))
    tasks = sample_tasks(config, gen, torch.device("cpu"), meta_batch=1)
    loop = lambda a: loop_meta_gradient(params, tasks, config.inner_steps, config.inner_lr, a)  # noqa: E731
    full = loop("none")
    want = {}
    for column, ablation in PROBED_ABLATIONS.items():
        ablated = loop(ablation)
        want[column] = rel(full, ablated)
        if ablation == "no_attention_curvature":
            qkv = ("Wq", "Wk", "Wv")
            want[column + "_qkv"] = rel({n: full[n] for n in qkv}, ablated)
    got = curvature_shares(Probe([params], [config], torch.device("cpu")))
    assert got.keys() == want.keys()
    for column, value in want.items():
        assert 0 < value and math.isclose(got[column][0], value, rel_tol=1e-9), column


def test_a_triton_step_runs_curvature_shares_are_measured_on_reference(interpreter):
    """triton_step has no ablation switches: its shares are reference's at its parameters
    (the same computation, so the same numbers to the last bit)."""
    from phase12.probes import Probe, curvature_shares

    config = SMALL.replace(backend="triton_step", seed=torch.randint(0, 2**31, ()).item())
    params, _ = fresh(config)
    cpu = torch.device("cpu")
    got = curvature_shares(Probe([params], [config], cpu))
    want = curvature_shares(Probe([params], [config.replace(backend="reference")], cpu))
    assert got == want
