"""Training runs: the outer loop, its non-finite scan, and the result rows.

    result = run_experiment(RunConfig(mode="FULL", inner_steps=20))
    result.row        # the per-run CSV row (phase12.schema.RUN_COLUMNS)
    result.history    # per outer step: loss, acc, attention meta-gradient norms

`run_experiments` trains several seeds of one configuration as one seed-batched
computation. The outer step (phase12.step.OuterStep: the meta-batch, the k inner steps,
the meta-gradient and Adam) is replayed from one CUDA graph per seed group (its seeds
share it) on CUDA unless cuda_graph is 'off'. Per-step metrics stay on the device in one
preallocated tensor and are read back in bulk every `check_every` steps, which is also
when a non-finite loss or gradient is detected: the run then stops with status NONFINITE
and the first bad step.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from phase12.backends import device_for
from phase12.config import ConfigError, RunConfig, resolve_device
from phase12.distributed import SINGLE_PROCESS, World
from phase12.model import Params, init_params
from phase12.probes import end_probe, probe, second_order_reaches_attention
from phase12.provenance import device_name
from phase12.schema import (
    METRICS,
    PROBES,
    STATUS_ERROR,
    STATUS_NONFINITE,
    STATUS_OK,
    STATUS_UNSUPPORTED,
    RunResult,
)
from phase12.step import OuterStep, capture
from phase12.tasks import task_generator


def initial_params(config: RunConfig, device: torch.device) -> Params:
    """Meta-parameters of a run: leaf tensors that require grad."""
    params = init_params(
        config.dim,
        config.num_classes,
        torch.Generator().manual_seed(config.seed),
        device=device,
        dtype=config.torch_dtype,
    )
    return {n: p.requires_grad_(True) for n, p in params.items()}


def build_step(
    configs: Sequence[RunConfig], device: torch.device, world: World = SINGLE_PROCESS
) -> OuterStep:
    """Fresh state (parameters, Adam, task streams, empty history) of runs that differ
    only in their seed, as one OuterStep (seed-batched when there are several)."""
    batched = len(configs) > 1
    per_seed = [initial_params(c, device) for c in configs]
    params = per_seed[0]
    if batched:
        params = {
            n: torch.stack([p[n] for p in per_seed]).detach().requires_grad_(True) for n in params
        }
    c = configs[0]
    history = torch.full(
        (len(configs), c.outer_steps, len(METRICS)),
        float("nan"),
        device=device,
        dtype=torch.promote_types(c.torch_dtype, torch.float32),  # metrics of half runs too
    )
    generators = [task_generator(cfg.seed, device) for cfg in configs]
    return OuterStep(params, c, device, generators, history, seed_batched=batched, world=world)


def prepare_step(
    configs: Sequence[RunConfig], device: torch.device, world: World
) -> tuple[OuterStep, Callable, bool]:
    """(state, the callable that runs one step, whether it is a CUDA graph replay).

    With cuda_graph 'auto' a failed capture is reported on stderr (with the reason)
    and the run goes on eagerly from fresh state (a failed capture can leave the task
    generators unusable); with 'on' it raises.
    """
    step = build_step(configs, device, world)
    config = configs[0]
    if device.type != "cuda" or config.cuda_graph == "off":
        return step, step, False
    try:
        return step, capture(step).replay, True
    except Exception as e:
        if config.cuda_graph == "on":
            raise
        print(
            f"warning: {config.run_id}: CUDA graph capture failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); running eagerly "
            "(cuda_graph 'off' skips the attempt).",
            file=sys.stderr,
        )
        step = build_step(configs, device, world)
        return step, step, False


@dataclass
class LoopOutcome:
    """What the outer loop saw: the first non-finite step of each seed (None: none) and
    the mean seconds per step after the first (which pays for warm-up and compilation),
    probes excluded."""

    nonfinite: list[int | None]
    step_time_s: float


class PeakMemory:
    """Peak CUDA memory allocated inside the block above what was allocated before it
    (`peak` is None on the CPU), but for what runs under `excluded()`. Earlier runs of
    the process are collected first."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None
        self._cuda = device.type == "cuda"

    def __enter__(self) -> PeakMemory:
        if self._cuda:
            torch.cuda.init()  # the memory statistics need CUDA initialised
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = self._seen = torch.cuda.memory_allocated(self.device)
        return self

    @contextlib.contextmanager
    def excluded(self):
        """Whatever runs inside does not count towards the peak."""
        if self._cuda:
            self._seen = max(self._seen, torch.cuda.max_memory_allocated(self.device))
        yield
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def __exit__(self, *exc) -> None:
        if self._cuda:
            peak = max(self._seen, torch.cuda.max_memory_allocated(self.device))
            self.peak = peak - self._before


class PeriodicProbes:
    """The held-out probes (phase12.probes.probe) of each seed's parameters after every
    `config.probe_every`-th outer step but the last (the run's end is probed apart):
    `values[i][step]`, and the seconds they took."""

    def __init__(
        self,
        state: OuterStep,
        configs: Sequence[RunConfig],
        device: torch.device,
        memory: PeakMemory,
    ):
        self.state, self.configs, self.device, self.memory = state, configs, device, memory
        self.every = configs[0].probe_every
        self.values: list[dict[int, dict]] = [{} for _ in configs]
        self.seconds = 0.0

    def __call__(self, step: int, steps: int) -> None:
        if not self.every or (step + 1) % self.every or step == steps - 1:
            return
        if self.device.type == "cuda":  # the queued steps are step time, not probe time
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        seeds = range(len(self.configs))
        with self.memory.excluded():  # peak memory is training's
            values = probe([self.state.seed_params(i) for i in seeds], self.configs, self.device)
        for i in seeds:
            self.values[i][step] = values[i]
        self.seconds += time.perf_counter() - t0


def train_loop(
    run_step: Callable,
    history: torch.Tensor,
    steps: int,
    check_every: int,
    bar: tqdm,
    probes: PeriodicProbes | None = None,
) -> LoopOutcome:
    """Run `steps` outer steps, scanning `history` (S, steps, metrics) every
    `check_every` steps and calling `probes` after each step (their seconds are not step
    time); stop early once every seed has gone non-finite."""
    nonfinite: list[int | None] = [None] * history.shape[0]
    t_loop = t_first = time.perf_counter()
    for step in range(steps):
        run_step()
        bar.update(1)
        if step == 0:
            history[:, 0].sum().item()  # one sync: the first step (warm-up) is timed apart
            t_first = time.perf_counter()
        if probes is not None:
            probes(step, steps)
        if (step + 1) % check_every == 0 or step == steps - 1:
            lo = (step // check_every) * check_every
            chunk = history[:, lo : step + 1].cpu().numpy()
            for i, bad in enumerate(~np.isfinite(chunk).all(axis=2)):
                if nonfinite[i] is None and bad.any():
                    nonfinite[i] = lo + int(np.argmax(bad))
            if all(n is not None for n in nonfinite):
                break
            bar.set_postfix(loss=f"{chunk[0, -1, 0]:.4f}", acc=f"{chunk[0, -1, 1]:.3f}")
    if history.device.type == "cuda":
        torch.cuda.synchronize(history.device)
    t_end = time.perf_counter()
    loop_s = t_end - t_first - (probes.seconds if probes is not None else 0.0)
    return LoopOutcome(nonfinite, loop_s / step if step else t_end - t_loop)


def _window_mean(values: np.ndarray, window: int, first: bool = False) -> float:
    part = values[:window] if first else values[-window:]
    return float(part.mean()) if len(part) else float("nan")


def summarize(config: RunConfig, history: np.ndarray) -> dict:
    """Final metrics from the (steps, 5) history of a run (last `metric_window` steps);
    convergence_delta, the first window's mean loss minus the last's, only where the two
    windows do not overlap (None otherwise: a shorter run has no earlier loss to compare)."""
    w = config.metric_window
    loss, acc, gq, gk, gv = history.T
    norms = {"q": _window_mean(gq, w), "k": _window_mean(gk, w), "v": _window_mean(gv, w)}
    return {
        "final_loss": _window_mean(loss, w),
        "final_acc": _window_mean(acc, w),
        "attn_grad_norm_q": norms["q"],
        "attn_grad_norm_k": norms["k"],
        "attn_grad_norm_v": norms["v"],
        "attn_grad_norm": math.sqrt(sum(x * x for x in norms.values())),
        "attn_grad_present": bool(len(history) and all(x > 0 for x in norms.values())),
        "convergence_delta": (
            _window_mean(loss, w, first=True) - _window_mean(loss, w)
            if len(history) >= 2 * w
            else None
        ),
    }


def _config_columns(config: RunConfig, device: torch.device) -> dict:
    """The configuration's columns of a run row (the seed project's names)."""
    return {
        "run_id": config.run_id,
        "backend": config.backend,
        "mode": config.mode,
        "inner_steps": config.inner_steps,
        "seed": config.seed,
        "meta_batch": config.meta_batch,
        "outer_lr": config.outer_lr,
        "outer_steps": config.outer_steps,
        "inner_lr": config.inner_lr,
        "seq_len": config.seq_len,
        "dim": config.dim,
        "num_signal_positions": config.signal_positions,
        "dtype": config.dtype,
        "compute_dtype": str(config.compute_dtype).removeprefix("torch."),
        "autocast": config.compute_dtype != config.torch_dtype,
        "loss_scale": config.loss_scale,
        "device": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "ablation": config.ablation,
    }


def _result(
    config: RunConfig,
    history: np.ndarray,
    nonfinite: int | None,
    device: torch.device,
    shared: dict,
    probed: dict[int, dict],
) -> RunResult:
    """One run's RunResult from its history (up to its first non-finite step) and its
    probes (`probed`, by step; a finished run's include its last step); `shared` holds the
    columns of its seed batch."""
    row = _config_columns(config, device) | summarize(config, history) | shared
    row["nonfinite_step"] = nonfinite
    if nonfinite is None:
        row.update(status=STATUS_OK, error="", **probed[len(history) - 1])
    else:
        error = f"loss or meta-gradient became non-finite at outer step {nonfinite}"
        if nonfinite == config.outer_steps:  # found after the loop (run_experiments)
            error = (
                f"the parameters after the last update (outer step {nonfinite - 1}) are "
                "non-finite or give a non-finite meta-gradient on the held-out task"
            )
        row.update(status=STATUS_NONFINITE, rel_diff_probe=None, error=error)
    columns = {name: history[:, j].tolist() for j, name in enumerate(METRICS)}
    steps = range(len(history))
    columns |= {name: [probed.get(s, {}).get(name) for s in steps] for name in PROBES}
    return RunResult(row=row, history={"step": list(steps)} | columns)


def _check_seed_group(configs: Sequence[RunConfig], world: World) -> torch.device:
    """The device of runs that can train as one seed batch here; ConfigError otherwise."""
    if not configs:
        raise ValueError("no configuration to run")
    if len({c.replace(seed=0) for c in configs}) != 1:
        raise ValueError("runs batched together must differ only in their seed")
    if len({c.seed for c in configs}) != len(configs):
        raise ValueError("runs batched together need distinct seeds")
    world.check_divides(configs[0].meta_batch)
    return device_for(configs[0], len(configs))


def run_experiments(
    configs: Sequence[RunConfig],
    *,
    progress: bool = False,
    check_every: int = 50,
    world: World = SINGLE_PROCESS,
) -> list[RunResult]:
    """Train runs that differ only in their seed as one seed-batched computation.

    Each run ends at its own first non-finite step (status NONFINITE); the batch stops
    when every run has ended. Times in the rows are the batch's divided by its number
    of seeds (each run's share); peak memory is the batch's. With several ranks
    (`world`), each computes its slice of every meta-batch (phase12.distributed).
    Raises ConfigError, before any work, for configurations that cannot run here.
    """
    device = _check_seed_group(configs, world)
    config, seeds = configs[0], len(configs)
    t_start = time.perf_counter()
    label = config.run_id if seeds == 1 else f"{config.run_id} (+{seeds - 1} seeds)"
    with PeakMemory(device) as memory:
        state, run_step, graphed = prepare_step(configs, device, world)
        t_setup = time.perf_counter() - t_start
        probes = PeriodicProbes(state, configs, device, memory)
        with tqdm(total=config.outer_steps, disable=not progress, desc=label, leave=False) as bar:
            loop = train_loop(run_step, state.history, config.outer_steps, check_every, bar, probes)
    shared = {
        "cuda_graph": graphed,
        "sdpa_input_gradgrad_ok": second_order_reaches_attention(
            config.backend, device, config.torch_dtype
        ),
        "mean_outer_step_time_s": loop.step_time_s / seeds,
        "peak_cuda_mem_bytes": memory.peak,
        "seeds_batched": seeds,
        "world_size": world.size,
        "device_runners": 1,  # phase12.runners says so where runners share the device
    }
    t_end_probes = time.perf_counter()
    finished = [i for i, bad in enumerate(loop.nonfinite) if bad is None]
    if finished:  # the end of every finished run, probed together
        params = [state.seed_params(i) for i in finished]
        ends, finite = end_probe(params, [configs[i] for i in finished], device)
        for i, values, ok in zip(finished, ends, finite, strict=True):
            # The run's own meta-gradient non-finite there: the last update broke the
            # parameters (non-finite, or overflowing the model), which no step's metrics
            # saw and the next step's loss would say.
            if ok:
                probes.values[i][configs[i].outer_steps - 1] = values
            else:
                loop.nonfinite[i] = configs[i].outer_steps
    results = []
    for i, (cfg, bad) in enumerate(zip(configs, loop.nonfinite, strict=True)):
        history = state.history[i, : cfg.outer_steps if bad is None else bad].cpu().numpy()
        results.append(_result(cfg, history, bad, device, shared, probes.values[i]))
    t_end = time.perf_counter()
    for r in results:  # each run's share of the batch's times
        r.row["wall_time_total_s"] = (t_end - t_start) / seeds
        r.row["setup_time_s"] = t_setup / seeds
        r.row["probe_time_s"] = (probes.seconds + t_end - t_end_probes) / seeds
    return results


def run_experiment(
    config: RunConfig,
    *,
    progress: bool = False,
    check_every: int = 50,
    world: World = SINGLE_PROCESS,
) -> RunResult:
    """Train one run to the end (or to its first non-finite step)."""
    return run_experiments([config], progress=progress, check_every=check_every, world=world)[0]


def failed_result(config: RunConfig, error: BaseException) -> RunResult:
    """The row of a run that raised: configuration columns, status ERROR and the error."""
    return _not_run(config, STATUS_ERROR, f"{type(error).__name__}: {error}")


def unsupported_result(config: RunConfig, limit: str) -> RunResult:
    """The row of a run beyond its backend's limits: status UNSUPPORTED and the limit."""
    return _not_run(config, STATUS_UNSUPPORTED, limit)


def _not_run(config: RunConfig, status: str, why: str) -> RunResult:
    try:
        device = resolve_device(config.device)
    except ConfigError:
        device = torch.device("cpu")
    row = _config_columns(config, device)
    row.update(status=status, error=why.replace("\n", " "))
    return RunResult(row=row)
