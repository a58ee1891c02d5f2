"""The held-out probes in a run's history: every `probe_every` steps and at the end,
each equal to the final probe of a run stopped at that step, per seed of a seed batch,
and not counted as step time."""

import math
import time

import pytest
import torch
from support import SMALL, TINY

from phase12.config import ConfigError
from phase12.probes import probe
from phase12.schema import PROBES
from phase12.train import initial_params, run_experiment, run_experiments

CONFIG = SMALL.replace(outer_steps=5, probe_every=2, metric_window=1)


def probed_steps(history) -> list[int]:
    measured = [s for s in history["step"] if history[PROBES[0]][s] is not None]
    for name in PROBES:
        assert [s for s in history["step"] if history[name][s] is not None] == measured
    return measured


def test_probes_every_n_steps_equal_the_end_of_a_run_stopped_there():
    result = run_experiment(CONFIG)
    assert probed_steps(result.history) == [1, 3, 4]
    for name in PROBES:
        assert result.history[name][4] == result.row[name]
    stopped = run_experiment(CONFIG.replace(outer_steps=2))
    for name in PROBES:
        assert math.isclose(result.history[name][1], stopped.row[name], rel_tol=1e-12), name
    assert result.history[PROBES[0]][1] != result.history[PROBES[0]][3]


def test_each_seed_of_a_batch_is_probed_on_its_own_parameters():
    configs = [CONFIG.replace(seed=s) for s in (3, 4)]
    batched = run_experiments(configs)
    for config, got in zip(configs, batched, strict=True):
        alone = run_experiment(config)
        assert probed_steps(got.history) == [1, 3, 4]
        for name in PROBES:
            got_values = [x for x in got.history[name] if x is not None]
            want_values = [x for x in alone.history[name] if x is not None]
            assert got_values == pytest.approx(want_values, rel=1e-9), name


def test_probe_every_zero_probes_the_end_only():
    result = run_experiment(CONFIG.replace(probe_every=0))
    assert probed_steps(result.history) == [4]


def test_probes_are_not_step_time(monkeypatch):
    import phase12.train

    class Clock:  # each probe takes 100 s on the run's clock: as step time it would show
        offset = 0.0

        @staticmethod
        def perf_counter() -> float:
            return time.perf_counter() + Clock.offset

    def slow(real):
        def probe(*args):
            Clock.offset += 100.0
            return real(*args)

        return probe

    for name in ("probe", "end_probe"):  # during training, and at the end
        monkeypatch.setattr(phase12.train, name, slow(getattr(phase12.train, name)))
    monkeypatch.setattr(phase12.train, "time", Clock)
    result = run_experiment(CONFIG.replace(probe_every=1, dtype="float32"))
    assert probed_steps(result.history) == [0, 1, 2, 3, 4]
    assert result.row["mean_outer_step_time_s"] < 50  # 4 probes of 100 s in the timed loop
    assert 500 < result.row["probe_time_s"] < result.row["wall_time_total_s"] < 600
    assert 0 < result.row["setup_time_s"] < result.row["wall_time_total_s"]


def test_a_negative_probe_interval_is_refused():
    with pytest.raises(ConfigError, match="probe_every must be >= 0"):
        CONFIG.replace(probe_every=-1)


@pytest.mark.parametrize("backend", ["triton_fused", "triton_step"])
def test_seeds_probed_together_equal_each_probed_alone_on_the_triton_backends(backend):
    """One vmap over the seeds through the fused attention Functions (and, for
    triton_step, its fused inner step), the curvature ablations included."""
    configs = [TINY.replace(backend=backend, dtype="float64", seed=s) for s in (5, 6)]
    params = [initial_params(c, torch.device("cpu")) for c in configs]
    together = probe(params, configs, torch.device("cpu"))
    for p, c, got in zip(params, configs, together, strict=True):
        alone = probe([p], [c], torch.device("cpu"))[0]
        assert got.keys() == alone.keys() == set(PROBES)
        for name in PROBES:
            assert got[name] == pytest.approx(alone[name], rel=1e-9, abs=1e-13), name
    assert together[0]["rel_diff_probe"] != together[1]["rel_diff_probe"]
