"""Measurements of a trained run beside its training curves, on fresh tasks.

* `Probe`: the held-out task of each run at given parameters, and their meta-gradients
  (the seeds of a seed batch together, in one vmap, as they train);
* `rel_diff_probe`: how far the FULL meta-gradient is from the FO one;
* `curvature_shares`: how much of the FULL meta-gradient each part of attention's own
  second derivative carries (phase12.schema.CURVATURE_SHARES);
* `float64_error`: how far the run's meta-gradient is from float64's;
* `probe`: all three, the columns phase12.schema.PROBES; `end_probe` also says whether
  each run's own meta-gradient there is finite (`own_gradient_finite`).
* `second_order_reaches_attention`: whether second derivatives flow through attention
  on this backend (the seed's `sdpa_input_gradgrad_ok`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import attention
from phase12.backends import FusedStepBackend, get
from phase12.config import Curvature, Mode, RunConfig
from phase12.maml import meta_gradient, relative_difference
from phase12.model import ATTENTION_PARAMS, Params, init_params
from phase12.tasks import Tasks, sample_tasks, task_generator

PROBE_SEED_OFFSET = 1_000_003  # the probe's task stream, disjoint from training's


def _probe_tasks(configs: Sequence[RunConfig], device: torch.device) -> Tasks:
    """One held-out task per run, stacked (S, 1, ...): task streams disjoint from
    training's."""
    per_run = [
        sample_tasks(c, task_generator(c.seed + PROBE_SEED_OFFSET, device), device, meta_batch=1)
        for c in configs
    ]
    return Tasks(*(torch.stack(parts) for parts in zip(*per_run, strict=True)))


class Probe:
    """The held-out tasks of runs that differ only in their seed, and meta-gradients on
    them at the runs' parameters (`params`, one Params per run), each taken once for all
    the runs in one vmap over the seeds: `meta_gradient(mode, ablation, backend)` runs
    their inner loop in their precision and returns (S, ...) tensors."""

    def __init__(
        self, params: Sequence[Params], configs: Sequence[RunConfig], device: torch.device
    ):
        if len(params) != len(configs) or len({c.replace(seed=0) for c in configs}) != 1:
            raise ValueError("a probe takes one Params per run, of runs that differ only in seed")
        self.config, self.device = configs[0], device
        self.params = {n: torch.stack([p[n].detach() for p in params]) for n in params[0]}
        self.tasks = _probe_tasks(configs, device)
        self._cache: dict[tuple, Params] = {}

    def meta_gradient(self, mode=Mode.FULL, ablation="none", backend=None) -> Params:
        c = self.config
        key = (mode, ablation, backend or c.backend)
        if key not in self._cache:
            self._cache[key] = meta_gradient(
                self.params,
                self.tasks,
                mode=mode,
                ablation=ablation,
                steps=c.inner_steps,
                lr=c.inner_lr,
                backend=key[2],
                autocast=c.autocast(self.device),
                loss_scale=c.loss_scale,
                seed_batched=True,
            )
        return self._cache[key]


def _per_run(a: Params, b: Params) -> list[float]:
    """relative_difference(a, b) of each run, as floats."""
    return relative_difference(a, b, seed_batched=True).tolist()


def rel_diff_probe(probe: Probe) -> list[float]:
    """||g_FULL - g_FO|| / ||g_FULL|| of the meta-gradient on the held-out task, per run."""
    return _per_run(probe.meta_gradient(), probe.meta_gradient(Mode.FO))


def float64_error(probe: Probe) -> list[float]:
    """||g - g64|| / ||g64|| per run: its FULL meta-gradient (its backend and precision)
    against the reference backend's in float64 at the same parameters and data (both
    upcast exactly)."""
    wide = lambda t: t.to(torch.float64) if t.is_floating_point() else t  # noqa: E731
    c = probe.config
    g64 = meta_gradient(
        {n: wide(p) for n, p in probe.params.items()},
        Tasks(*map(wide, probe.tasks)),
        mode=Mode.FULL,
        steps=c.inner_steps,
        lr=c.inner_lr,
        backend="reference",
        seed_batched=True,
    )
    return _per_run(g64, {n: wide(v) for n, v in probe.meta_gradient().items()})


SHARE_ABLATIONS = {
    "attn_curvature_share": "no_attention_curvature",
    "attn_score_curvature_share": "no_attention_score_curvature",
    "attn_value_curvature_share": "no_attention_value_curvature",
    "softmax_stats_curvature_share": "frozen_softmax_stats",
}


def curvature_shares(probe: Probe) -> dict[str, list[float]]:
    """||g_FULL - g_A|| / ||g_FULL|| per run for the attention ablations A of
    SHARE_ABLATIONS, on the held-out task (attn_curvature_share_qkv: on Wq, Wk, Wv only).

    The runs of a backend without ablation switches (Backend.ablation_switches: triton_step)
    are measured on reference, the same model, whose switches are PyTorch ops: faster than
    triton_fused's kernels eager, as probes run, and with no kernels of their own to
    compile on a run's first use. Keys: phase12.schema.CURVATURE_SHARES.
    """
    name = probe.config.backend
    backend = name if get(name).ablation_switches else "reference"
    full = probe.meta_gradient(backend=backend)
    shares = {}
    for column, ablation in SHARE_ABLATIONS.items():
        ablated = probe.meta_gradient(ablation=ablation, backend=backend)
        shares[column] = _per_run(full, ablated)
        if ablation == "no_attention_curvature":
            qkv = {n: full[n] for n in ATTENTION_PARAMS}
            shares["attn_curvature_share_qkv"] = _per_run(qkv, ablated)
    return shares


def own_gradient_finite(probe: Probe) -> list[bool]:
    """Per run: whether the meta-gradient of its own mode and ablation, in its precision,
    is finite on the held-out task (FO_STRICT's is FO's)."""
    c = probe.config
    mode = Mode.FO if c.mode == Mode.FO_STRICT else c.mode
    g = probe.meta_gradient(mode, c.ablation)
    finite = [torch.isfinite(t).flatten(1).all(-1) for t in g.values()]
    return torch.stack(finite).all(0).tolist()


def probe(
    params: Sequence[Params], configs: Sequence[RunConfig], device: torch.device
) -> list[dict]:
    """Every probe of phase12.schema.PROBES on the held-out task of each run (runs that
    differ only in their seed, `params` one Params per run), taken together."""
    return _columns(Probe(params, configs, device))


def end_probe(
    params: Sequence[Params], configs: Sequence[RunConfig], device: torch.device
) -> tuple[list[dict], list[bool]]:
    """probe's values and own_gradient_finite of each run, from one Probe (each
    meta-gradient taken once)."""
    p = Probe(params, configs, device)
    return _columns(p), own_gradient_finite(p)


def _columns(p: Probe) -> list[dict]:
    columns = {
        "rel_diff_probe": rel_diff_probe(p),
        **curvature_shares(p),
        "float64_meta_grad_error": float64_error(p),
    }
    return [dict(zip(columns, run, strict=True)) for run in zip(*columns.values(), strict=True)]


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
