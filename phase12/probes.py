"""Measurements of a trained run beside its training curves, on fresh tasks.

* `rel_diff_probe`: how far the FULL meta-gradient is from the FO one.
* `curvature_shares`: how much of the FULL meta-gradient each part of attention's own
  second derivative carries (phase12.schema.CURVATURE_SHARES).
* `probe`: both, the columns phase12.schema.PROBES.
* `second_order_reaches_attention`: whether second derivatives flow through attention
  on this backend (the seed's `sdpa_input_gradgrad_ok`).
"""

from __future__ import annotations

import torch

from kernels import attention
from phase12.backends import FusedStepBackend, get
from phase12.config import Curvature, Mode, RunConfig
from phase12.maml import meta_gradient, relative_difference
from phase12.model import ATTENTION_PARAMS, Params, init_params
from phase12.tasks import sample_tasks, task_generator

PROBE_SEED_OFFSET = 1_000_003  # the probe's task stream, disjoint from training's


def _probe_tasks(config: RunConfig, device: torch.device):
    """One held-out task: a task stream disjoint from training's."""
    gen = task_generator(config.seed + PROBE_SEED_OFFSET, device)
    return sample_tasks(config, gen, device, meta_batch=1)


def rel_diff_probe(params: Params, config: RunConfig, device: torch.device) -> float:
    """||g_FULL - g_FO|| / ||g_FULL|| of the meta-gradient on one fresh task."""
    tasks = _probe_tasks(config, device)
    kw = dict(steps=config.inner_steps, lr=config.inner_lr, backend=config.backend)
    full = meta_gradient(params, tasks, mode=Mode.FULL, **kw)
    fo = meta_gradient(params, tasks, mode=Mode.FO, **kw)
    return float(relative_difference(full, fo))


SHARE_ABLATIONS = {
    "attn_curvature_share": "no_attention_curvature",
    "attn_score_curvature_share": "no_attention_score_curvature",
    "attn_value_curvature_share": "no_attention_value_curvature",
    "softmax_stats_curvature_share": "frozen_softmax_stats",
}


def curvature_shares(params: Params, config: RunConfig, device: torch.device) -> dict:
    """||g_FULL - g_A|| / ||g_FULL|| for the attention ablations A of SHARE_ABLATIONS, at
    `params` on the held-out task (attn_curvature_share_qkv: on Wq, Wk, Wv only).

    triton_step has no ablation switches; its runs are measured on triton_fused, the
    same model and the same numbers. Keys: phase12.schema.CURVATURE_SHARES.
    """
    tasks = _probe_tasks(config, device)
    backend = (
        "triton_fused" if isinstance(get(config.backend), FusedStepBackend) else config.backend
    )
    kw = dict(mode=Mode.FULL, steps=config.inner_steps, lr=config.inner_lr, backend=backend)
    full = meta_gradient(params, tasks, **kw)
    shares = {}
    for column, ablation in SHARE_ABLATIONS.items():
        ablated = meta_gradient(params, tasks, **kw, ablation=ablation)
        shares[column] = float(relative_difference(full, ablated))
        if ablation == "no_attention_curvature":
            qkv = {n: full[n] for n in ATTENTION_PARAMS}
            shares["attn_curvature_share_qkv"] = float(relative_difference(qkv, ablated))
    return shares


def probe(params: Params, config: RunConfig, device: torch.device) -> dict:
    """Every probe of phase12.schema.PROBES at `params`, on the held-out task."""
    rel_diff = {"rel_diff_probe": rel_diff_probe(params, config, device)}
    return rel_diff | curvature_shares(params, config, device)


def second_order_reaches_attention(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Do second derivatives flow through attention on this backend (finite, non-zero)?

    Autodiff backends: the gradient of a function of attention's first derivatives with
    respect to q, k, v (zero or absent when the op's backward is not differentiable).
    triton_step, which has no attention call in its inner loop: the Hessian term of one
    fused step's backward (v -> v - lr H v) in Wq, Wk, Wv.
    """
    b = get(backend)
    g = torch.Generator(device=device).manual_seed(0)
    if isinstance(b, FusedStepBackend):
        cpu = torch.Generator().manual_seed(0)  # init_params draws on the CPU
        params = init_params(16, 5, cpu, device=device, dtype=dtype)
        params = {n: p.requires_grad_() for n, p in params.items()}
        x = torch.randn(3, 5, 16, generator=g, device=device, dtype=dtype)
        y = torch.randint(0, 5, (3,), generator=g, device=device)
        phi = b.sgd_step(params, x, y, 1.0, Curvature())
        v = {
            n: torch.randn(p.shape, generator=g, device=device, dtype=dtype) for n, p in phi.items()
        }
        back = torch.autograd.grad(list(phi.values()), list(params.values()), list(v.values()))
        back = dict(zip(params, back, strict=True))
        second = torch.cat([(back[n] - v[n]).flatten() for n in ATTENTION_PARAMS])
    else:
        q, k, v = (
            torch.randn(2, 1, n, 16, generator=g, device=device, dtype=dtype).requires_grad_()
            for n in (3, 5, 5)
        )
        out = attention(q, k, v, backend=b.attention)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
        outer = sum(gr.square().sum() for gr in grads)
        second = torch.cat([s.flatten() for s in torch.autograd.grad(outer, (q, k, v))])
    return bool(torch.isfinite(second).all() and second.abs().max() > 0)
