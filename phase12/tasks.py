"""Synthetic few-shot sequence classification, sampled for a whole meta-batch at once.

Per task: `signal_positions` distinct positions in 1..T-1 and `num_classes`
prototypes drawn from N(0, I_D). Per example: a label y, uniform over the classes;
x (T, D) is N(0, 1) noise, except at the task's signal positions, where
x[pos] = prototype[y] + N(0, noise_std^2). Support and query sets share the task's
positions and prototypes.

Everything is drawn as batched tensors on the target device from one
torch.Generator: no Python loop over tasks or examples, no host synchronisation,
fixed shapes (so a CUDA graph can capture it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from phase12.config import RunConfig


class Tasks(NamedTuple):
    """A meta-batch of B tasks. x: (B, n, T, D) float; y: (B, n) int64."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


def task_generator(seed: int, device: torch.device) -> torch.Generator:
    """The task stream of a run: a generator on `device` seeded with the run's seed."""
    return torch.Generator(device=device).manual_seed(seed)


def sample_tasks(
    config: RunConfig,
    generator: torch.Generator,
    device: torch.device | str,
    meta_batch: int | None = None,
) -> Tasks:
    """Draw B tasks (default: config.meta_batch) of the config's sizes in its dtype;
    `generator` must live on `device`."""
    b = config.meta_batch if meta_batch is None else meta_batch
    n, t, dim = config.shots + config.queries, config.seq_len, config.dim
    kw = dict(generator=generator, device=device)
    # A random permutation of 1..T-1 per task; its first P entries are the positions.
    positions = torch.rand(b, t - 1, **kw).argsort(dim=1)[:, : config.signal_positions] + 1
    prototypes = torch.randn(b, config.num_classes, dim, dtype=config.torch_dtype, **kw)
    labels = torch.randint(0, config.num_classes, (b, n), **kw)
    x = torch.randn(b, n, t, dim, dtype=config.torch_dtype, **kw)  # the noise
    signal = prototypes.gather(1, labels[..., None].expand(b, n, dim))  # (B, n, D)
    # Signal and background positions are disjoint, so one noise draw serves both. Only
    # the signal positions are rewritten: a torch.where over all of x would read and
    # write the whole meta-batch several times to change a few positions.
    at_signal = positions[:, None, :, None].expand(b, n, config.signal_positions, dim)
    x.scatter_(2, at_signal, signal[:, :, None, :] + config.noise_std * x.gather(2, at_signal))
    s = config.shots
    return Tasks(x[:, :s], labels[:, :s], x[:, s:], labels[:, s:])
