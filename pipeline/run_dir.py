"""The output folder of a training run: the marker that says what the run wrote, and its lock.

A run writes `run.json` into its --output-dir before anything else and lists in it every output
name before it writes that file (so the list is never short of a file on disk), together with the
settings, its process id and, with TensorBoard, the event files its own writer made and whether it
created `tb/`. "A previous run" means that marker, nothing else: --overwrite deletes exactly what it
lists (and temporary files of those names), never a folder the run did not create, and a folder
whose output names are taken by files no marker lists is refused, with or without --overwrite.

The marker is read as untrusted data: every name in it must be a plain file name that train.py
writes (no separator, no `..`), or the folder is refused. The lock is `fcntl.flock` on the folder
itself, held until the run ends (pipeline/files.py's `lock_folder`, which prep/shard.py takes too):
no lock file to plant, link or leave behind, and the kernel drops it when the process ends. Imports nothing heavy.
"""

import json
import os
import re
import socket
import time
import weakref
from pathlib import Path

from pipeline.cli import first_line
from pipeline.files import TMP_SUFFIX, FolderBusy, atomic_write, lock_folder

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


class RunDirError(RuntimeError):
    """An output folder that cannot be used as asked, with what to do about it; printed in one line."""


def plain_name(name) -> bool:
    """A file name inside the folder: no separator, no `..`, nothing that leads elsewhere."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


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
            for path in [self.folder / name, *self.folder.glob(f".{glob_escape(name)}.*{TMP_SUFFIX}")]:
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


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)
