"""Seed groups trained on devices, and their results handed back as they finish.

    for group, results in run_groups(groups, devices=["cuda:0", "cuda:1"]):
        ...                     # results: [(RunResult, metadata)], one per run of group

With several devices, one runner per device takes groups from one queue: a thread of
this process for the first device (it has imported everything already and starts at
once), a worker process for each other one. The calling thread only receives results
(phase12.sweep writes them), so one process writes a sweep's folder. A group that fails
is recorded as failed (status ERROR) and the others go on; so are the groups of a runner
that dies.

A device named more than once (`cuda:0,cuda:0`) gets a runner for each: one runner's
host work (set-up, probes) then overlaps another's steps, so a sweep of small models
finishes sooner, but each run's step times include the other runners' turns on the
device. Its row says how many runners the device had (device_runners), and the report
does not read those step times as the backend's speed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import torch

from phase12.config import Mode, RunConfig, resolve_device
from phase12.provenance import run_metadata
from phase12.schema import RunResult
from phase12.train import failed_result, run_experiments

Outcome = list[tuple[RunResult, dict]]  # (result, metadata) per run of a group


def run_groups(groups: list[list[RunConfig]], devices: Sequence[str] | None) -> Iterator:
    """Yield (group, Outcome) as `groups` finish: on one device (or, with none given,
    each run's own) one after the other in this thread, in order; on several, by their
    runners, longest first, so that no runner is left with a long group while the others
    idle. `devices`: names from runner_device."""
    if devices and len(devices) > 1:
        yield from _run_groups_on_workers(
            sorted(groups, key=_estimated_cost, reverse=True), devices
        )
        return
    for group in groups:
        if devices:
            group = [c.replace(device=devices[0]) for c in group]
        yield group, _run_group(group)


def _estimated_cost(group: list[RunConfig]) -> float:
    """Relative cost of a group of runs: steps x inner steps, FULL's double backward x2."""
    c = group[0]
    per_step = (c.inner_steps + 1) * (2 if c.mode == Mode.FULL else 1) * c.meta_batch * c.seq_len
    return len(group) * c.outer_steps * per_step


def _run_group(configs: list[RunConfig]) -> Outcome:
    """(result, metadata) per run of a seed group; metadata is taken where the runs ran."""
    try:
        results = run_experiments(configs)
    except Exception as e:  # a failing cell is recorded, the sweep goes on
        results = [failed_result(c, e) for c in configs]
    return _with_metadata(results, configs)


def _with_metadata(results: list[RunResult], configs: list[RunConfig]):
    """(result, metadata) per run; metadata is taken where the runs ran."""
    return [
        (r, run_metadata(c, resolve_device(c.device)))
        for r, c in zip(results, configs, strict=True)
    ]


def _serve(runner: int, device: str, device_runners: int, tasks, results) -> None:
    """Run groups from `tasks` on `device`, which `device_runners` runners share, until a
    None; report ("start"/"done", index, ...)."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(device)  # allocations and graph captures default to it
    while True:
        item = tasks.get()
        if item is None:
            return
        index, configs = item
        results.put(("start", index, runner))
        done = _run_group([c.replace(device=device) for c in configs])
        results.put(("done", index, _shared_by(done, device_runners)))


def _shared_by(outcome: Outcome, device_runners: int) -> Outcome:
    """`outcome` with each row's device_runners set."""
    for result, _ in outcome:
        result.row["device_runners"] = device_runners
    return outcome


def runner_device(device: str) -> str:
    """A checked device as a runner needs it: with its index ('cuda' is the current CUDA
    device; torch.cuda.set_device takes no bare 'cuda'), 'auto' resolved."""
    d = resolve_device(device)
    if d.type == "cuda" and d.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(d)


def _runners_per_device(devices: Sequence[str]) -> list[int]:
    """For each runner of `devices` (names from runner_device), how many runners its
    device has; every CPU runner shares the host's cores."""
    keys = [(d.type, d.index if d.type == "cuda" else None) for d in map(torch.device, devices)]
    return [keys.count(k) for k in keys]


def _exit_with(parent: int) -> None:
    """Exit this process as soon as `parent` is gone (checked every second): a parent
    that exits without ending its workers (Ctrl-C while a group runs, SIGKILL) leaves
    nobody to read their results."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _worker(runner: int, device: str, device_runners: int, parent: int, tasks, results) -> None:
    """A worker process: serves until the queue ends or its parent is gone, mid-group
    too. Ctrl-C reaches it with the parent; the parent says so, the worker just stops."""
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    try:
        _serve(runner, device, device_runners, tasks, results)
    except KeyboardInterrupt:
        pass


RUNNER_THREAD = "sweep runner 0"


def runner_thread_alive() -> bool:
    """Whether the runner thread of a sweep (_run_groups_on_workers) is still running,
    e.g. inside torch after Ctrl-C reached the main thread."""
    return any(t.name == RUNNER_THREAD and t.is_alive() for t in threading.enumerate())


def _run_groups_on_workers(groups: list[list[RunConfig]], devices: Sequence[str]):
    """Yield (group, [(result, metadata)]) as the devices finish groups.

    The first device is served by a thread of this process, which has imported
    everything already and starts at once (a worker process spends seconds importing
    torch and initialising CUDA); every other device gets a worker process. All take
    groups from one queue, so a late starter simply takes fewer. A device named more than
    once gets a runner for each; their runs' rows say how many (device_runners). The
    calling thread only receives results: it makes no CUDA calls that could disturb the
    serving thread's graph captures. Groups of a runner that dies are recorded as failed.
    """
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in enumerate(groups):
        tasks.put(item)
    for _ in devices:
        tasks.put(None)
    sharing = _runners_per_device(devices)
    runners = [
        threading.Thread(
            target=_serve,
            args=(0, devices[0], sharing[0], tasks, results),
            name=RUNNER_THREAD,
            daemon=True,
        )
    ]
    runners += [
        ctx.Process(
            target=_worker, args=(i, d, sharing[i], os.getpid(), tasks, results), daemon=True
        )
        for i, d in enumerate(devices[1:], start=1)
    ]
    for r in runners:
        r.start()
    running: dict[int, int] = {}  # runner -> index of the group it is on
    pending = set(range(len(groups)))  # not yet reported back
    try:
        while pending:
            try:
                kind, index, payload = results.get(timeout=1.0)
            except queue.Empty:
                for i, r in enumerate(runners):
                    if not r.is_alive() and i in running:  # died mid-group
                        index = running.pop(i)
                        code = getattr(r, "exitcode", None)  # threads have none
                        error = RuntimeError(f"sweep worker on {devices[i]} died (exit {code})")
                        pending.discard(index)
                        yield (
                            groups[index],
                            _shared_by(_failed_group(groups[index], error), sharing[i]),
                        )
                if not any(r.is_alive() for r in runners):  # nobody left to take the rest
                    error = RuntimeError(f"every sweep worker ({', '.join(devices)}) has exited")
                    for index in sorted(pending):
                        yield groups[index], _failed_group(groups[index], error)
                    return
                continue
            if kind == "start":
                running[payload] = index
                continue
            running = {i: g for i, g in running.items() if g != index}
            pending.discard(index)
            yield groups[index], payload
    finally:
        for r in runners[1:]:
            r.join(timeout=5)
            if r.is_alive():
                r.terminate()


def _failed_group(configs: list[RunConfig], error: BaseException) -> Outcome:
    return _with_metadata([failed_result(c, error) for c in configs], configs)
