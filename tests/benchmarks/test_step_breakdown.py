"""phase12.benchmarks.step's pure parts: the breakdown of a step's time."""

import pandas as pd
import pytest

from phase12.benchmarks.step import CELL_KEYS, breakdown


def _row(execution, ms, **extra):
    values = ["H100", "triton_step", "FULL", "none", 20, 16, 32, 64, "float32"]
    cell = dict(zip(CELL_KEYS, values, strict=True))
    return dict(cell, execution=execution, median_step_ms=ms, **extra)


def test_breakdown_splits_graph_time_into_gpu_work_and_gaps():
    steps = pd.DataFrame(
        [
            _row("eager", 9.0, gpu_ms=1.5, gpu_ops=41.0),
            _row("graph", 2.0),
            _row("graph", 3.0, backend="reference"),  # no profiled eager twin: left out
        ]
    )
    parts = breakdown(steps)
    assert len(parts) == 1
    row = parts.iloc[0]
    assert (row.graph_ms, row.gpu_ms, row.eager_ms, row.gpu_ops) == (2.0, 1.5, 9.0, 41.0)
    assert row.gap_ms == pytest.approx(0.5) and row.host_ms == pytest.approx(7.0)


def test_breakdown_needs_profiled_eager_and_graph_cells():
    with pytest.raises(ValueError, match="eager \\(profiled\\) and in a graph"):
        breakdown(pd.DataFrame([_row("graph", 2.0)]))
    with pytest.raises(ValueError, match="eager \\(profiled\\) and in a graph"):
        breakdown(pd.DataFrame([_row("eager", 9.0, gpu_ms=1.5, gpu_ops=4.0)]))
