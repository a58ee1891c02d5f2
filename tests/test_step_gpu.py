"""Whole-step CUDA graph replay against eager execution (CUDA only)."""

import pytest
import torch

from phase12.config import RunConfig
from phase12.experiment import build_step
from phase12.step import capture

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["reference", "triton_fused"])
@pytest.mark.parametrize("mode", ["FULL", "FO_STRICT"])
def test_graph_replay_equals_eager(mode, backend):
    cfg = RunConfig(
        device="cuda", mode=mode, backend=backend, inner_steps=5, outer_steps=40, seed=3
    )
    device = torch.device("cuda")
    eager = build_step([cfg], device)
    for _ in range(cfg.outer_steps):
        eager()
    graphed = build_step([cfg], device)
    graph = capture(graphed)
    for _ in range(cfg.outer_steps):
        graph.replay()
    torch.cuda.synchronize()
    # Same tasks (same generator stream), same arithmetic: float32 rounding only.
    torch.testing.assert_close(graphed.history, eager.history, rtol=1e-4, atol=1e-5)
    for name, p in eager.params.items():
        torch.testing.assert_close(graphed.params[name], p, rtol=1e-4, atol=1e-6)
    assert int(graphed.counter) == cfg.outer_steps
