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

import importlib.util
import os
import sys
from types import ModuleType

SUBCOMMANDS = ("sweep", "risk", "report", "pipeline", "bench")


EXIT_INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C

UNCACHED_BYTECODE_NOTE = (
    "note: this Python keeps no bytecode for torch (PYTHONDONTWRITEBYTECODE is set, or "
    "site-packages cannot be written), so every process compiles torch's source, seconds "
    "more per command (docs/benchmarks.md); to compile it once: python -m compileall -q "
    "-j 0 $(python -c 'import sysconfig; print(sysconfig.get_path(\"purelib\"))')"
)


def uncached_bytecode(module: ModuleType) -> bool:
    """Whether an imported `module` was compiled from its source with no bytecode left
    behind for the next process: after an import, a .py module's bytecode is on disk
    unless this Python may not write it (sys.dont_write_bytecode, a read-only folder)."""
    source = getattr(module, "__file__", None) or ""
    return source.endswith(".py") and not os.path.exists(importlib.util.cache_from_source(source))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import torch  # every command imports it; without bytecode its import is several times slower

    if uncached_bytecode(torch):
        print(UNCACHED_BYTECODE_NOTE, file=sys.stderr)
    try:
        if argv and argv[0] == "bench":
            from phase12.cli import bench

            return bench.main(argv[1:])
        if argv and argv[0] in SUBCOMMANDS:
            from phase12.cli import sweep

            return sweep.main(argv[0], argv[1:])
        from phase12.cli import single

        return single.main(argv)
    except KeyboardInterrupt:
        # Rows are appended whole and runs.csv parses at any moment: what finished is kept.
        if argv and argv[0] in ("sweep", "pipeline"):
            said = "finished runs are saved; the sweep resumes when run again with its --tag"
        elif argv and argv[0] in SUBCOMMANDS:
            said = "nothing more is written"
        else:
            said = "the run is not saved"
        print(f"interrupted: {said}", file=sys.stderr)
        sweep = sys.modules.get("phase12.sweep")
        if sweep is not None and sweep.runner_thread_alive():
            # Its group is lost either way; finalizing the interpreter while that thread
            # is inside torch aborts the process (SIGABRT instead of this exit code).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
