"""MAML as pure functions: an inner loop of torch.func.grad, a vmap over tasks.

The three modes are detach policies on one functional graph (theta = meta-params,
phi_k = parameters after k inner SGD steps on the support loss L_s, L_q = query loss):

| mode      | inner loop phi_{i+1} = phi_i - a grad L_s(phi_i)  | meta-gradient            |
|-----------|---------------------------------------------------|--------------------------|
| FULL      | differentiable (second-order terms kept)          | exact dL_q(phi_k)/dtheta |
| FO        | each inner gradient detached (a constant)         | grad L_q at phi_k        |
| FO_STRICT | run with no autodiff graph at all, then           | grad L_q at phi_k: equal |
|           | phi = theta + stop_grad(phi_k - theta)            | to FO, less memory       |

FULL also takes a curvature ablation (phase12.config.ABLATIONS): its inner gradients
keep all but one part of their second-order signal (attention's own curvature or a part
of it, or the curvature of some parameters), exactly.

The meta-gradient itself is taken by ordinary autograd (phase12.step.OuterStep calls
`.backward()` on the mean query loss; `meta_gradient` takes torch.autograd.grad), so
torch.optim works on the meta-parameters unchanged. How an inner step
is taken is the backend's (phase12.backends): torch.func.grad of the model, or with
`triton_step` one fused kernel whose backward is one Hessian-vector-product kernel
(the three modes, the same numbers; it refuses the ablations).
"""

from __future__ import annotations

import contextlib

import torch

from phase12.backends import get, scaled
from phase12.config import ABLATIONS, Curvature, Mode, inner_curvature
from phase12.model import Params
from phase12.tasks import Tasks


def _detached(params: Params) -> Params:
    return {name: p.detach() for name, p in params.items()}


def adapt(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    backend: str,
    curvature: Curvature = ABLATIONS["none"],
    loss_scale: float = 1.0,
) -> Params:
    """`steps` SGD steps on the support loss from `params`, differentiable with the
    second-order terms `curvature` keeps (all by default); gradients of `loss_scale` times
    the loss, divided by it (phase12.backends.Backend.sgd_step)."""
    sgd_step = get(backend).sgd_step
    for _ in range(steps):
        params = sgd_step(params, x, y, lr, curvature, loss_scale)
    return params


def adapted_params(
    meta_params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mode: str,
    steps: int,
    lr: float,
    backend: str,
    ablation: str = "none",
    loss_scale: float = 1.0,
) -> Params:
    """phi_k for one task under the mode's detach policy (see the module table) and, for
    FULL, its curvature ablation (phase12.config.ABLATIONS)."""
    kw = dict(steps=steps, lr=lr, backend=backend, loss_scale=loss_scale)
    if mode == Mode.FO_STRICT:
        with torch.no_grad():  # torch.func.grad still differentiates inside; nothing is recorded
            phi = adapt(_detached(meta_params), x, y, **kw)
        # Straight-through: the value of phi_k, the identity Jacobian of theta.
        return {n: theta + (phi[n] - theta).detach() for n, theta in meta_params.items()}
    return adapt(meta_params, x, y, **kw, curvature=inner_curvature(mode, ablation))


def task_query_metrics(
    meta_params: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    *,
    mode: str,
    steps: int,
    lr: float,
    backend: str,
    ablation: str = "none",
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query loss, query accuracy) of one task after adaptation; both scalars."""
    phi = adapted_params(
        meta_params,
        support_x,
        support_y,
        mode=mode,
        steps=steps,
        lr=lr,
        backend=backend,
        ablation=ablation,
        loss_scale=loss_scale,
    )
    return get(backend).query_metrics(phi, query_x, query_y)


def meta_batch_metrics(
    meta_params: Params, tasks: Tasks, **inner_loop
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task (query loss (B,), query accuracy (B,)): one vmap over the task dim.
    `inner_loop`: mode, steps, lr, backend (and ablation, loss_scale) of
    task_query_metrics (RunConfig.inner_loop)."""
    per_task = torch.func.vmap(
        lambda sx, sy, qx, qy: task_query_metrics(meta_params, sx, sy, qx, qy, **inner_loop)
    )
    return per_task(*tasks)


def seed_batch_metrics(
    meta_params: Params, tasks: Tasks, *, seed_batched: bool = False, **inner_loop
) -> tuple[torch.Tensor, torch.Tensor]:
    """meta_batch_metrics of runs that differ only in their seed: with `seed_batched`
    every parameter and task tensor has a leading seed dim (S, ...) and both results are
    (S, B), a vmap over the seeds of the vmap over tasks, or with one task per seed one
    vmap over both; (B,) otherwise."""
    if seed_batched and tasks.support_x.shape[1] == 1:
        # One task per seed (the probes; training at meta_batch 1, or one task a rank):
        # an inner vmap over a task dim of 1 would add its dispatch to every op, a fifth
        # of the host time of an eager meta-gradient.
        per_seed = lambda p, *t: task_query_metrics(p, *t, **inner_loop)  # noqa: E731
        losses, accs = torch.func.vmap(per_seed)(meta_params, *(t.squeeze(1) for t in tasks))
        return losses[:, None], accs[:, None]
    metrics = lambda p, *t: meta_batch_metrics(p, Tasks(*t), **inner_loop)  # noqa: E731
    return (torch.func.vmap(metrics) if seed_batched else metrics)(meta_params, *tasks)


def meta_gradient(
    meta_params: Params,
    tasks: Tasks,
    *,
    autocast: contextlib.AbstractContextManager | None = None,
    seed_batched: bool = False,
    **inner_loop,
) -> Params:
    """d(mean query loss)/d(meta_params) for a meta-batch, without touching .grad.
    `inner_loop`: mode, steps, lr, backend (and ablation, loss_scale) of task_query_metrics;
    `autocast`: the context of the forward (RunConfig.autocast), as in a training step.
    With `seed_batched`, every parameter and task tensor has a leading seed dim (S, ...)
    and each seed gets the meta-gradient of its own tasks (one vmap over the seeds, as
    phase12.step.OuterStep trains them)."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in meta_params.items()}
    with autocast or contextlib.nullcontext():
        losses, _ = seed_batch_metrics(leaves, tasks, seed_batched=seed_batched, **inner_loop)
    scale = inner_loop.get("loss_scale", 1.0)
    # A seed's loss depends on its own parameters only: the sum's gradient is each one's.
    grads = torch.autograd.grad(scaled(losses.mean(-1).sum(), scale), list(leaves.values()))
    return {n: g if scale == 1.0 else g / scale for n, g in zip(leaves, grads, strict=True)}


def relative_difference(a: Params, b: Params, seed_batched: bool = False) -> torch.Tensor:
    """||a - b|| / ||a|| over all parameters together: a 0-dim tensor, or with
    `seed_batched` one value per index of the leading seed dim, shape (S,)."""
    start = 1 if seed_batched else 0
    squares = lambda t: t.square().flatten(start).sum(-1)  # noqa: E731
    num = torch.sqrt(sum(squares(a[n] - b[n]) for n in a))
    den = torch.sqrt(sum(squares(a[n]) for n in a))
    return num / den
