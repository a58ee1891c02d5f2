"""The functional MAML engine against an independent, loop-based computation."""

import pytest
import torch
import torch.nn.functional as F
from support import SMALL, fresh, loop_meta_gradient, rel

from phase12.config import RunConfig
from phase12.maml import adapt, meta_batch_metrics, meta_gradient, seed_batch_metrics
from phase12.model import init_params
from phase12.model import loss as support_loss
from phase12.tasks import Tasks, sample_tasks

KW = dict(steps=SMALL.inner_steps, lr=SMALL.inner_lr, backend="reference")


def test_full_meta_gradient_matches_loop_reference():
    params, tasks = fresh()
    engine = meta_gradient(params, tasks, mode="FULL", **KW)
    loop = loop_meta_gradient(params, tasks, SMALL.inner_steps, SMALL.inner_lr)
    assert rel(loop, engine) < 1e-10


def test_fo_meta_gradient_matches_loop_reference():
    params, tasks = fresh()
    engine = meta_gradient(params, tasks, mode="FO", **KW)
    loop = loop_meta_gradient(params, tasks, SMALL.inner_steps, SMALL.inner_lr, first_order=True)
    assert rel(loop, engine) < 1e-10


def test_fo_strict_equals_fo_and_full_differs():
    params, tasks = fresh()
    full = meta_gradient(params, tasks, mode="FULL", **KW)
    fo = meta_gradient(params, tasks, mode="FO", **KW)
    strict = meta_gradient(params, tasks, mode="FO_STRICT", **KW)
    assert rel(fo, strict) < 1e-12
    assert rel(full, fo) > 1e-3
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in strict.values())


def test_k0_all_modes_agree():
    params, tasks = fresh()
    kw = dict(KW, steps=0)
    full = meta_gradient(params, tasks, mode="FULL", **kw)
    strict = meta_gradient(params, tasks, mode="FO_STRICT", **kw)
    assert rel(full, strict) < 1e-14


def test_fo_strict_records_no_inner_graph():
    """FO_STRICT's adapted parameters hang off theta by one add, nothing else."""
    params, tasks = fresh()
    theta = {n: p.requires_grad_() for n, p in params.items()}
    from phase12.maml import adapted_params

    phi = adapted_params(theta, tasks.support_x[0], tasks.support_y[0], mode="FO_STRICT", **KW)
    for n, p in phi.items():
        fn = p.grad_fn
        assert fn is not None and fn.name().startswith("AddBackward")
        assert {type(f).__name__ for f, _ in fn.next_functions if f is not None} == {
            "AccumulateGrad"
        }, n


def test_vmapped_meta_batch_equals_per_task_loop():
    params, tasks = fresh()
    losses, accs = meta_batch_metrics(params, tasks, mode="FULL", **KW)
    for b in range(tasks.support_x.shape[0]):
        one = type(tasks)(*(t[b : b + 1] for t in tasks))
        lb, ab = meta_batch_metrics(params, one, mode="FULL", **KW)
        torch.testing.assert_close(lb[0], losses[b], rtol=1e-12, atol=0)
        torch.testing.assert_close(ab[0], accs[b], rtol=0, atol=0)


def test_inner_loop_lowers_support_loss():
    params, tasks = fresh(RunConfig(dtype="float64", device="cpu", meta_batch=1))
    x, y = tasks.support_x[0], tasks.support_y[0]
    before = support_loss(params, x, y, "reference")
    after = support_loss(
        adapt(params, x, y, steps=5, lr=0.4, backend="reference"), x, y, "reference"
    )
    assert after < before - 1e-3


@pytest.mark.parametrize("mode", ["FULL", "FO_STRICT"])
def test_same_seed_is_bit_identical(mode):
    from phase12.train import run_experiment

    cfg = SMALL.replace(dtype="float32", outer_steps=6, metric_window=3, mode=mode)
    a, b = run_experiment(cfg), run_experiment(cfg)
    assert a.history == b.history
    for key in ("final_loss", "final_acc", "attn_grad_norm_q", "rel_diff_probe"):
        assert a.row[key] == b.row[key]
    c = run_experiment(cfg.replace(seed=1))
    assert c.history["loss"] != a.history["loss"]


def test_task_sampler_structure():
    cfg = RunConfig(meta_batch=4, device="cpu", noise_std=0.0)
    tasks = sample_tasks(cfg, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert tasks.support_x.shape == (4, 16, 32, 64) and tasks.query_y.shape == (4, 16)
    x = torch.cat([tasks.support_x, tasks.query_x], 1)
    y = torch.cat([tasks.support_y, tasks.query_y], 1)
    assert set(y.unique().tolist()) <= set(range(5))
    for b in range(4):
        # With noise_std 0, a signal position holds the label's prototype exactly: all
        # examples of one class share the token there, and nowhere else.
        def class_constant(t, b=b):
            return all((x[b, y[b] == c, t] == x[b, y[b] == c, t][0]).all() for c in y[b].unique())

        signal = [t for t in range(32) if class_constant(t)]
        assert len(signal) == 4 and 0 not in signal
        prototype = {int(c): x[b, y[b] == c, signal[0]][0] for c in y[b].unique()}
        for t in signal:
            for c, proto in prototype.items():
                assert torch.equal(x[b, y[b] == c, t][0], proto)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_task_sampler_matches_its_definition(dtype):
    # The module docstring's definition, drawn from the same generator in the same order
    # and built with a torch.where over every position: the sampler's x, bit for bit.
    cfg = RunConfig(meta_batch=3, seq_len=9, dim=8, signal_positions=3, dtype=dtype)
    tasks = sample_tasks(cfg, torch.Generator().manual_seed(5), torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    b, n, t, d = 3, cfg.shots + cfg.queries, 9, 8
    positions = torch.rand(b, t - 1, generator=g).argsort(dim=1)[:, :3] + 1
    prototypes = torch.randn(b, cfg.num_classes, d, dtype=cfg.torch_dtype, generator=g)
    labels = torch.randint(0, cfg.num_classes, (b, n), generator=g)
    noise = torch.randn(b, n, t, d, dtype=cfg.torch_dtype, generator=g)
    is_signal = torch.zeros(b, t, dtype=torch.bool).scatter_(1, positions, True)
    signal = prototypes[torch.arange(b)[:, None], labels]  # (b, n, d)
    x = torch.where(is_signal[:, None, :, None], signal[:, :, None] + cfg.noise_std * noise, noise)
    assert torch.equal(torch.cat([tasks.support_x, tasks.query_x], 1), x)
    assert torch.equal(torch.cat([tasks.support_y, tasks.query_y], 1), labels)


def test_param_init_is_linear_style():
    p = init_params(64, 5, torch.Generator().manual_seed(0))
    bound = 1 / 8
    assert set(p) == {"Wq", "Wk", "Wv", "Wc", "bc"}
    assert p["Wc"].shape == (5, 64) and p["bc"].shape == (5,)
    for t in p.values():
        assert t.abs().max() <= bound
    for name in ("Wq", "Wk", "Wv", "Wc"):
        assert p[name].abs().max() > 0.9 * bound


def test_seed_batched_runs_equal_separate_runs():
    """Seeds stacked into one computation follow exactly the runs they would have alone."""
    from phase12.train import run_experiment, run_experiments

    cfg = SMALL.replace(outer_steps=5, metric_window=2)
    configs = [cfg.replace(seed=s) for s in (0, 3)]
    batched = run_experiments(configs)
    for config, result in zip(configs, batched, strict=True):
        alone = run_experiment(config)
        for name in ("loss", "acc", "attn_grad_norm_q", "attn_grad_norm_k", "attn_grad_norm_v"):
            torch.testing.assert_close(
                result.history[name], alone.history[name], rtol=1e-10, atol=0
            )
        assert result.row["rel_diff_probe"] == pytest.approx(alone.row["rel_diff_probe"], rel=1e-10)
        assert result.row["seeds_batched"] == 2 and result.row["run_id"] == config.run_id


def _per_seed_tasks(n_seeds):
    """(params, tasks) of `n_seeds` fresh runs stacked along a seed dim, one task each."""
    seeds = [fresh(SMALL.replace(meta_batch=1)) for _ in range(n_seeds)]
    params = {n: torch.stack([p[n] for p, _ in seeds]) for n in seeds[0][0]}
    tasks = Tasks(*(torch.stack(parts) for parts in zip(*(t for _, t in seeds), strict=True)))
    return seeds, params, tasks


@pytest.mark.parametrize("mode", ["FULL", "FO"])
def test_one_task_per_seed_gives_each_seed_its_own_meta_gradient(mode):
    """The probes' layout (S seeds, one task each: one vmap over both) against each
    seed's loop reference on its own task."""
    seeds, params, tasks = _per_seed_tasks(3)
    batched = meta_gradient(params, tasks, mode=mode, seed_batched=True, **KW)
    for i, (p, t) in enumerate(seeds):
        loop = loop_meta_gradient(p, t, SMALL.inner_steps, SMALL.inner_lr, mode == "FO")
        assert rel(loop, {n: g[i] for n, g in batched.items()}) < 1e-10


@pytest.mark.parametrize(
    "mode, ablation",
    [("FULL", "none"), ("FO", "none"), ("FO_STRICT", "none"), ("FULL", "frozen_softmax_stats")],
)
def test_one_task_per_seed_equals_the_vmap_over_seeds_of_the_vmap_over_tasks(mode, ablation):
    """One vmap over seeds and tasks is the nested vmaps' computation, to the bit."""
    _, params, tasks = _per_seed_tasks(2)
    kw = dict(KW, mode=mode, ablation=ablation)
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    nested = torch.func.vmap(lambda p, *t: meta_batch_metrics(p, Tasks(*t), **kw))
    losses, accs = nested(leaves, *tasks)
    grads = torch.autograd.grad(losses.mean(-1).sum(), list(leaves.values()))
    one = seed_batch_metrics(params, tasks, seed_batched=True, **kw)
    assert torch.equal(one[0], losses) and torch.equal(one[1], accs)
    batched = meta_gradient(params, tasks, seed_batched=True, **kw)
    for name, g in zip(leaves, grads, strict=True):
        assert torch.equal(batched[name], g), name


def test_seed_batch_must_differ_only_in_seed():
    from phase12.train import run_experiments

    with pytest.raises(ValueError, match="differ only in their seed"):
        run_experiments([SMALL, SMALL.replace(seed=1, inner_steps=1)])
    with pytest.raises(ValueError, match="distinct seeds"):
        run_experiments([SMALL, SMALL])


def test_nonfinite_seed_batch_stops_with_every_seed_marked():
    from phase12.train import run_experiments

    cfg = SMALL.replace(outer_steps=120, inner_lr=1e30, dtype="float32")
    results = run_experiments([cfg, cfg.replace(seed=1)], check_every=50)
    assert [r.status for r in results] == ["NONFINITE", "NONFINITE"]
    assert all(r.row["nonfinite_step"] == 0 and r.history["step"] == [] for r in results)


@pytest.mark.parametrize(
    "broken",
    [
        dict(dtype="float16"),  # Adam's eps underflows: its first update divides by zero
        dict(dtype="float32", outer_lr=3e37),  # finite parameters that overflow the model
    ],
    ids=["nonfinite_parameters", "overflowing_parameters"],
)
def test_a_last_update_that_breaks_the_parameters_is_nonfinite(broken):
    """No step's metrics see the last update: its result is checked after the loop."""
    from phase12.train import run_experiment

    r = run_experiment(SMALL.replace(outer_steps=1, **broken))  # one update: the last
    assert r.status == "NONFINITE" and r.row["nonfinite_step"] == 1, r.row["error"]
    assert "after the last update (outer step 0)" in r.row["error"]
    assert r.history["step"] == [0] and r.row["rel_diff_probe"] is None
    # One more step shows it in its loss, as the first non-finite step
    r = run_experiment(SMALL.replace(outer_steps=2, **broken))
    assert r.row["nonfinite_step"] == 1 and "at outer step 1" in r.row["error"]


def test_a_nonfinite_probe_of_another_gradient_leaves_the_run_ok(monkeypatch):
    """Only the run's own meta-gradient judges its parameters: an FO run whose FULL probe
    overflows, or a share whose ablated gradient underflows to 0/0, is a failed
    measurement, not a failed run."""
    import phase12.train as train

    real, nan = train.end_probe, float("nan")

    def others_nonfinite(params, configs, device):
        values, finite = real(params, configs, device)
        nans = {"rel_diff_probe": nan, "attn_curvature_share": nan}
        return [v | nans for v in values], finite

    monkeypatch.setattr(train, "end_probe", others_nonfinite)
    r = train.run_experiment(SMALL.replace(outer_steps=1, mode="FO"))
    assert r.status == "OK", r.row["error"]
    assert r.row["rel_diff_probe"] != r.row["rel_diff_probe"]  # NaN: written blank


def test_the_probe_checks_the_runs_own_meta_gradient():
    import torch

    from phase12.probes import Probe, own_gradient_finite
    from phase12.train import initial_params

    configs = [SMALL.replace(mode="FO_STRICT", seed=s) for s in (0, 1)]
    params = [initial_params(c, torch.device("cpu")) for c in configs]
    params[1] = {n: p.detach() * (float("inf") if n == "Wq" else 1.0) for n, p in params[1].items()}
    p = Probe(params, configs, torch.device("cpu"))
    assert own_gradient_finite(p) == [True, False]
    assert set(p._cache) == {("FO", "none", "reference")}  # FO_STRICT's numbers are FO's


def test_convergence_delta_needs_two_windows_that_do_not_overlap():
    import numpy as np

    from phase12.train import summarize

    cfg = SMALL.replace(metric_window=3)
    loss = np.arange(6.0)[::-1]  # 5, 4, ..., 0
    history = np.stack([loss, *([np.ones(6)] * 4)], axis=1)
    assert summarize(cfg, history)["convergence_delta"] == 3.0  # mean(5, 4, 3) - mean(2, 1, 0)
    assert summarize(cfg, history[:5])["convergence_delta"] is None  # windows would share a step
    assert summarize(cfg, history[:3])["convergence_delta"] is None


def test_cross_entropy_equals_torch_and_its_gradients():
    from phase12.model import cross_entropy

    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (7,))
    ours, theirs = cross_entropy(logits, labels), F.cross_entropy(logits, labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=0)
    g1 = torch.autograd.grad(ours, logits, create_graph=True)[0]
    g2 = torch.autograd.grad(theirs, logits, create_graph=True)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-14, atol=1e-16)
    h1, h2 = (torch.autograd.grad(g.square().sum(), logits)[0] for g in (g1, g2))
    torch.testing.assert_close(h1, h2, rtol=1e-12, atol=1e-15)
