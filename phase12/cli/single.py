"""One run: `python run.py --mode FULL --k 20 [--out DIR | --no-save] [--json]`.

The run's files go to runs/TIME_RUNID/ unless --out names a folder (runs.csv appended)
or --no-save; the folder is locked and checked for writing before any training.
Without --backend, the run takes the fastest backend that computes what it asks for and
can run it here (phase12.cli.parsing.fastest_backend: reference on a CPU).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from phase12.backends import device_for
from phase12.cli.parsing import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_NONFINITE,
    TAG,
    ArgumentParser,
    PickedDefault,
    add_config_flags,
    config_from_args,
    fastest_backend,
)
from phase12.config import ConfigError
from phase12.distributed import World, init_world, local_device, torchrun_world_size
from phase12.io import (
    FolderBusy,
    FolderLock,
    make_whole,
    other_settings,
    read_rows,
    save_run,
)
from phase12.provenance import run_metadata
from phase12.schema import RUNS_CSV, STATUS_NONFINITE, STATUS_OK, RunResult
from phase12.train import run_experiment


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="run.py",
        description="One Phase 12 MAML run. Subcommands: sweep, risk, report, pipeline, bench "
        "(python run.py SUBCOMMAND --help).",
    )
    add_config_flags(
        p,
        defaults={
            "backend": PickedDefault(
                "the fastest that computes what the run asks for and can run it here: on "
                "CUDA triton_step (float32), then triton_fused (graph replay, not float64), "
                "then reference; on a CPU reference"
            )
        },
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for runs.csv (appended), history/ and meta/ (default: runs/TIME_RUNID)",
    )
    where.add_argument("--no-save", action="store_true", help="write no files")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result row as one JSON object on the last line of stdout",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def summary_text(result: RunResult, window: int) -> str:
    """The few lines printed at the end of a run, in words a newcomer can read; `window`
    is the number of outer steps the final metrics average (fewer where fewer ran)."""
    r = result.row
    steps = len(result.history.get("step", ()))
    window = min(window, steps) or window  # a run cut short
    lines = [f"{r['run_id']}: status {r['status']}" + (f" ({r['error']})" if r["error"] else "")]
    if steps and r.get("final_acc") is not None:  # no step of a run non-finite at 0
        delta = r["convergence_delta"]  # the first window's mean loss minus the last's
        change = (
            f"the loss {'fell' if delta >= 0 else 'rose'} by {abs(delta):.4f} from the first "
            f"{window}"
            if delta is not None  # None where the two windows would overlap
            else "the run is shorter than two such windows, so there is no earlier loss to compare"
        )
        lines.append(
            f"  query accuracy {r['final_acc']:.4f}, loss {r['final_loss']:.4f} (means over "
            f"the last {window} outer steps; {change})"
        )
        probe = r.get("rel_diff_probe")
        lines.append(
            f"  attention meta-gradient norms: Wq {r['attn_grad_norm_q']:.3e}, "
            f"Wk {r['attn_grad_norm_k']:.3e}, Wv {r['attn_grad_norm_v']:.3e}"
        )
        if probe is not None:
            lines.append(
                "  second-order part of the meta-gradient on a fresh task, "
                f"|g_FULL - g_FO| / |g_FULL|: {probe:.4f}"
            )
        mem = r.get("peak_cuda_mem_bytes")
        lines.append(
            f"  {r['mean_outer_step_time_s'] * 1e3:.1f} ms per outer step, "
            f"{r['wall_time_total_s']:.1f} s in all (set-up {r['setup_time_s']:.1f} s, "
            f"probes {r['probe_time_s']:.1f} s), on {r['device_name']}"
            + (f"; peak CUDA memory {mem / 2**20:.1f} MiB" if mem else "")
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    folder = ExitStack()  # holds the output folder's lock until the run is saved
    note = None  # why faster backends were passed over, said once the input is good
    try:
        picked = args.backend is None
        config = config_from_args(args, exclude=["backend"] if picked else [])
        config = config.replace(device=local_device(config.device))
        if picked:
            backend, note = fastest_backend(config)
            config = config.replace(backend=backend)
        device = device_for(config)
        World(size=torchrun_world_size()).check_divides(config.meta_batch)
        out = _output_folder(args, config) if main_rank else None
        if out is not None:  # creates the folder: an unwritable one fails here, not after
            # a run that ends unsaved leaves no folder behind
            folder.enter_context(FolderLock(out, remove_if_unused=not out.exists()))
            _check_new_run(out, config)
    except (ValueError, FolderBusy) as e:  # ConfigError is a ValueError
        folder.close()
        return p.bad_input(e) if main_rank else EXIT_BAD_INPUT
    except OSError as e:  # the folder cannot be made or written
        folder.close()
        return p.bad_input(ConfigError(f"--out: cannot write to {e.filename}: {e.strerror}"))
    if note and main_rank:
        print(f"note: {note}", file=sys.stderr)
    with folder:
        result = _train(config, device, progress=main_rank and not args.no_progress)
        if out is not None:
            save_run(out, result, run_metadata(config, device))
    if main_rank:
        print(summary_text(result, config.metric_window))
        if out is not None:
            print(f"saved to {out}")
        if args.json:  # JSON has no NaN: a value not measured (or not finite) is null
            row = {
                k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in result.row.items()
            }
            print(json.dumps(row, default=str, allow_nan=False))
    if result.status == STATUS_OK:
        return 0
    return EXIT_NONFINITE if result.status == STATUS_NONFINITE else EXIT_FAILED


def _output_folder(args, config) -> Path | None:
    """Where the run's files go (None with --no-save): a folder, not a sweep's. Raises
    ConfigError."""
    if args.no_save:
        return None
    out = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}_{config.run_id}"
    if not TAG.fullmatch(out.resolve().name):  # what `report --root R --tag NAME` takes
        raise ConfigError(
            f"--out {out}: its last part {out.resolve().name!r} is not a plain name (letters, "
            "digits, '.', '_' and '-', not starting with '.'), which the report and risk "
            "commands take as --tag"
        )
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder")
        if (out / "sweep.json").exists():
            raise ConfigError(
                f"--out {out} is a sweep's folder; run the sweep command on it, or write "
                "this run elsewhere"
            )
    return out


def _check_new_run(out: Path, config) -> None:
    """With the folder locked: its runs.csv made whole (a torn last line moved aside)
    and without this run yet. Raises ConfigError."""
    make_whole(out / RUNS_CSV)
    rows = read_rows(out / RUNS_CSV)
    if config.run_id in {r["run_id"] for r in rows}:
        raise ConfigError(f"--out {out} already holds run {config.run_id}; use another folder")
    changed = other_settings(rows, config, out)
    if changed:
        raise ConfigError(
            f"--out {out} holds runs with other settings ({changed}); use another folder"
        )


def _train(config, device, progress: bool) -> RunResult:
    """The run, on this rank's share of the meta-batch when launched by torchrun."""
    world = init_world(device)
    try:
        return run_experiment(config, progress=progress, world=world)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
