"""The outer step: one meta-update, eager or replayed from a CUDA graph.

`OuterStep` bundles the state of one or more runs that differ only in their seed
(meta-parameters, Adam, one task generator per seed, the metric history) and performs
one meta-update per call: sample each seed's meta-batch on the device, adapt every
task (vmap), take the meta-gradient, step Adam, and write (loss, acc, |g_Wq|, |g_Wk|,
|g_Wv|) per seed into `history[:, counter]`, with `counter` a device tensor.

Several seeds run as one computation: their parameters are stacked along a leading
seed dim and the per-seed meta-batch metrics are one more vmap. The summed loss gives
each seed exactly its own meta-gradient, and Adam is element-wise, so every seed
follows the run it would have had alone (up to the rounding of batched kernels).

Nothing in the step reads a value back to the host and no Python branch depends on
data, so the same call can be captured once into a CUDA graph (`capture`) and
replayed: task sampling, the k inner steps, the second-order backward, Adam
(capturable=True) and the metric write all run as one graph launch.
"""

from __future__ import annotations

import torch

from phase12.backends import scaled
from phase12.config import RunConfig
from phase12.distributed import SINGLE_PROCESS, World, all_reduce_mean
from phase12.maml import seed_batch_metrics
from phase12.model import ATTENTION_PARAMS, Params
from phase12.schema import METRICS
from phase12.tasks import Tasks, sample_tasks


def make_optimizer(params: Params, config: RunConfig, device: torch.device) -> torch.optim.Adam:
    # On CUDA: capturable keeps Adam's step count on the device (no host sync), and fused
    # updates every tensor in one kernel instead of a dozen foreach ones (a step of
    # triton_step is that much shorter: docs/benchmarks.md, "Eleventh session"). Eager
    # CUDA runs use it too, so eager and graph runs do the same arithmetic.
    cuda = device.type == "cuda"
    return torch.optim.Adam(
        params.values(), lr=config.outer_lr, capturable=cuda, fused=True if cuda else None
    )


class OuterStep:
    """One meta-update per call for S seeds; metrics go to `history` (S, steps, 5).

    `params` holds (S, ...) tensors when `seed_batched`, plain tensors (S = 1) otherwise.
    """

    def __init__(
        self,
        params: Params,
        config: RunConfig,
        device: torch.device,
        generators: list[torch.Generator],
        history: torch.Tensor,
        seed_batched: bool,
        world: World = SINGLE_PROCESS,
    ):
        self.params, self.config, self.device = params, config, device
        self.generators, self.history, self.seed_batched = generators, history, seed_batched
        self.world = world
        self.optimizer = make_optimizer(params, config, device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)

    def _sample(self) -> Tasks:
        """Each seed's global meta-batch, drawn in full on every rank; this rank's slice
        (seeds stacked along a leading dim when seed-batched)."""
        mine = self.world.task_slice(self.config.meta_batch)
        per_seed = [
            Tasks(*(t[mine] for t in sample_tasks(self.config, g, self.device)))
            for g in self.generators
        ]
        if not self.seed_batched:
            return per_seed[0]
        return Tasks(*(torch.stack(parts) for parts in zip(*per_seed, strict=True)))

    def __call__(self) -> None:
        with self.config.autocast(self.device):  # the forward only, as torch.autocast advises
            losses, accs = seed_batch_metrics(  # (S, B) or (B,)
                self.params,
                self._sample(),
                seed_batched=self.seed_batched,
                **self.config.inner_loop,
            )
        seed_losses = losses.mean(-1)
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.config.loss_scale
        # Each seed's parameters get its own meta-gradient (of the scaled loss: unscaled).
        scaled(seed_losses.sum(), scale).backward()
        stats = torch.stack([seed_losses.detach(), accs.mean(-1)])
        grads = [p.grad for p in self.params.values()]
        if scale != 1.0:
            torch._foreach_div_(grads, scale)
        all_reduce_mean([*grads, stats], self.world)  # no-op on one rank
        norms = [
            torch.linalg.vector_norm(self.params[n].grad.flatten(int(self.seed_batched)), dim=-1)
            for n in ATTENTION_PARAMS
        ]
        self.optimizer.step()
        metrics = torch.stack([stats[0], stats[1], *norms], dim=-1).to(self.history.dtype)
        self.history.index_copy_(1, self.counter, metrics.reshape(-1, 1, len(METRICS)))
        self.counter.add_(1)

    def seed_params(self, i: int) -> Params:
        """The parameters of the i-th seed (detached)."""
        if not self.seed_batched:
            return {n: p.detach() for n, p in self.params.items()}
        return {n: p[i].detach() for n, p in self.params.items()}

    def snapshot(self) -> dict:
        return {
            "params": {n: p.detach().clone() for n, p in self.params.items()},
            "generators": [g.get_state() for g in self.generators],
        }

    def restore(self, snap: dict) -> None:
        """Back to `snap` (taken before any step): parameters, a fresh Adam, the task
        streams, an empty history. Tensors are updated in place, so a captured graph
        keeps pointing at them."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(snap["params"][n])
            for state in self.optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()
        for g, state in zip(self.generators, snap["generators"], strict=True):
            g.set_state(state)
        self.counter.zero_()
        self.history.fill_(float("nan"))


def capture(step: OuterStep, warmup: int = 1) -> torch.cuda.CUDAGraph:
    """Capture one call of `step` into a CUDA graph; the run's state is left as it was.

    Warm-up calls run on a side stream first, as torch.cuda.graph requires: one does
    everything that happens on a first call only (Triton's compilation, Adam's lazy state,
    cuBLAS's workspace for the stream), and each costs as much host time as an eager
    step. Afterwards parameters, Adam, the generators and the history are restored, so
    replaying the graph n times gives the same run as n eager calls from the same seed.
    """
    snap = step.snapshot()
    # Kernels go to the current device's streams: make it step's.
    with torch.cuda.device(step.device):
        try:
            side = torch.cuda.Stream(step.device)
            side.wait_stream(torch.cuda.current_stream(step.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step()
            torch.cuda.current_stream(step.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            for g in step.generators:
                graph.register_generator_state(g)
            # On `side`, not torch.cuda.graph's default capture stream: that one is made
            # once per process, on whichever device was current at the first capture, so a
            # later capture on another device would launch outside the capture.
            with torch.cuda.graph(graph, stream=side):
                step()
        finally:
            torch.cuda.synchronize(step.device)
            step.restore(snap)
    return graph
