"""Sweep runners: groups on several devices, longest first, and what happens when a
runner is lost."""

import threading

import pytest
import torch
from support import SMALL_GRID, TINY

import phase12.runners as runners
from phase12.sweep import run_sweep

SPEC = SMALL_GRID


def test_runners_per_device_counts_every_name_of_a_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    names = [
        runners.runner_device(d) for d in ["cpu", "cuda:0", "cuda", "cuda:1", "cpu:0", "cuda:2"]
    ]
    assert names[2] == "cuda:1"  # torch.cuda.set_device needs the index
    assert runners._runners_per_device(names) == [2, 1, 2, 2, 2, 1]


def test_workers_take_the_longest_cells_first(tmp_path, monkeypatch):
    """With several devices, cells reach the workers in decreasing estimated cost."""
    base = TINY.replace(outer_steps=10)
    cost = lambda **kw: runners._estimated_cost([base.replace(**kw)])  # noqa: E731
    assert cost(mode="FULL", inner_steps=20) > cost(mode="FO", inner_steps=20)
    assert cost(mode="FO", inner_steps=20) > cost(mode="FULL", inner_steps=1)
    assert runners._estimated_cost([base, base.replace(seed=1)]) == 2 * runners._estimated_cost(
        [base]
    )

    handed = []

    def in_process(groups, devices):  # the workers, without processes: record the order
        for group in groups:
            handed.append(group)
            yield group, runners._run_group(group)

    monkeypatch.setattr(runners, "_run_groups_on_workers", in_process)
    run_sweep(SPEC, tmp_path, progress=False, devices=["cpu", "cpu"])
    costs = [runners._estimated_cost(g) for g in handed]
    assert len(handed) == 4 and costs == sorted(costs, reverse=True) and costs[0] > costs[-1]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_groups_are_recorded_as_failed_when_every_runner_is_gone(monkeypatch):
    def lost_device(*args, **kwargs):
        raise RuntimeError("device lost")  # the serving thread dies before taking a group

    monkeypatch.setattr(runners, "_serve", lost_device)
    groups = [[c] for c in SPEC.configs()[:3]]
    finished = []
    collector = threading.Thread(
        target=lambda: finished.extend(runners._run_groups_on_workers(groups, ["cpu"])),
        daemon=True,
    )
    collector.start()
    collector.join(timeout=60)  # the parent used to wait forever here
    assert not collector.is_alive(), "the sweep waits for runners that are gone"
    assert [group for group, _ in finished] == groups
    for _, results in finished:
        for result, metadata in results:
            assert result.status == "ERROR" and "has exited" in result.row["error"]
            assert metadata["device"] == "cpu"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_group_whose_runner_dies_is_failed_with_the_runners_of_its_device(monkeypatch):
    def dies_mid_group(runner, device, device_runners, tasks, results):
        index, _ = tasks.get()
        results.put(("start", index, runner))
        raise RuntimeError("device lost")  # the serving thread; the worker process serves on

    monkeypatch.setattr(runners, "_serve", dies_mid_group)
    groups = [[c] for c in SPEC.configs()[:3]]
    finished = {
        group[0].run_id: results
        for group, results in runners._run_groups_on_workers(groups, ["cpu", "cpu"])
    }
    (died,) = [r for results in finished.values() for r, _ in results if r.status == "ERROR"]
    assert "died" in died.row["error"] and died.row["device_runners"] == 2
    assert len(finished) == 3
