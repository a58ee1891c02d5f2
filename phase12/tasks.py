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


class Tasks(NamedTuple):
    """A meta-batch of B tasks. x: (B, n, T, D) float; y: (B, n) int64."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


def sample_tasks(
    generator: torch.Generator,
    *,
    meta_batch: int,
    shots: int,
    queries: int,
    seq_len: int,
    dim: int,
    num_classes: int,
    signal_positions: int,
    noise_std: float,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tasks:
    """Draw B = meta_batch tasks; `generator` must live on `device`."""
    b, n, t = meta_batch, shots + queries, seq_len
    kw = dict(generator=generator, device=device)
    # A random permutation of 1..T-1 per task; its first P entries are the positions.
    positions = torch.rand(b, t - 1, **kw).argsort(dim=1)[:, :signal_positions] + 1
    is_signal = torch.zeros(b, t, dtype=torch.bool, device=device).scatter_(1, positions, True)
    prototypes = torch.randn(b, num_classes, dim, dtype=dtype, **kw)
    labels = torch.randint(0, num_classes, (b, n), **kw)
    noise = torch.randn(b, n, t, dim, dtype=dtype, **kw)
    signal = prototypes.gather(1, labels[..., None].expand(b, n, dim))  # (B, n, D)
    # Signal and background positions are disjoint, so one noise draw serves both.
    x = torch.where(is_signal[:, None, :, None], signal[:, :, None, :] + noise_std * noise, noise)
    return Tasks(x[:, :shots], labels[:, :shots], x[:, shots:], labels[:, shots:])


def sample_tasks_for(
    config, generator: torch.Generator, device: torch.device, meta_batch: int | None = None
) -> Tasks:
    """`sample_tasks` with the sizes of a RunConfig."""
    return sample_tasks(
        generator,
        meta_batch=config.meta_batch if meta_batch is None else meta_batch,
        shots=config.shots,
        queries=config.queries,
        seq_len=config.seq_len,
        dim=config.dim,
        num_classes=config.num_classes,
        signal_positions=config.signal_positions,
        noise_std=config.noise_std,
        device=device,
        dtype=config.torch_dtype,
    )
