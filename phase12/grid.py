"""The grid of a sweep: which runs it holds and how they train together.

    spec = SweepSpec(base=RunConfig(outer_steps=500), modes=("FULL", "FO"), seeds=(0, 1))
    spec.configs()              # one RunConfig per cell
    unsupported_cells(spec)     # the cells beyond their backend's limits, and why
    seed_groups(spec.configs(), batch_seeds=True)   # the seeds of a cell train together

AXES maps each RunConfig field a grid varies to its SweepSpec axis (and sweep.json's
key for it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from phase12.backends import device_for, get
from phase12.config import ConfigError, Mode, RunConfig, resolve_device

AXES = {
    "mode": "modes",
    "backend": "backends",
    "inner_steps": "inner_steps",
    "seed": "seeds",
    "ablation": "ablations",
    "seq_len": "seq_lens",
    "dim": "dims",
    "dtype": "dtypes",
}


@dataclass(frozen=True)
class SweepSpec:
    """A grid: every combination of modes x backends x k x seeds x sequence lengths x
    widths x precisions, plus FULL with each ablation other than "none"
    (phase12.config.ABLATIONS) at every other point; the other fields from `base` (the
    shape and precision axes too, when not given). Repeated values of an axis count once."""

    base: RunConfig
    modes: tuple[str, ...] = ("FULL", "FO", "FO_STRICT")
    backends: tuple[str, ...] = ("reference",)
    inner_steps: tuple[int, ...] = (1, 5, 10, 20)
    seeds: tuple[int, ...] = (0, 1)
    ablations: tuple[str, ...] = ("none",)
    seq_lens: tuple[int, ...] | None = None
    dims: tuple[int, ...] | None = None
    dtypes: tuple[str, ...] | None = None

    def __post_init__(self):
        for field_name, axis in AXES.items():
            values = getattr(self, axis)
            values = (getattr(self.base, field_name),) if values is None else values
            object.__setattr__(self, axis, tuple(dict.fromkeys(values)))

    def configs(self) -> list[RunConfig]:
        policies = [(m, "none") for m in self.modes]
        policies += [(Mode.FULL, a) for a in self.ablations if a != "none"]
        points = itertools.product(self.backends, self.dtypes, self.seq_lens, self.dims)
        return [
            self.base.replace(
                backend=b, dtype=p, seq_len=t, dim=d, mode=m, ablation=a, inner_steps=k, seed=s
            )
            for (b, p, t, d), (m, a), k, s in itertools.product(
                points, policies, self.inner_steps, self.seeds
            )
        ]


def unsupported_cells(spec: SweepSpec) -> dict[str, str]:
    """{run_id: "backend: its limit"} for the cells of `spec` beyond their backend's limits.
    Every other cell is checked to run here (ConfigError), and ConfigError too when no
    cell is within the limits: nothing would run. (Seed batches: seed_groups.)"""
    beyond = {}
    for config in spec.configs():
        backend, device = get(config.backend), resolve_device(config.device)
        reason = None if backend.unavailable(device) else backend.limit(config, device)
        if reason is None:
            device_for(config)  # ConfigError where it cannot run here
        else:
            beyond[config.run_id] = f"{config.backend}: {reason}"
    if beyond and len(beyond) == len(spec.configs()):
        raise ConfigError(f"no cell of the grid can run: {next(iter(beyond.values()))}")
    return beyond


def seed_groups(todo: list[RunConfig], batch_seeds: bool) -> dict[RunConfig, list[RunConfig]]:
    """The runs of `todo` as they will train: with `batch_seeds` the seeds of a cell as one
    group (one seed-batched computation), else one run a group; each group checked to fit
    as a whole (ConfigError naming --no-batch-seeds), before any of them trains."""
    groups: dict[RunConfig, list[RunConfig]] = {}
    for c in todo:
        groups.setdefault(c.replace(seed=0) if batch_seeds else c, []).append(c)
    for group in groups.values():
        device_for(group[0], len(group))
    return groups
