"""The outer step: one meta-update, eager or replayed from a CUDA graph.

`OuterStep` bundles the run's state (meta-parameters, Adam, the task generator, the
metric history) and performs one meta-update per call: sample a meta-batch on the
device, adapt every task (vmap), take the meta-gradient, step Adam, and write
(loss, acc, |g_Wq|, |g_Wk|, |g_Wv|) into `history[counter]`, with `counter` a device
tensor. Nothing in it reads a value back to the host and no Python branch depends
on data, so the same call can be captured once into a CUDA graph (`capture`) and
replayed: task sampling, the k inner steps, the second-order backward, Adam
(capturable=True) and the metric write all run as one graph launch.
"""

from __future__ import annotations

import torch

from phase12.config import RunConfig
from phase12.maml import meta_batch_metrics
from phase12.model import ATTENTION_PARAMS, Params
from phase12.tasks import sample_tasks_for

METRICS = ("loss", "acc", "attn_grad_norm_q", "attn_grad_norm_k", "attn_grad_norm_v")


def make_optimizer(params: Params, config: RunConfig, device: torch.device) -> torch.optim.Adam:
    # capturable=True keeps Adam's step count on the device (no host sync); used for
    # eager CUDA runs too, so eager and graph runs do the same arithmetic.
    return torch.optim.Adam(params.values(), lr=config.outer_lr, capturable=device.type == "cuda")


class OuterStep:
    """One meta-update per call; metrics go to `history` (steps, 5) at `counter`."""

    def __init__(
        self,
        params: Params,
        config: RunConfig,
        device: torch.device,
        generator: torch.Generator,
        history: torch.Tensor,
    ):
        self.params, self.config, self.device = params, config, device
        self.generator, self.history = generator, history
        self.optimizer = make_optimizer(params, config, device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)

    def __call__(self) -> None:
        c = self.config
        tasks = sample_tasks_for(c, self.generator, self.device)
        losses, accs = meta_batch_metrics(
            self.params, tasks, mode=c.mode, steps=c.inner_steps, lr=c.inner_lr, backend=c.backend
        )
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms = [torch.linalg.vector_norm(self.params[n].grad) for n in ATTENTION_PARAMS]
        self.optimizer.step()
        metrics = torch.stack([loss.detach(), accs.mean(), *norms]).to(self.history.dtype)
        self.history.index_copy_(0, self.counter, metrics[None])
        self.counter.add_(1)

    def snapshot(self) -> dict:
        return {
            "params": {n: p.detach().clone() for n, p in self.params.items()},
            "generator": self.generator.get_state(),
        }

    def restore(self, snap: dict) -> None:
        """Back to `snap` (taken before any step): parameters, a fresh Adam, the task
        stream, an empty history. Tensors are updated in place, so a captured graph
        keeps pointing at them."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(snap["params"][n])
            for state in self.optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()
        self.generator.set_state(snap["generator"])
        self.counter.zero_()
        self.history.fill_(float("nan"))


def capture(step: OuterStep, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Capture one call of `step` into a CUDA graph; the run's state is left as it was.

    Warm-up calls (kernel compilation, Adam's lazy state, the .grad buffers) run on a
    side stream first, as torch.cuda.graph requires; afterwards parameters, Adam,
    the generator and the history are restored, so replaying the graph n times gives
    the same run as n eager calls from the same seed.
    """
    snap = step.snapshot()
    try:
        side = torch.cuda.Stream(step.device)
        side.wait_stream(torch.cuda.current_stream(step.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(step.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(step.generator)
        with torch.cuda.graph(graph):
            step()
    finally:
        torch.cuda.synchronize(step.device)
        step.restore(snap)
    return graph
