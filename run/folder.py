"""The output folder of a training run: the marker that says what the run wrote, and its lock.

A run writes `run.json` into its --output-dir before anything else and lists in it every output
name before it writes that file (so the list is never short of a file on disk), together with the
settings, its process id and, with TensorBoard, the event files its own writer made and whether it
created `tb/`. "A previous run" means that marker, nothing else: --overwrite deletes exactly what it
lists (and temporary files of those names), never a folder the run did not create, and a folder
whose output names are taken by files no marker lists is refused, with or without --overwrite.

The marker is read as untrusted data: every name in it must be a plain file name that train.py
writes (no separator, no `..`), or the folder is refused. The lock is `fcntl.flock` on the folder
itself, held until the run ends (common/files.py's `lock_folder`, which prep/shard.py takes too): no
lock file to plant, link or leave behind, and the kernel drops it when the process ends, however it ends.

Before anything is read or written, check_output_dir says whether a run may use the folder; right
before the first epoch, prepare_output_dir creates, locks and marks it.
"""

import glob
import json
import os
import re
import socket
import time
import weakref
from pathlib import Path

from common.cli import first_line, unwritable
from common.files import TMP_SUFFIX, FolderBusy, atomic_write, lock_folder, plain_name
from model import quality
from run.checkpoint import previous

# The names train.py writes into --output-dir (model/quality.py names the end-of-training figures' files).
CHECKPOINT, WEIGHTS, METRICS = "checkpoint.pt", "vae_celeba.pth", "metrics.jsonl"
CURVES, SAMPLES, INTERPOLATIONS = "curves.png", "generated_samples.png", "interpolations.png"
RECONSTRUCTIONS = "reconstructions_epoch{epoch}.png"  # each epoch's pictures, .format(epoch=n) from 1
EPOCH_PICTURE = re.compile("^" + re.escape(RECONSTRUCTIONS).replace(re.escape("{epoch}"), "[1-9][0-9]*") + "$")
MARKER = "run.json"
TB = "tb"
PROGRAM = "train.py"  # the marker's "program": a run.json of another tool is not a previous run of this one
TB_EVENTS = re.compile(r"^events\.out\.tfevents\.[A-Za-z0-9_.-]+$")  # what torch's SummaryWriter names its files
MAX_MARKER_BYTES = 1 << 20
DAMAGED = f"{CHECKPOINT}.damaged"
RUN_OUTPUTS = (CHECKPOINT, previous(Path(CHECKPOINT)).name, METRICS, CURVES, WEIGHTS, SAMPLES, INTERPOLATIONS,
               *quality.outputs(WEIGHTS))  # listed in run.json when a run starts; EPOCH_PICTURE's as written


class RunDirError(RuntimeError):
    """An output folder that cannot be used as asked, with what to do about it; printed in one line."""


def is_output(name: str) -> bool:
    """Whether train.py writes a file of this name into --output-dir (run.json and tb/ apart)."""
    return name in RUN_OUTPUTS or name == DAMAGED or bool(EPOCH_PICTURE.match(name))


def read_marker(folder: Path, is_output) -> dict | None:
    """The marker of the run in `folder`, checked; None when there is none. `is_output(name)` says
    whether train.py writes a file of that name: a marker listing anything else is refused."""
    path = Path(folder) / MARKER
    if not os.path.lexists(path):
        return None
    fix = "move it away or choose another --output-dir"
    if path.is_symlink() or not path.is_file():
        raise RunDirError(f"{path} is not a file train.py wrote (a link or a folder): {fix}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MARKER_BYTES + 1)
        if len(raw) > MAX_MARKER_BYTES:
            raise ValueError(f"over {MAX_MARKER_BYTES} bytes")
        data = json.loads(raw.decode())
    except (OSError, ValueError) as exn:
        raise RunDirError(f"{path} is unreadable ({first_line(exn)}): {fix}") from None
    if not isinstance(data, dict) or data.get("program") != PROGRAM:
        raise RunDirError(f"{path} was not written by {PROGRAM}: {fix}")
    files, tb = data.get("files"), data.get("tb", {"created": False, "events": []})
    bad = [name for name in files if not (plain_name(name) and is_output(name))] if isinstance(files, list) else [files]
    if not isinstance(tb, dict) or not isinstance(tb.get("created"), bool) or not isinstance(tb.get("events"), list):
        bad.append(repr(tb))
    else:
        bad += [name for name in tb["events"] if not (plain_name(name) and TB_EVENTS.match(name))]
    if bad:
        raise RunDirError(f"{path} lists {bad[0]!r}, which is not a file name {PROGRAM} writes: {fix}")
    return data


def foreign_outputs(folder: Path, marker: dict | None, is_output, tensorboard: bool) -> list[str]:
    """Names in `folder` that this run would write, held by files that no marker lists."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = set(marker["files"]) if marker else set()
    found = sorted(p.name for p in folder.iterdir() if is_output(p.name) and p.name not in ours)
    if tensorboard and os.path.lexists(folder / TB) and not (marker and marker["tb"]["created"]):
        found.append(f"{TB}/")
    return found


def holder(folder: Path) -> str:
    """'process N on HOST' of the run that holds `folder`'s lock, as its marker says."""
    for _ in range(20):  # the holder writes its marker right after it takes the lock
        try:
            data = json.loads((Path(folder) / MARKER).read_text())
            pid, host = int(data["pid"]), str(data.get("host", ""))
            if host != socket.gethostname():
                return f"process {pid} on {host}"
            os.kill(pid, 0)
            return f"process {pid}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.1)
    return "a process whose id it has not written yet"


def _busy(folder: Path) -> RunDirError:
    return RunDirError(f"--output-dir {folder} is in use by another train.py ({holder(folder)}): wait for it to "
                       f"end, or choose another --output-dir")


def check_not_locked(folder: Path) -> None:
    """Stops when another run holds `folder`; creates nothing."""
    if not Path(folder).is_dir():
        return
    try:
        fd = lock_folder(folder)
    except FolderBusy:
        raise _busy(folder) from None
    os.close(fd)  # closing drops the probe's lock


class RunDir:
    """The locked output folder of this run and its marker, which lists each file before it is written."""

    def __init__(self, folder: Path):
        """Takes the folder's lock (held until this process ends), or RunDirError naming its holder."""
        self.folder = Path(folder)
        try:  # on a file system without flock, the marker still guards against mix-ups
            self.fd = lock_folder(self.folder)
        except FolderBusy:
            raise _busy(self.folder) from None
        self.files, self.tb, self.data = set(), {"created": False, "events": []}, {}
        self._release = weakref.finalize(self, os.close, self.fd)  # also when main() ends by an exception

    def close(self) -> None:
        """Releases the lock (a process that ends releases it too)."""
        self._release()

    def start(self, settings: dict, previous: dict | None) -> None:
        """Writes this run's marker, keeping the files that `previous` (the marker found) lists."""
        self.files = set(previous["files"]) if previous else set()
        self.tb = dict(previous["tb"]) if previous else {"created": False, "events": []}
        self.data = {"program": PROGRAM, "pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings}
        self.write()

    def write(self) -> None:
        data = {**self.data, "files": sorted(self.files), "tb": self.tb}
        atomic_write(self.folder / MARKER, (json.dumps(data, indent=1) + "\n").encode())

    def claim(self, *names: str) -> None:
        """Lists `names` in the marker (before they are written)."""
        new = set(names) - self.files
        if new:
            self.files |= new
            self.write()

    def claim_tb(self, created: bool, events) -> None:
        """Lists the event files this run's TensorBoard writer made, and whether it created tb/."""
        self.tb = {"created": self.tb["created"] or created, "events": sorted(set(self.tb["events"]) | set(events))}
        self.write()

    def remove_outputs(self) -> None:
        """--overwrite: deletes what the marker lists (files only, never a folder it did not create)."""
        for name in sorted(self.files):
            for path in [self.folder / name, *self.folder.glob(f".{glob.escape(name)}.*{TMP_SUFFIX}")]:
                if path.is_symlink() or path.is_file():
                    path.unlink()
        tb = self.folder / TB
        for name in self.tb["events"]:
            path = tb / name
            if not tb.is_symlink() and (path.is_symlink() or path.is_file()):
                path.unlink()
        if self.tb["created"] and tb.is_dir() and not tb.is_symlink() and not any(tb.iterdir()):
            tb.rmdir()
        # tb/ stays this project's folder while it holds files put there by others
        self.files, self.tb = set(), {"created": self.tb["created"] and tb.is_dir(), "events": []}
        self.write()



def check_output_dir(args) -> dict | None:
    """Before anything is read or written: the folder can be written into, no other train.py uses it,
    no file that this project did not write holds one of its output names, and it holds no run that
    this one would overwrite or mix with. Returns the marker of the run it holds (None when none).

    An --output-dir that is a symbolic link to a folder (scratch space linked into a home folder) is
    followed here, once: from then on args.output_dir is the folder's real path, which the run locks,
    marks and writes into, whatever the link is changed to meanwhile. The command lines it prints keep
    the path as typed."""
    if Path(args.output_dir).is_symlink() and Path(args.output_dir).is_dir():
        args.output_dir = os.path.realpath(args.output_dir)
    out_dir = Path(args.output_dir)
    problem = unwritable(out_dir)
    if problem:
        raise RunDirError(f"--output-dir {out_dir}: {problem}; choose another folder")
    check_not_locked(out_dir)
    marker = read_marker(out_dir, is_output)
    foreign = foreign_outputs(out_dir, marker, is_output, args.tensorboard)
    if foreign:
        raise RunDirError(f"{out_dir} holds {', '.join(foreign)}, which no {MARKER} there lists as written "
                          f"by train.py (another program's files, or an older train.py's): train.py neither "
                          f"replaces nor deletes them, even with --overwrite; move them away, or choose another "
                          f"--output-dir")
    if marker is None or args.overwrite:
        return marker
    found = [name for name in sorted(marker["files"]) if (out_dir / name).exists()] or [MARKER]
    if not args.resume:
        raise RunDirError(f"{out_dir} holds a previous run ({', '.join(found)}): add --resume to continue it, "
                          f"--overwrite to start over and delete it, or choose another --output-dir")
    own = [name for name in (CHECKPOINT, previous(Path(CHECKPOINT)).name) if (out_dir / name).exists()]
    if Path(args.resume).resolve().parent != out_dir.resolve() and own:
        raise RunDirError(f"{out_dir} holds another run ({', '.join(found)}) than the one --resume {args.resume} "
                          f"continues; choose another --output-dir")
    return marker


def prepare_output_dir(args, settings: dict, marker: dict | None, damaged: Path | None) -> RunDir:
    """Right before the first epoch, once every flag and path has been checked: creates and locks the
    folder, marks it as this run's (with `settings`), deletes what the previous run's marker lists
    (--overwrite), and sets aside the newest checkpoint when loading found it damaged (only inside
    --output-dir)."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = RunDir(out_dir)
    if read_marker(out_dir, is_output) != marker:
        raise RunDirError(f"{out_dir / MARKER} changed while this run was starting (another train.py?); "
                          f"run the same command again")
    folder.start(settings, marker)
    if args.overwrite:
        folder.remove_outputs()
    folder.claim(*RUN_OUTPUTS)
    if damaged is not None and damaged.name == CHECKPOINT and damaged.parent.resolve() == out_dir.resolve():
        folder.claim(DAMAGED)
        os.replace(damaged, out_dir / DAMAGED)  # else the next save would keep it as the previous checkpoint
    return folder
