"""What every command shares: the parser class, comma lists, the flags generated from
RunConfig's fields, and the one way bad input ends (one `error:` line, exit 2)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from phase12.backends import FASTEST_FIRST, NAMES, get
from phase12.config import ConfigError, RunConfig, option_help, resolve_device

EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NONFINITE = 2, 1, 3
FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
# A results folder's name, as the report and risk commands take it (--tag).
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Choices the config cannot list itself (the backends are registered above it).
CHOICES = {"backend": NAMES}
# Flags that are not --field-name (the seed project's name for k).
FLAG_NAMES = {"inner_steps": "--k"}
# The sweep's axes: one value per run, a comma list per sweep.
GRID_FLAGS = {
    "mode": "--modes",
    "backend": "--backends",
    "inner_steps": "--k",
    "seed": "--seeds",
    "ablation": "--ablations",
    "seq_len": "--seq-lens",
    "dim": "--dims",
    "dtype": "--dtypes",
}
# What a grid axis means beyond its field's help.
GRID_NOTES = {"ablation": "each one runs as FULL, beside --modes; "}


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def program() -> str:
    """How the user called us: `run.py`, or `phase12` (the console script, python -m)."""
    return "run.py" if sys.argv[0].endswith("run.py") else "phase12"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one `error:` line (exit 2) instead of usage.

    `flags` maps RunConfig fields to this parser's flags, so that errors about a field
    (ConfigError.field) name the flag the user typed.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs["prog"] = kwargs.get("prog", "run.py").replace("run.py", program())
        super().__init__(*args, **kwargs)
        self.flags: dict[str, str] = {}
        self._argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        # argparse reads a negative number it cannot tell from a flag (-1e-3) as a flag,
        # and says only that the flag before it lacks its value.
        flag = message.split(":")[0].removeprefix("argument ")
        if message.endswith("expected one argument"):
            for given, value in zip(self._argv, self._argv[1:], strict=False):
                negative = value.startswith("-") and all(map(_reads_as_number, value.split(",")))
                if given == flag and negative:
                    message += f" ({value} reads as a flag there: write {flag}={value})"
                    break
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")

    def bad_input(self, error: Exception) -> int:
        """Print `error` as one `error:` line, its field named by its flag; return 2."""
        message = str(error)
        field = getattr(error, "field", None)
        if field in self.flags and message.startswith(field):
            message = self.flags[field] + message[len(field) :]
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def positive_int(text: str) -> int:
    """A csv_list kind: an int >= 1 (ValueError naming the item otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{value} is not a positive integer")
    return value


def csv_list(
    kind: Callable = str, choices: Iterable | None = None, *, repeats: bool = False
) -> Callable:
    """An argparse type: 'a,b,c' -> a tuple of kind(a), kind(b), kind(c). An empty item
    ('a,,b', a trailing comma) is an error, and so is a value given twice unless
    `repeats` (a list of workers, say, where each item is one more)."""
    allowed = None if choices is None else tuple(choices)

    def parse(text: str) -> tuple:
        items = text.split(",")
        if "" in items:
            raise argparse.ArgumentTypeError(f"{text!r} has an empty item; give a,b,c")
        values = []
        for item in items:
            try:
                values.append(kind(item))
            except ValueError as e:  # int's and float's own words are Python's, not ours
                plain = {int: "a whole number", float: "a number"}.get(kind)
                why = f"{item!r} is not {plain}" if plain else str(e)
                raise argparse.ArgumentTypeError(f"{text!r}: {why}") from e
        values = tuple(values)
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice and not repeats:
            raise argparse.ArgumentTypeError(f"{', '.join(twice)} given twice; give each once")
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"invalid choice {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}"
            )
        return values

    return parse


def _flag(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


@dataclasses.dataclass(frozen=True)
class PickedDefault:
    """A flag's default that the command picks itself once it knows the machine: the
    flag's value is None until then, and `says` describes the choice in --help."""

    says: str


def add_config_flags(
    parser: ArgumentParser,
    names: Iterable[str] | None = None,
    *,
    defaults: dict | None = None,
) -> None:
    """One flag per RunConfig field in `names` (default: all), with the field's type,
    default (or `defaults`' value, which may be a PickedDefault), choices and help."""
    defaults = defaults or {}
    for name in FIELDS if names is None else names:
        f = FIELDS[name]
        help, choices = option_help(f)
        choices = choices or CHOICES.get(name)
        default = defaults.get(name, f.default)
        kind = str if isinstance(f.default, str) else type(f.default)
        if isinstance(default, PickedDefault):
            value, shown = None, default.says
        else:
            value = shown = str(default) if kind is str else default
        parser.add_argument(
            _flag(name),
            dest=name,
            metavar=None if choices else _flag(name)[2:].upper().replace("-", "_"),
            type=kind,
            default=value,
            choices=choices,
            help=f"{help} (default {shown})",
        )
        parser.flags[name] = _flag(name)


def add_grid_flags(parser: ArgumentParser, defaults: dict[str, tuple | PickedDefault]) -> None:
    """The sweep's axes in `defaults` as comma lists (--modes, --backends, --k, --seeds,
    ...), each default a tuple or a PickedDefault."""
    for name, flag in GRID_FLAGS.items():
        if name not in defaults:
            continue
        f = FIELDS[name]
        help, choices = option_help(f)
        choices = choices or CHOICES.get(name)
        kind = str if isinstance(f.default, str) else type(f.default)
        default = defaults[name]
        picked = isinstance(default, PickedDefault)
        shown = default.says if picked else ",".join(map(str, default))
        parser.add_argument(
            flag,
            dest=name,
            metavar=flag[2:].upper().replace("-", "_"),
            type=csv_list(kind, choices),
            default=None if picked else default,
            help=f"comma-separated; {GRID_NOTES.get(name, '')}{help} (default {shown})",
        )
        parser.flags[name] = flag


def default_backends(device: str) -> tuple[str, ...]:
    """Every backend that can run on CUDA; reference on the CPU (the Triton backends need
    CUDA, or TRITON_INTERPRET=1 and a lot of patience). A backend left out on CUDA (Triton
    missing or broken) is named on stderr, with the reason."""
    where = resolve_device(device)
    if where.type != "cuda":
        return ("reference",)
    why = {name: get(name).unavailable(where) for name in NAMES}
    if left := [name for name, reason in why.items() if reason]:
        reason = why[left[0]]
        print(
            f"note: {', '.join(left)} left out of the default backends: {reason}", file=sys.stderr
        )
    return tuple(name for name, reason in why.items() if not reason)


def fastest_backend(config: RunConfig) -> tuple[str, str | None]:
    """(backend, note) for one run that names no backend: on CUDA the first of
    phase12.backends.FASTEST_FIRST that suits `config` (Backend.unsuited) and can run it
    there, on the CPU reference (the Triton backends need CUDA, or their interpreter and
    a lot of patience). `note` names each faster backend passed over and why; None when none was.
    Raises ConfigError for a device that is not there."""
    where = resolve_device(config.device)
    if where.type != "cuda":
        return "reference", None
    passed: dict[str, list[str]] = {}  # reason -> the backends it rules out
    for name in FASTEST_FIRST:
        reason = get(name).unsuited(config) or get(name).cannot_run(config, where)
        if reason is None:
            break
        passed.setdefault(reason, []).append(name)
    if not passed:
        return name, None
    why = "; ".join(f"{' and '.join(names)}: {reason}" for reason, names in passed.items())
    return name, f"running on {name}, the fastest backend for this run here ({why})"


def check_writable(folder: Path) -> None:
    """Make `folder` and write a file in it, or raise ConfigError (before any work)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to {e.filename or folder}: {e.strerror}") from e


def config_from_args(args: argparse.Namespace, exclude: Iterable[str] = ()) -> RunConfig:
    """The RunConfig of the fields `args` has, but those in `exclude` (which keep their
    defaults). Raises ConfigError."""
    names = [n for n in FIELDS if hasattr(args, n) and n not in exclude]
    return RunConfig(**{name: getattr(args, name) for name in names})


__all__ = [
    "ArgumentParser",
    "ConfigError",
    "PickedDefault",
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_NONFINITE",
    "add_config_flags",
    "add_grid_flags",
    "check_writable",
    "config_from_args",
    "csv_list",
    "default_backends",
    "fastest_backend",
    "positive_int",
]
