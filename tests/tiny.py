"""A Phase 12 configuration small enough for fast CPU tests (and the Triton interpreter)."""

from phase12.config import RunConfig

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
