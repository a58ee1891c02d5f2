"""Subcommands of run.py other than the single run: sweep, risk, report, pipeline, bench."""

from __future__ import annotations

import argparse


def main_bench(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run.py bench")
    p.add_argument("what", choices=["step", "attention"], help="which benchmark")
    args, rest = p.parse_known_args(argv)
    if args.what == "attention":
        from kernels.benchmark import main

        return main(rest)
    from phase12.benchmark import main

    return main(rest)


def main_subcommand(name: str, argv: list[str]) -> int:
    return {"bench": main_bench}[name](argv)
