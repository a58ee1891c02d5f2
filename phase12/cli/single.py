"""One run: `python run.py --mode FULL --k 20 [--out DIR] [--json]`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from phase12.backends import device_for
from phase12.cli.parsing import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_NONFINITE,
    ArgumentParser,
    add_config_flags,
    config_from_args,
)
from phase12.config import ConfigError
from phase12.distributed import init_world, local_device
from phase12.io import check_columns, save_run
from phase12.provenance import run_metadata
from phase12.schema import RUNS_CSV, STATUS_NONFINITE, STATUS_OK, RunResult
from phase12.train import run_experiment


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="run.py",
        description="One Phase 12 MAML run. Subcommands: sweep, risk, report, pipeline, bench "
        "(python run.py SUBCOMMAND --help).",
    )
    add_config_flags(p)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for runs.csv (appended), history/ and meta/ (default: none)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result row as one JSON object on the last line of stdout",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def summary_text(result: RunResult) -> str:
    """The few lines printed at the end of a run."""
    r = result.row
    lines = [f"{r['run_id']}: status {r['status']}" + (f" ({r['error']})" if r["error"] else "")]
    if r.get("final_acc") is not None:
        lines.append(
            f"  final acc {r['final_acc']:.4f}  final loss {r['final_loss']:.4f}  "
            f"convergence delta {r['convergence_delta']:.4f}"
        )
        lines.append(
            f"  attention meta-grad norms q {r['attn_grad_norm_q']:.3e} "
            f"k {r['attn_grad_norm_k']:.3e} v {r['attn_grad_norm_v']:.3e}  "
            "rel_diff_probe (FULL vs FO) "
            + ("n/a" if r.get("rel_diff_probe") is None else f"{r['rel_diff_probe']:.4f}")
        )
        mem = r.get("peak_cuda_mem_bytes")
        lines.append(
            f"  {r['mean_outer_step_time_s'] * 1e3:.1f} ms per outer step, "
            f"{r['wall_time_total_s']:.1f} s total on {r['device_name']}"
            + (f", peak CUDA memory {mem / 2**20:.1f} MiB" if mem else "")
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        config = config_from_args(args)
        config = config.replace(device=local_device(config.device))
        device = device_for(config)
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        if config.meta_batch % ranks:
            raise ConfigError(
                f"meta_batch {config.meta_batch} does not divide over {ranks} ranks; "
                f"use a multiple of {ranks}",
                "meta_batch",
            )
        if args.out is not None and args.out.exists():
            if not args.out.is_dir():
                raise ConfigError(f"--out {args.out} exists and is not a directory")
            check_columns(args.out / RUNS_CSV)
    except ValueError as e:  # ConfigError is a ValueError
        return p.bad_input(e) if main_rank else EXIT_BAD_INPUT
    world = init_world(device)
    try:
        result = run_experiment(
            config, progress=world.is_main and not args.no_progress, world=world
        )
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if world.is_main:
        if args.out is not None:
            save_run(args.out, result, run_metadata(config, device))
        print(summary_text(result))
        if args.json:
            print(json.dumps(result.row, default=str))
    if result.status == STATUS_OK:
        return 0
    return EXIT_NONFINITE if result.status == STATUS_NONFINITE else EXIT_FAILED
