"""One Phase 12 run: the outer loop, its metrics, and the result row.

    result = run_experiment(RunConfig(mode="FULL", inner_steps=20))
    result.row        # the per-run CSV row (phase12.records.RUN_COLUMNS)
    result.history    # per outer step: loss, acc, attention meta-gradient norms

`run_experiments` trains several seeds of one configuration as one seed-batched
computation. The outer loop is Adam on the meta-parameters (phase12.step.OuterStep), replayed
from one CUDA graph per run on CUDA unless cuda_graph is 'off'. Per-step metrics
stay on the device in one preallocated tensor and are read back in bulk every
`check_every` steps, which is also when a non-finite loss or gradient is detected:
the run then stops with status NONFINITE and the first bad step.
"""

from __future__ import annotations

import gc
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kernels import attention
from phase12.config import ConfigError, Mode, RunConfig
from phase12.distributed import SINGLE_PROCESS, World
from phase12.maml import meta_gradient, relative_difference
from phase12.model import ATTENTION_PARAMS, FUSED_STEP, Params, init_params
from phase12.step import METRICS, OuterStep, capture
from phase12.tasks import sample_tasks_for

STATUS_OK, STATUS_NONFINITE, STATUS_ERROR = "OK", "NONFINITE", "ERROR"
PROBE_SEED_OFFSET = 1_000_003  # the rel_diff probe's task stream, disjoint from training's


@dataclass
class RunResult:
    row: dict
    history: dict[str, list] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.row["status"]


def task_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


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


def attention_gradgrad_ok(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Do second derivatives reach the attention inputs through this backend (finite, non-zero)?

    For triton_step (no attention call of its own in the inner loop): does the fused inner
    step's backward carry a Hessian term into Wq, Wk, Wv?
    """
    g = torch.Generator(device=device).manual_seed(0)
    if backend == FUSED_STEP:
        from phase12.fused_step import sgd_step

        cpu = torch.Generator().manual_seed(0)  # init_params draws on the CPU
        params = init_params(16, 5, cpu, device=device, dtype=dtype)
        params = {n: p.requires_grad_() for n, p in params.items()}
        x = torch.randn(3, 5, 16, generator=g, device=device, dtype=dtype)
        y = torch.randint(0, 5, (3,), generator=g, device=device)
        phi = sgd_step(params, x, y, lr=1.0, second_order=True)
        v = {
            n: torch.randn(p.shape, generator=g, device=device, dtype=dtype) for n, p in phi.items()
        }
        back = torch.autograd.grad(list(phi.values()), list(params.values()), list(v.values()))
        # The step's backward is v - H v: the Hessian term is what is not v.
        back = dict(zip(params, back, strict=True))
        second = torch.cat([(back[n] - v[n]).flatten() for n in ATTENTION_PARAMS])
    else:
        q, k, v = (
            torch.randn(2, 1, n, 16, generator=g, device=device, dtype=dtype).requires_grad_()
            for n in (3, 5, 5)
        )
        out = attention(q, k, v, backend=backend)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
        second = torch.cat(
            [
                s.flatten()
                for s in torch.autograd.grad(sum(gr.square().sum() for gr in grads), (q, k, v))
            ]
        )
    return bool(torch.isfinite(second).all() and second.abs().max() > 0)


def rel_diff_probe(params: Params, config: RunConfig, device: torch.device) -> float:
    """||g_FULL - g_FO|| / ||g_FULL|| of the meta-gradient on one fresh task."""
    gen = task_generator(config.seed + PROBE_SEED_OFFSET, device)
    tasks = sample_tasks_for(config, gen, device, meta_batch=1)
    kw = dict(steps=config.inner_steps, lr=config.inner_lr, backend=config.backend)
    full = meta_gradient(params, tasks, mode=Mode.FULL, **kw)
    fo = meta_gradient(params, tasks, mode=Mode.FO, **kw)
    return float(relative_difference(full, fo))


def _window_mean(values: np.ndarray, window: int, first: bool = False) -> float:
    part = values[:window] if first else values[-window:]
    return float(part.mean()) if len(part) else float("nan")


def summarize(config: RunConfig, history: np.ndarray) -> dict:
    """Final metrics from the (steps, 5) history of a run (last `metric_window` steps)."""
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
        "convergence_delta": _window_mean(loss, w, first=True) - _window_mean(loss, w),
    }


def _config_columns(config: RunConfig, device: torch.device) -> dict:
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
        "num_signal_positions": config.signal_positions,
        "dtype": config.dtype,
        "compute_dtype": config.dtype,
        "autocast": False,
        "device": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


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
        dtype=c.torch_dtype,
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
            f"{str(e).splitlines()[0] if str(e) else ''}); running eagerly. "
            "Pass --cuda-graph off to skip the attempt.",
            file=sys.stderr,
        )
        step = build_step(configs, device, world)
        return step, step, False


def _check_seed_group(configs: Sequence[RunConfig]) -> None:
    if not configs:
        raise ValueError("no configuration to run")
    if len({c.replace(seed=0) for c in configs}) != 1:
        raise ValueError("runs batched together must differ only in their seed")
    if len({c.seed for c in configs}) != len(configs):
        raise ValueError("runs batched together need distinct seeds")


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
    """
    _check_seed_group(configs)
    device = configs[0].validate()
    if configs[0].meta_batch % world.size:
        raise ConfigError(
            f"--meta-batch {configs[0].meta_batch} does not divide over {world.size} ranks; "
            f"use a multiple of {world.size}"
        )
    config, seeds = configs[0], len(configs)
    t_start = time.perf_counter()
    cuda = device.type == "cuda"
    if cuda:
        # The peak is this batch's own: earlier runs of the process (a sweep) are
        # collected first, and whatever stays allocated is subtracted. The memory
        # statistics need CUDA initialised (the first run of a fresh process).
        torch.cuda.init()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    mem_before = torch.cuda.memory_allocated(device) if cuda else 0
    state, run_step, graphed = prepare_step(configs, device, world)
    history = state.history

    nonfinite = [None] * seeds  # first non-finite step per seed
    t_loop = time.perf_counter()
    t_first = t_loop
    label = config.run_id if seeds == 1 else f"{config.run_id} (+{seeds - 1} seeds)"
    bar = tqdm(total=config.outer_steps, disable=not progress, desc=label, leave=False)
    with bar:
        for step in range(config.outer_steps):
            run_step()
            bar.update(1)
            if step == 0:
                history[:, 0].sum().item()  # one sync: the first step (warm-up) is timed apart
                t_first = time.perf_counter()
            if (step + 1) % check_every == 0 or step == config.outer_steps - 1:
                lo = (step // check_every) * check_every
                chunk = history[:, lo : step + 1].cpu().numpy()
                for i, bad in enumerate(~np.isfinite(chunk).all(axis=2)):
                    if nonfinite[i] is None and bad.any():
                        nonfinite[i] = lo + int(np.argmax(bad))
                if all(n is not None for n in nonfinite):
                    break
                bar.set_postfix(loss=f"{chunk[0, -1, 0]:.4f}", acc=f"{chunk[0, -1, 1]:.3f}")
    if cuda:
        torch.cuda.synchronize(device)
    t_end = time.perf_counter()

    shared = {
        "cuda_graph": graphed,
        "sdpa_input_gradgrad_ok": attention_gradgrad_ok(config.backend, device, config.torch_dtype),
        # Steps after the first (which pays for warm-up and kernel compilation).
        "mean_outer_step_time_s": ((t_end - t_first) / step if step else t_end - t_loop) / seeds,
        "peak_cuda_mem_bytes": torch.cuda.max_memory_allocated(device) - mem_before
        if cuda
        else None,
        "seeds_batched": seeds,
        "world_size": world.size,
    }
    results = []
    for i, cfg in enumerate(configs):
        done = cfg.outer_steps if nonfinite[i] is None else nonfinite[i]
        hist = history[i, :done].cpu().numpy()
        row = _config_columns(cfg, device) | summarize(cfg, hist) | shared
        row["nonfinite_step"] = nonfinite[i]
        if nonfinite[i] is None:
            probe = rel_diff_probe(state.seed_params(i), cfg, device)
            row.update(status=STATUS_OK, error="", rel_diff_probe=probe)
        else:
            row.update(
                status=STATUS_NONFINITE,
                rel_diff_probe=None,
                error=f"loss or meta-gradient became non-finite at outer step {nonfinite[i]}",
            )
        history_out = {"step": list(range(done))}
        for j, name in enumerate(METRICS):
            history_out[name] = hist[:, j].tolist()
        results.append(RunResult(row=row, history=history_out))
    wall = (time.perf_counter() - t_start) / seeds
    for r in results:
        r.row["wall_time_total_s"] = wall
    return results


def run_experiment(
    config: RunConfig,
    *,
    progress: bool = False,
    check_every: int = 50,
    world: World = SINGLE_PROCESS,
) -> RunResult:
    """Train one run to the end (or to its first non-finite step). Validates `config` first."""
    return run_experiments([config], progress=progress, check_every=check_every, world=world)[0]


def failed_result(config: RunConfig, error: BaseException) -> RunResult:
    """The row of a run that raised: configuration columns, status ERROR and the error."""
    try:
        device = config.validate()
    except Exception:
        device = torch.device("cpu")
    row = _config_columns(config, device)
    row.update(status=STATUS_ERROR, error=f"{type(error).__name__}: {error}".replace("\n", " "))
    return RunResult(row=row)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(config: RunConfig) -> dict:
    """Config, versions, device and commit of a run, for the JSON beside its outputs."""
    device = config.validate()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    return {
        "config": asdict(config),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
