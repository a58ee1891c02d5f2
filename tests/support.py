"""What several test modules share: small configurations and an independent reference.

`loop_meta_gradient` is MAML written out again with plain autograd and a loop over
tasks (no torch.func, no phase12.model, no kernels): the engine's modes and every
backend are checked against it.
"""

import math

import torch
import torch.nn.functional as F

from phase12.config import RunConfig
from phase12.grid import SweepSpec
from phase12.maml import relative_difference
from phase12.model import init_params
from phase12.tasks import sample_tasks

# Small enough for fast CPU tests and the Triton interpreter.
TINY = RunConfig(
    device="cpu",
    inner_steps=2,
    outer_steps=3,
    meta_batch=2,
    shots=3,
    queries=3,
    seq_len=6,
    dim=8,
    signal_positions=2,
    metric_window=2,
)

SMALL = TINY.replace(
    meta_batch=3,
    shots=4,
    queries=5,
    seq_len=8,
    dim=6,
    num_classes=3,
    inner_steps=3,
    dtype="float64",
)
# A sweep of 12 small runs (2 modes x k 1, 2 x 3 seeds), 4 steps each.
SMALL_GRID = SweepSpec(
    base=TINY.replace(outer_steps=4),
    modes=("FULL", "FO_STRICT"),
    backends=("reference",),
    inner_steps=(1, 2),
    seeds=(0, 1, 2),
)


def fresh(config=SMALL, seed=None):
    seed = torch.randint(0, 2**31, ()).item() if seed is None else seed
    params = init_params(
        config.dim,
        config.num_classes,
        torch.Generator().manual_seed(seed),
        dtype=config.torch_dtype,
    )
    tasks = sample_tasks(config, torch.Generator().manual_seed(seed + 1), torch.device("cpu"))
    return params, tasks


def loop_model(p, x):
    """The model, written out again with plain ops (no kernels, no phase12.model)."""
    q = x[:, 0] @ p["Wq"].T  # (n, D)
    k = x @ p["Wk"].T  # (n, T, D)
    v = x @ p["Wv"].T
    scores = torch.einsum("nd,ntd->nt", q, k) / math.sqrt(x.shape[-1])
    h = torch.einsum("nt,ntd->nd", torch.softmax(scores, -1), v)
    return h @ p["Wc"].T + p["bc"]


def loop_meta_gradient(params, tasks, steps, lr, first_order=False):
    """MAML meta-gradient with torch.autograd.grad(create_graph=True) and a loop over tasks."""
    theta = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    total = 0
    for b in range(tasks.support_x.shape[0]):
        phi = dict(theta)
        for _ in range(steps):
            loss = F.cross_entropy(loop_model(phi, tasks.support_x[b]), tasks.support_y[b])
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=not first_order)
            phi = {n: phi[n] - lr * g for n, g in zip(phi, grads, strict=True)}
        total = total + F.cross_entropy(loop_model(phi, tasks.query_x[b]), tasks.query_y[b])
    grads = torch.autograd.grad(total / tasks.support_x.shape[0], list(theta.values()))
    return dict(zip(theta, grads, strict=True))


def rel(a, b):
    return relative_difference(a, b).item()


def exit_code(*argv: str) -> int:
    """The exit code of `python run.py ARGV`: what main returns, or the SystemExit code
    of an argparse error or --help."""
    from phase12.cli import main

    try:
        return main(list(argv))
    except SystemExit as e:
        return e.code
