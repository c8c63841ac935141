"""What train.py, generate.py, prep/shard.py and benchmarks/throughput.py share on the command line.

Flag types that refuse bad numbers while the flags are parsed (`--batch-size 0` is one line from
argparse, not a ZeroDivisionError an hour later), a parser whose errors are one line, the help
formatter, the default worker count, the image suffixes, an exception's first line for one-line
errors, the flags a command line gives (and the command line they make again), and the check that a
folder can be written into before anything is created in it. Imports nothing heavy: prep/shard.py
does not pay for torch.
"""

import argparse
import math
import os
import tempfile
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # the pictures the scripts read from a folder, and write by suffix
LOADER_WORKERS_CAP = 8  # the loaders' default workers, at most


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default and keeps the module docstring's layout."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with an error that is one line: what is wrong, and where the help is."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def first_line(exn: BaseException, message: str | None = None) -> str:
    """An exception's message (or `message`, the part of it that matters) cut to its first line, its type's
    name when there is none: for one-line errors."""
    text = (str(exn) if message is None else message).strip()
    return text.splitlines()[0] if text else type(exn).__name__


def first_sentence(exn: BaseException) -> str:
    """The first sentence of an exception's first line, which is the part that says what is wrong."""
    return first_line(exn).split(". ", 1)[0].rstrip(".")


def default_workers(cap: int | None = LOADER_WORKERS_CAP, spare: int = 1) -> int:
    """Worker processes (or threads) when the user gives none: the CPU cores less `spare` left to the main
    process, at most `cap` (None: no limit), at least 1. workers_rule() says it in words for --help."""
    cores = (os.cpu_count() or 2) - spare
    return max(1, cores if cap is None else min(cap, cores))


def workers_rule(cap: int | None = LOADER_WORKERS_CAP, spare: int = 1) -> str:
    """default_workers(cap, spare) in words, for a --workers help text."""
    cores = "CPU cores" + (f" - {spare}" if spare else "")
    return (cores if cap is None else f"min({cap}, {cores})") + (", at least 1" if spare else "")


def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'a whole number' if kind is int else 'a number'}, not {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    return value


def int_at_least(low: int, high: int | None = None):
    """An argparse `type=` that takes whole numbers from `low` (to `high`, if given)."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"must be a whole number {bound}, not {text}")
        return value
    return parse


def float_above(low: float, inclusive: bool = False):
    """An argparse `type=` that takes finite numbers above `low` (or equal to it, if `inclusive`)."""
    def parse(text: str) -> float:
        value = _number(text, float)
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'above'} {low:g}, not {text}")
        return value
    return parse


positive_int = int_at_least(1)
count = int_at_least(0)  # 0 has a meaning: no worker processes, or no limit
seed = int_at_least(0, 2**32 - 1)  # numpy's seeds are 32-bit and not negative
positive_float = float_above(0)
nonnegative_float = float_above(0, inclusive=True)


def unwritable(folder) -> str | None:
    """Why files cannot be written into `folder` (to be created if missing), or None if they can.

    Tries for real, with an unnamed temporary file in the folder or in its nearest existing parent:
    permission bits say nothing for root, read-only mounts or immutable folders. Leaves nothing
    behind, so a run that stops on a later check has not created anything."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            return f"{existing} is a broken link"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exn:
        return f"cannot write into {existing} ({exn.strerror or exn})"
    return None


def image_path(text: str) -> Path:
    """An argparse `type=` for a picture to write: a file name that ends in an image suffix."""
    path = Path(text)
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.stem:
        raise argparse.ArgumentTypeError(f"expected a file name ending in {', '.join(IMAGE_SUFFIXES)}, "
                                         f"not {text!r}")
    return path


def given_flags(parser: argparse.ArgumentParser, argv) -> dict:
    """destination -> value of each flag that `argv` gives explicitly, in the order given, whatever its value
    (a flag given its default value counts as given): parsed again into a namespace where every
    destination is already set, so that argparse fills in no default."""
    unset = object()
    namespace = _Given(**{dest: unset for dest in vars(parser.parse_args([]))})
    namespace.order.clear()
    parser.parse_args(argv, namespace=namespace)
    return {dest: getattr(namespace, dest) for dest in namespace.order}


class _Given(argparse.Namespace):
    """A namespace that remembers the order in which the parser sets its fields."""

    def __setattr__(self, name, value):
        order = self.__dict__.setdefault("order", [])
        if name not in order:
            order.append(name)
        super().__setattr__(name, value)


def option(dest: str) -> str:
    """The long flag of a destination: batch_size -> --batch-size."""
    return "--" + dest.replace("_", "-")


def flag_tokens(dest: str, value) -> list[str]:
    """A flag and its value as command-line tokens: True is the bare flag, False its --no- form."""
    if value is True:
        return [option(dest)]
    if value is False:
        return [f"--no-{option(dest)[2:]}"]
    return [option(dest), str(value)]


def refuse_other_modes(parser: argparse.ArgumentParser, given, mode: str, flags_of: dict[str, set[str]]) -> None:
    """One line from `parser` when a flag that only some modes use (`flags_of`: mode -> destinations) is
    given with `mode`: it would be silently ignored."""
    own = flags_of.get(mode, set())
    for dest in sorted(set(given) - own):
        modes = [m for m, dests in flags_of.items() if dest in dests]
        if modes:
            parser.error(f"{option(dest)} goes with {' or '.join(option(m) for m in modes)}, not with {option(mode)}")
