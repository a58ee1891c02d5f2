"""`run.py bench {step,attention,tiles,distributed}`: parse, measure, write tables and CSVs.

The measurements are phase12.benchmarks'; the figures and markdown tables the
analysis package's. Each benchmark's flags are listed by `run.py bench NAME --help`.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

from kernels import BackendUnavailable, check_backend
from phase12.backends import NAMES, device_for, get
from phase12.cli.parsing import (
    ArgumentParser,
    PickedDefault,
    add_config_flags,
    add_grid_flags,
    check_writable,
    config_from_args,
    csv_list,
    default_backends,
    positive_int,
)
from phase12.config import MODES, ConfigError, RunConfig, resolve_device

BENCHMARKS = ("step", "attention", "tiles", "distributed")


def _out(p: ArgumentParser, name: str) -> None:
    default = Path("out") / f"bench_{name}"
    p.add_argument("--out", type=Path, default=default, help=f"output folder (default {default})")


def _show(table) -> None:
    """Print a result table, numbers to three decimals."""
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


# The scaling table's axes: their default values, and what they are.
SCALING_AXES = {
    "k": ((1, 5, 10, 20, 40), "inner steps"),
    "meta_batch": ((16, 64, 256, 1024), "meta-batches"),
    "seq_len": ((32, 128, 512, 1024, 4096), "sequence lengths"),
}


# The step table's axes, as the sweep's grid flags (FULL's ablations timed beside the
# modes).
STEP_GRID = {
    "mode": MODES,
    "inner_steps": (1, 5, 10, 20),
    "backend": PickedDefault("every backend on CUDA, reference on the CPU"),
    "ablation": ("none",),
    "dtype": ("float32",),
}


def _step_parser() -> ArgumentParser:
    from phase12.benchmarks import step

    p = ArgumentParser(prog="run.py bench step", description=step.__doc__)
    add_grid_flags(p, STEP_GRID)
    p.add_argument(
        "--execution",
        type=csv_list(str, ("eager", "graph")),
        default=None,
        help="eager and/or graph (default: eager,graph on CUDA, eager on CPU)",
    )
    add_config_flags(p, ["device", "meta_batch", "seq_len", "dim", "signal_positions"])
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per cell (default 3)")
    p.add_argument("--reps", type=int, default=20, help="timed steps per cell (default 20)")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="CUDA: also profile each eager cell and split its step into GPU work, in-graph "
        "gaps and host time (breakdown.csv; implies --execution eager,graph)",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="also the scaling table: FULL and FO_STRICT against k, meta-batch and T, one "
        "varied at a time (the others at the largest --k and at --meta-batch, --seq-len; "
        "float32)",
    )
    for axis, (default, what) in SCALING_AXES.items():
        p.add_argument(
            f"--scaling-{axis.replace('_', '-')}",
            type=csv_list(int),
            default=None,  # given without --scaling: refused, not ignored
            help=f"{what} of the scaling table (default {','.join(map(str, default))})",
        )
    _out(p, "step")
    return p


def _within_limits(cells: list) -> tuple[list, dict[str, None]]:
    """(the (config, execution) cells within their backends' limits here, the others'
    "backend: its limit" in order). A backend that cannot run here at all is not
    asked for its limits: that is _check_cell's to refuse."""
    kept, beyond = [], {}
    for cell, execution in cells:
        backend, device = get(cell.backend), resolve_device(cell.device)
        why = None if backend.unavailable(device) else backend.limit(cell, device)
        if why:
            beyond[f"{cell.backend}: {why}"] = None
        else:
            kept.append((cell, execution))
    return kept, beyond


def _check_cell(cell: RunConfig) -> None:
    """ConfigError where a cell of the step table cannot run here, naming the cell (the
    history's length by --warmup and --reps; a backend or precision that cannot run at
    all, or a device that is not there, by its own words)."""
    try:
        device_for(cell)
    except ConfigError as e:
        if e.field in ("backend", "dtype", "device", "cuda_graph"):
            raise
        if e.field == "outer_steps":
            raise ConfigError(f"--warmup and --reps: {e}") from e
        policy = cell.mode if cell.ablation == "none" else f"FULL-{cell.ablation}"
        where = f"--k {cell.inner_steps}, {policy}, {cell.backend}, {cell.dtype}"
        raise ConfigError(f"{where}: {e}") from e


def bench_step(argv: list[str]) -> int:
    from phase12.benchmarks.step import (
        SCALING_FIELDS,
        breakdown,
        measure,
        scaling_cells,
        step_cells,
    )

    p = _step_parser()
    args = p.parse_args(argv)
    try:
        base = config_from_args(args, exclude=STEP_GRID)
        args.backend = args.backend or default_backends(base.device)
        if args.warmup < 0 or args.reps < 1:
            raise ConfigError("--warmup must be >= 0 and --reps >= 1")
        # Every cell of the table as it will run, before any work; the cells beyond their
        # backend's limits are left out (and said so), as a sweep records them UNSUPPORTED.
        # Each timed step (twice with --breakdown) writes a row of the run's history.
        timed = base.replace(outer_steps=args.warmup + 2 * args.reps)
        grid = (args.mode, args.inner_steps, args.backend, ("eager",), args.ablation, args.dtype)
        cells, beyond = _within_limits(step_cells(timed, *grid))
        if not cells:
            raise ConfigError(f"no cell of the table can run here: {next(iter(beyond))}")
        for cell, _ in cells:
            _check_cell(cell)
        cuda = resolve_device(base.device).type == "cuda"
        if "graph" in (args.execution or ()) and not cuda:
            raise ConfigError("--execution graph replays CUDA graphs; it needs --device cuda")
        if args.breakdown and not cuda:
            raise ConfigError("--breakdown profiles GPU kernels; it needs --device cuda")
        if args.breakdown and args.execution and set(args.execution) != {"eager", "graph"}:
            raise ConfigError("--breakdown times every cell eager and in a graph; drop --execution")
        scaling = []
        anchor = base.replace(inner_steps=max(args.inner_steps))  # where the scaling axes cross
        given = [a for a in SCALING_AXES if getattr(args, f"scaling_{a}") is not None]
        if given and not args.scaling:
            flag = f"--scaling-{given[0].replace('_', '-')}"
            raise ConfigError(f"{flag} sets an axis of the scaling table; add --scaling")
        if args.scaling:  # checked here, not after the main table has run
            axes = {a: getattr(args, f"scaling_{a}") or d for a, (d, _) in SCALING_AXES.items()}
            for axis, values in axes.items():
                for v, backend in itertools.product(values, args.backend):
                    try:
                        cell = anchor.replace(backend=backend, **{SCALING_FIELDS[axis]: v})
                        if _within_limits([(cell, None)])[0]:
                            device_for(cell)
                    except ConfigError as e:
                        flag = f"--scaling-{axis.replace('_', '-')}"
                        raise ConfigError(f"{flag} {v}: {e}") from e
            scaling = scaling_cells(anchor, args.backend, "graph" if cuda else "eager", axes)
            scaling, left_out = _within_limits(scaling)
            beyond |= left_out
        check_writable(args.out)
    except ConfigError as e:
        return p.bad_input(e)
    for why in beyond:
        print(f"note: cells left out, beyond their backend's limits: {why}", file=sys.stderr)
    executions = args.execution or (("eager", "graph") if cuda else ("eager",))
    cells, _ = _within_limits(
        step_cells(
            base, args.mode, args.inner_steps, args.backend, executions, args.ablation, args.dtype
        )
    )
    df = measure(cells, args.warmup, args.reps, profile_gpu=args.breakdown)
    df.to_csv(args.out / "step.csv", index=False)
    _show(df)
    if args.breakdown:
        parts = breakdown(df)
        parts.to_csv(args.out / "breakdown.csv", index=False)
        _show(parts)
    if args.scaling:
        from analysis.figures import scaling_plot

        scaling = measure(scaling, args.warmup, args.reps)
        scaling.to_csv(args.out / "scaling.csv", index=False)
        at = {"k": anchor.inner_steps, "meta_batch": anchor.meta_batch, "seq_len": anchor.seq_len}
        scaling_plot(scaling, at, args.out / "scaling.png")
        _show(scaling)
    return 0


def _attention_parser() -> ArgumentParser:
    from phase12.benchmarks import attention

    p = ArgumentParser(prog="run.py bench attention", description=attention.__doc__)
    p.add_argument(
        "--n",
        type=csv_list(positive_int),
        default=(128, 512, 1024, 2048, 4096, 8192, 16384),
        help="comma-separated N = M",
    )
    p.add_argument(
        "--d", type=csv_list(positive_int), default=(64, 128), help="comma-separated head dims"
    )
    p.add_argument(
        "--dtypes",
        type=csv_list(str, attention.DTYPES),
        default=("bf16", "fp32"),
        help=f"comma-separated: {', '.join(attention.DTYPES)} (default bf16,fp32)",
    )
    p.add_argument(
        "--providers", type=csv_list(str, attention.PROVIDERS), default=attention.PROVIDERS
    )
    p.add_argument(
        "--passes",
        type=csv_list(str, attention.PASSES),
        default=attention.PASSES,
        help="comma-separated passes",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also time every pass replayed from a CUDA graph (GPU time without the host's)",
    )
    _out(p, "attention")
    return p


def _check_kernels_run(benchmark: str) -> None:
    """ConfigError unless the compiled Triton attention kernels can run here."""
    if not torch.cuda.is_available():
        raise ConfigError(f"the {benchmark} needs a CUDA device")
    try:
        check_backend("triton_fused", "cuda")
    except BackendUnavailable as e:
        raise ConfigError(f"the {benchmark} cannot run here: {e}") from e


def bench_attention(argv: list[str]) -> int:
    from analysis.figures import attention_plot
    from analysis.tables import attention_table
    from phase12.benchmarks.attention import bench

    p = _attention_parser()
    args = p.parse_args(argv)
    try:
        _check_kernels_run("attention benchmark")
        check_writable(args.out)
    except ConfigError as e:
        return p.bad_input(e)
    t0 = time.time()
    df = bench(args.n, args.d, args.dtypes, args.providers, args.passes, args.cuda_graph)
    df.insert(0, "device_name", torch.cuda.get_device_name())
    df.to_csv(args.out / "attention.csv", index=False)
    attention_plot(df, args.out / "attention.png")
    print(attention_table(df))
    print(
        f"{torch.cuda.get_device_name()}: {len(df)} cells in {time.time() - t0:.0f} s, "
        f"written to {args.out}"
    )
    return 0


def _tiles_parser() -> ArgumentParser:
    from phase12.benchmarks import tiles

    p = ArgumentParser(prog="run.py bench tiles", description=tiles.__doc__)
    p.add_argument("--cells", default=tiles.DEFAULT_CELLS, help="comma-separated DTYPE:N:D:FAMILY")
    p.add_argument(
        "--candidates",
        default=None,
        help="comma-separated BNxBMxWARPSxSTAGES tiles instead of the built-in list",
    )
    p.add_argument(
        "--both-structures",
        action="store_true",
        help="also time every tile of bwd/dbwd cells in the other structure (atomic_rows)",
    )
    _out(p, "tiles")
    return p


def bench_tiles(argv: list[str]) -> int:
    from phase12.benchmarks.tiles import CANDIDATES, parse_candidates, parse_cells, sweep

    p = _tiles_parser()
    args = p.parse_args(argv)
    try:
        cells = parse_cells(args.cells)
        candidates = CANDIDATES if args.candidates is None else parse_candidates(args.candidates)
        _check_kernels_run("tile sweep")
        check_writable(args.out)
    except ValueError as e:
        return p.bad_input(e)
    sweep(cells, args.out / "tiles.csv", candidates, args.both_structures)
    print(f"written to {args.out / 'tiles.csv'}")
    return 0


def _distributed_parser() -> ArgumentParser:
    from phase12.benchmarks import distributed

    p = ArgumentParser(prog="run.py bench distributed", description=distributed.__doc__)
    p.add_argument("--processes", type=int, default=2, help="processes / devices (default 2)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cuda or cpu")
    p.flags.update(device="--device", backend="--backends", meta_batch="--meta-batch")
    add_config_flags(p, ["mode", "inner_steps", "outer_steps"], defaults={"outer_steps": 300})
    p.add_argument(
        "--backends",
        type=csv_list(str, NAMES),
        default=None,
        help="backends of the sharded runs (default: all three on CUDA, reference on the CPU)",
    )
    p.add_argument("--meta-batch", type=csv_list(int), default=(64, 256))
    p.add_argument("--sweep-modes", type=csv_list(str, MODES), default=MODES)
    p.add_argument(
        "--sweep-backends",
        type=csv_list(str, NAMES),
        default=None,
        help="default: reference,triton_fused on CUDA, reference on the CPU",
    )
    p.add_argument("--sweep-k", type=csv_list(int), default=(10, 20))
    p.add_argument("--sweep-seeds", type=csv_list(int), default=(0, 1))
    p.add_argument("--sweep-outer-steps", type=int, default=1000)
    p.add_argument("--no-sweep", action="store_true", help="only the meta-batch sharding")
    _out(p, "distributed")
    return p


def _checked(base: RunConfig, prefix: str, **fields) -> None:
    """base.replace(**fields) checked as a run (device_for: its sizes too). With `prefix`
    'sweep-' its ConfigError is named by the sweep's flag; without, the parser's flags
    name it (ArgumentParser.bad_input)."""
    try:
        device_for(base.replace(**fields))
    except ConfigError as e:
        if e.field is None or not prefix:  # not one field's fault, or the parser's to name
            raise
        name = {"inner_steps": "k", "mode": "modes", "seed": "seeds"}.get(e.field, e.field)
        flag, message = f"--{prefix}{name.replace('_', '-')}", str(e)
        if message.startswith(e.field):  # "inner_steps must be ...": the flag in its place
            raise ConfigError(flag + message[len(e.field) :]) from e
        raise ConfigError(f"{flag}: {message}") from e


def bench_distributed(argv: list[str]) -> int:
    import pandas as pd

    from phase12.benchmarks.distributed import sharding_rows, sweep_rows
    from phase12.provenance import device_name

    p = _distributed_parser()
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        backends = args.backends or default_backends(args.device)
        cuda = device.type == "cuda"
        sweep_backends = args.sweep_backends or (
            ("reference", "triton_fused") if cuda else ("reference",)
        )
        for backend in dict.fromkeys([*backends, *sweep_backends]):
            device_for(RunConfig(device=args.device, backend=backend))
        if args.processes < 2:
            raise ConfigError("--processes must be at least 2")
        if device.type == "cuda" and torch.cuda.device_count() < args.processes:
            raise ConfigError(
                f"--processes {args.processes} needs as many GPUs; "
                f"{torch.cuda.device_count()} visible"
            )
        # Every run the benchmark launches, checked here rather than in a child process.
        base = RunConfig(device=args.device)
        for meta_batch in args.meta_batch:
            run = dict(mode=args.mode, inner_steps=args.inner_steps, outer_steps=args.outer_steps)
            _checked(base, "", meta_batch=meta_batch, **run)
        if not args.no_sweep:
            for k, mode, seed in itertools.product(
                args.sweep_k, args.sweep_modes, args.sweep_seeds
            ):
                run = dict(mode=mode, inner_steps=k, seed=seed, outer_steps=args.sweep_outer_steps)
                _checked(base, "sweep-", **run)
        for meta_batch in args.meta_batch:
            if meta_batch % args.processes:
                raise ConfigError(
                    f"--meta-batch {meta_batch} does not divide over {args.processes} processes"
                )
        check_writable(args.out)
    except ConfigError as e:
        return p.bad_input(e)
    devices = [f"cuda:{i}" for i in range(args.processes)] if cuda else ["cpu"] * args.processes
    run_flags = [
        *("--mode", args.mode, "--k", str(args.inner_steps)),
        *("--outer-steps", str(args.outer_steps)),
    ]
    rows = sharding_rows(args.processes, backends, args.meta_batch, run_flags, device.type)
    if not args.no_sweep:
        sweep_flags = [
            *("--modes", ",".join(args.sweep_modes), "--backends", ",".join(sweep_backends)),
            *("--k", ",".join(map(str, args.sweep_k))),
            *("--seeds", ",".join(map(str, args.sweep_seeds))),
            *("--outer-steps", str(args.sweep_outer_steps)),
        ]
        with tempfile.TemporaryDirectory() as folder:
            rows += sweep_rows(sweep_flags, devices, Path(folder), args.out)
    df = pd.DataFrame(rows)
    df.insert(0, "device_name", device_name(device))
    df.to_csv(args.out / "distributed.csv", index=False)
    for _, part in df.groupby("measurement", sort=False):
        table = part.dropna(axis=1, how="all").convert_dtypes()
        _show(table)
    print(f"written to {args.out / 'distributed.csv'}")
    return 0


def main(argv: list[str]) -> int:
    # No -h of its own: `run.py bench attention --help` is the attention benchmark's.
    p = ArgumentParser(prog="run.py bench", add_help=False)
    p.add_argument(
        "benchmark",
        choices=BENCHMARKS,
        help="which benchmark (--help after it for its options)",
    )
    if argv[:1] in (["-h"], ["--help"]):
        p.print_help()
        return 0
    args, rest = p.parse_known_args(argv)
    run = {
        "step": bench_step,
        "attention": bench_attention,
        "tiles": bench_tiles,
        "distributed": bench_distributed,
    }[args.benchmark]
    return run(rest)
