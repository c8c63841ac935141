"""How a run that stops early (a diverged loss, Ctrl-C, a failed write, a lost rank) says in one line what
is kept and the exact command to go on: this run's flags as parsed, with --resume or --overwrite."""

import re
import shlex
from pathlib import Path

import torch.distributed as dist

from common import cli
from run.folder import CHECKPOINT, MARKER


class TrainingError(RuntimeError):
    """Stops training with a message for the user rather than a traceback."""


class Diverged(TrainingError):
    """The loss stopped being finite; diverged() adds what is kept and what to run."""


def rerun(args, resume_from: Path | None = None, start_over: bool = False, extra: tuple = ()) -> str:
    """The command to run next, quoted for a shell: this run's flags (`args.given`, in the order given)
    continuing from `resume_from` (--resume), or starting again (with --overwrite when `start_over`),
    with `extra` flags replacing those of the same names."""
    drop = {"overwrite", "resume_force", "resume",
            *(flag[2:].replace("-", "_") for flag in extra if str(flag).startswith("--"))}
    flags = [token for dest, value in args.given.items() if dest not in drop
             for token in cli.flag_tokens(dest, value)]
    if resume_from is not None:
        inside = Path(resume_from).resolve().parent == Path(args.output_dir).resolve()
        flags += ["--resume"] if inside else ["--resume", str(resume_from)]
    elif start_over:
        flags.append("--overwrite")
    flags += [str(x) for x in extra]
    if dist.is_initialized():
        return f"the same torchrun launch of train.py {shlex.join(flags)}"
    return shlex.join(["python", "train.py", *flags])


def next_step(args, last_good: tuple[Path, int] | None, start_over: bool, extra: tuple = ()) -> str:
    """What is kept and the exact command to go on with: the one message for every way a run stops."""
    if last_good:
        return f"{last_good[0]} holds epoch {last_good[1]}: continue with `{rerun(args, last_good[0], extra=extra)}`"
    return f"no checkpoint was saved, so there is nothing to resume: start again with " \
           f"`{rerun(args, start_over=start_over, extra=extra)}`"


def write_failure(exn: OSError, args, last_good: tuple[Path, int] | None) -> TrainingError:
    """A failed write (full disk, permissions) as one line that says what survived and how to go on."""
    what = f"cannot write {exn.filename or args.output_dir} ({exn.strerror or exn})"
    fix = "free some space (or fix the permissions)"
    if last_good:
        return TrainingError(f"{what}; the last good checkpoint, {last_good[0]} (epoch {last_good[1]}), is "
                             f"untouched: {fix}, then run `{rerun(args, last_good[0])}`")
    return TrainingError(f"{what}; no checkpoint was saved yet: {fix}, then run `{rerun(args, start_over=True)}`")


def diverged(exn: Diverged, args, last_good: tuple[Path, int] | None) -> TrainingError:
    """A loss that stopped being finite, as the error that says what is kept and how to go on."""
    lower = ("--lr", f"{args.lr / 10:g}")
    extra = ("--resume-force", *lower) if last_good else lower
    return TrainingError(f"{exn}. {next_step(args, last_good, True, extra)} "
                         f"(a tenth of the learning rate; or --amp off where mixed precision is on)")


def interrupted(args, epoch: int | None = None, last_good: tuple[Path, int] | None = None) -> str:
    """The Ctrl-C line: in epoch `epoch` (0-based) with `last_good` the newest whole checkpoint, or before
    the epochs began (`epoch` None), where the folder and --resume say what there is to continue."""
    if epoch is not None:
        return f"\ninterrupted in epoch {epoch + 1}; {next_step(args, last_good, start_over=True)}"
    out_dir = Path(args.output_dir)
    saved = out_dir / CHECKPOINT
    last = (saved, "the last saved") if saved.exists() else (Path(args.resume), "its") if args.resume else None
    if last:
        return f"\ninterrupted; {last[0]} holds {last[1]} epoch: continue with `{rerun(args, last[0])}`"
    return (f"\ninterrupted before a checkpoint was saved, so there is nothing to resume: start again with "
            f"`{rerun(args, start_over=(out_dir / MARKER).exists())}`")


def lost_contact(exn: Exception) -> str | None:
    """The line for a rank whose collective failed because another rank died or stopped answering (the
    rank that failed prints its own error); None for any other error."""
    if not dist.is_initialized() or not (isinstance(exn, dist.DistError) or "gloo/transport" in str(exn)):
        return None
    reason = re.sub(r"^\[[^\]]*\]\s*", "", cli.first_line(exn)).split(". ")[0]  # gloo's "[source.cc:line] "
    return (f"rank {dist.get_rank()} lost the other ranks ({reason}): another rank stopped with an error, "
            f"or stopped answering for --dist-timeout seconds")
