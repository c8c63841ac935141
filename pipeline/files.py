"""One way to write a file that a crash, a full disk or a planted link cannot leave half-written.

    atomic_write(out_dir / "metrics.jsonl", text.encode())        # bytes
    atomic_write(out_dir / "curves.png", lambda f: fig.savefig(f, format="png"))  # or a writer

The data goes to a temporary file with a unique name in the same folder (`tempfile.mkstemp`:
created with O_EXCL, so it never opens a file or link that is already there), is flushed and
fsynced, then renamed over the target with `os.replace` (atomic on one file system), and the
folder is fsynced so that the rename itself survives a power cut. On any error the temporary file
is removed and the target is as it was. Imports nothing heavy: prep/shard.py uses it without torch.
"""

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

TMP_SUFFIX = ".tmp"  # every temporary file this project writes ends so; a name of its own, never the target's


def fsync_folder(folder) -> None:
    """Makes a rename or a new file in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the data itself is synced
        pass
    finally:
        os.close(fd)


def temporary_beside(path) -> tuple[int, Path]:
    """(fd, path) of a new, empty temporary file in `path`'s folder, opened exclusively (no link followed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    return fd, Path(tmp)


def atomic_write(path, data: bytes | Callable[[BinaryIO], None], *, mode: int = 0o644,
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Writes `data` (bytes, or a function that writes into the open binary file) to `path` atomically
    and durably; returns `path`. Raises OSError naming `path` when it cannot; `path` is then untouched.

    `before_replace(tmp)` runs once the temporary file is synced and before it takes `path`'s name:
    checkpoints read themselves back there and keep the file they replace as the previous one. An
    exception it raises is a write that failed."""
    path = Path(path)
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; outputs are as readable as any other file
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException as exn:
        tmp.unlink(missing_ok=True)
        if isinstance(exn, OSError) and exn.filename is None:
            exn.filename = str(path)
        raise
    fsync_folder(path.parent)
    return path
