"""The command line: every parser and subcommand of `python run.py` / `phase12`.

    python run.py --mode FULL --k 20                 one run (seed defaults), summary at the end
    python run.py sweep --tag T [--k 1,5,10,20]       resumable grid: modes x backends x k x seeds
    python run.py risk --tag T                        risk checks -> risk_checks.csv
    python run.py report --tag T                      summary, figures and report.md from the CSVs
    python run.py pipeline --tag T                    sweep + risk + report
    python run.py bench {step,attention,tiles,distributed}  benchmark tables and CSVs

Run flags are generated from RunConfig's fields (phase12.config). Bad input ends with one
`error:` line and exit code 2 before any work is done.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
import threading
from types import ModuleType

SUBCOMMANDS = ("sweep", "risk", "report", "pipeline", "bench")


EXIT_INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (SIGINT)
EXIT_TERMINATED = 143  # and by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's or a timeout's), raised where Ctrl-C raises
    KeyboardInterrupt, so that it ends a command as Ctrl-C does: locks released, a
    folder made for an unsaved run removed, a sweep's finished runs kept."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises Terminated inside the block (the main thread only: Python runs
    signal handlers there), and has its former handler back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def lacks_bytecode(module: ModuleType) -> bool:
    """Whether an imported `module` was compiled from its source with no bytecode left
    behind for the next process: after an import, a .py module's bytecode is on disk
    unless this Python may not write it (PYTHONDONTWRITEBYTECODE or -B, a folder it
    cannot write)."""
    source = getattr(module, "__file__", None) or ""
    return source.endswith(".py") and not os.path.exists(importlib.util.cache_from_source(source))


def bytecode_note(module: ModuleType) -> str:
    """The note for a `module` that lacks_bytecode: the cause and the command that
    compiles the folder it was installed into (torch's: sympy and the rest beside it)."""
    folder = os.path.dirname(os.path.dirname(module.__file__))
    return (
        f"note: this Python keeps no bytecode for {module.__name__} (PYTHONDONTWRITEBYTECODE, "
        "-B, or a folder it cannot write), so every process compiles its source, seconds more "
        "per command (docs/benchmarks.md); to compile it once, as a user who can write "
        f"there: python -m compileall -q -j 0 {folder}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with sigterm_as_interrupt():
        return _main(argv)


def _main(argv: list[str]) -> int:
    try:
        import torch  # every command imports it; without bytecode that takes several times longer

        if lacks_bytecode(torch):
            print(bytecode_note(torch), file=sys.stderr)
        if argv and argv[0] == "bench":
            from phase12.cli import bench

            return bench.main(argv[1:])
        if argv and argv[0] in SUBCOMMANDS:
            from phase12.cli import sweep

            return sweep.main(argv[0], argv[1:])
        from phase12.cli import single

        return single.main(argv)
    except KeyboardInterrupt as e:
        # Rows are appended whole and runs.csv parses at any moment: what finished is kept.
        stopped, code = "interrupted", EXIT_INTERRUPTED
        if isinstance(e, Terminated):
            stopped, code = "terminated", EXIT_TERMINATED
        if argv and argv[0] in ("sweep", "pipeline"):
            said = "finished runs are saved; the sweep resumes when run again with its --tag"
        elif argv and argv[0] in SUBCOMMANDS:
            said = "nothing more is written"
        else:
            said = "the run is not saved"
        print(f"{stopped}: {said}", file=sys.stderr)
        runners = sys.modules.get("phase12.runners")
        if runners is not None and runners.runner_thread_alive():
            # Its group is lost either way; finalizing the interpreter while that thread
            # is inside torch aborts the process (SIGABRT instead of this exit code).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
