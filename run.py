"""Phase 12 command line.

    python run.py --mode FULL --k 20                 one run (seed defaults), summary at the end
    python run.py sweep --tag T [--k 1,5,10,20]       resumable grid: modes x backends x k x seeds
    python run.py risk --tag T                        risk checks -> risk_checks.csv
    python run.py report --tag T                      summary, figures and report.md from the CSVs
    python run.py pipeline --tag T                    sweep + risk + report
    python run.py bench {step,attention,tiles,distributed}  benchmark tables and CSVs

Bad input ends with one `error:` line and exit code 2 before any work is done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from phase12.config import MODES, ConfigError, RunConfig
from phase12.distributed import init_world, local_device
from phase12.experiment import STATUS_NONFINITE, STATUS_OK, RunResult, run_experiment, run_metadata
from phase12.model import BACKENDS
from phase12.outputs import RUNS_CSV, save_run
from phase12.records import check_columns

EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NONFINITE = 2, 1, 3
DEFAULTS = RunConfig()


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one `error:` line (exit 2) instead of usage."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by a single run and a sweep (everything but the grid axes)."""
    d = DEFAULTS
    parser.add_argument(
        "--outer-steps",
        type=int,
        default=d.outer_steps,
        help=f"outer (meta) steps per run (default {d.outer_steps})",
    )
    parser.add_argument(
        "--meta-batch",
        type=int,
        default=d.meta_batch,
        help=f"tasks per outer step (default {d.meta_batch})",
    )
    parser.add_argument(
        "--inner-lr",
        type=float,
        default=d.inner_lr,
        help=f"inner SGD learning rate (default {d.inner_lr})",
    )
    parser.add_argument(
        "--outer-lr",
        type=float,
        default=d.outer_lr,
        help=f"Adam learning rate on the meta-parameters (default {d.outer_lr})",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=d.seq_len,
        help=f"sequence length T; token 0 queries (default {d.seq_len})",
    )
    parser.add_argument(
        "--signal-positions",
        type=int,
        default=d.signal_positions,
        help=f"signal positions per task, in 1..T-1 (default {d.signal_positions})",
    )
    parser.add_argument(
        "--device",
        default=d.device,
        help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N (default auto)",
    )
    parser.add_argument(
        "--dtype",
        default=d.dtype,
        choices=["float32", "float64"],
        help="parameter and data dtype (default float32)",
    )
    parser.add_argument(
        "--cuda-graph",
        default=d.cuda_graph,
        choices=["auto", "on", "off"],
        help="capture the whole outer step in a CUDA graph and replay it: auto (on CUDA, "
        "falling back to eager with a warning if capture fails), on (fail instead), off",
    )


def config_from_args(args: argparse.Namespace, **grid) -> RunConfig:
    return RunConfig(
        outer_steps=args.outer_steps,
        meta_batch=args.meta_batch,
        inner_lr=args.inner_lr,
        outer_lr=args.outer_lr,
        seq_len=args.seq_len,
        signal_positions=args.signal_positions,
        device=args.device,
        dtype=args.dtype,
        cuda_graph=args.cuda_graph,
        **grid,
    )


def single_run_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="run.py",
        description="One Phase 12 MAML run. Subcommands: sweep, risk, report, pipeline, bench "
        "(python run.py SUBCOMMAND --help).",
    )
    p.add_argument(
        "--mode",
        default=DEFAULTS.mode,
        choices=MODES,
        help="FULL (second order), FO (first order) or FO_STRICT (first order, no "
        "inner graph) (default FULL)",
    )
    p.add_argument(
        "--k",
        type=int,
        default=DEFAULTS.inner_steps,
        help=f"inner SGD steps (default {DEFAULTS.inner_steps})",
    )
    p.add_argument(
        "--backend",
        default=DEFAULTS.backend,
        choices=list(BACKENDS),
        help="reference: PyTorch attention; triton_fused: fused Triton attention kernels; "
        "triton_step: each inner step and its backward one fused Triton kernel of the whole "
        "model (the Triton backends need CUDA or TRITON_INTERPRET=1) (default reference)",
    )
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="run seed (default 0)")
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


def main_single(argv: list[str]) -> int:
    args = single_run_parser().parse_args(argv)
    config = config_from_args(
        args, mode=args.mode, inner_steps=args.k, backend=args.backend, seed=args.seed
    ).replace(device=local_device(args.device))
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        config.validate()
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        if config.meta_batch % ranks:
            raise ConfigError(
                f"--meta-batch {config.meta_batch} does not divide over {ranks} ranks; "
                f"use a multiple of {ranks}"
            )
        if args.out is not None and args.out.exists():
            if not args.out.is_dir():
                raise ConfigError(f"--out {args.out} exists and is not a directory")
            check_columns(args.out / RUNS_CSV)
    except ValueError as e:  # ConfigError is a ValueError
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    world = init_world(config.validate())
    try:
        result = run_experiment(
            config, progress=world.is_main and not args.no_progress, world=world
        )
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if world.is_main:
        if args.out is not None:
            save_run(args.out, result, run_metadata(config))
        print(summary_text(result))
        if args.json:
            print(json.dumps(result.row, default=str))
    if result.status == STATUS_OK:
        return 0
    return EXIT_NONFINITE if result.status == STATUS_NONFINITE else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("sweep", "risk", "report", "pipeline", "bench"):
        from phase12.cli import main_subcommand

        return main_subcommand(argv[0], argv[1:])
    return main_single(argv)


if __name__ == "__main__":
    sys.exit(main())
