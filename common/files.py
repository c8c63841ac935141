"""One way to write a file that a crash, a full disk or a planted link cannot leave half-written, and
one check that a name read from a file names a file inside its folder.

    atomic_write(out_dir / "metrics.jsonl", text.encode())        # bytes
    atomic_write(out_dir / "curves.png", lambda f: fig.savefig(f, format="png"))  # or a writer

The data goes to a temporary file with a unique name in the same folder (`tempfile.mkstemp`:
created with O_EXCL, so it never opens a file or link that is already there), is flushed and
fsynced, then renamed over the target with `os.replace` (atomic on one file system), and the
folder is fsynced so that the rename itself survives a power cut. On any error the temporary file
is removed and the target is as it was. Imports nothing heavy: prep/shard.py uses it without torch.

Also the one way to read a file from a folder that came from someone else (`open_regular`,
`read_regular`: a regular file, no link followed, no FIFO waited on, no read past its size) and the
one lock on a folder (`lock_folder`: train.py's --output-dir and prep/shard.py's --output-dir).
"""

import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

TMP_SUFFIX = ".tmp"  # every temporary file this project writes ends so; a name of its own, never the target's


def plain_name(name) -> bool:
    """Whether `name` is a plain file name, which can only mean a file inside the folder it is joined to:
    no path separator, not `.` or `..`, no URL scheme or drive (`pipe:`, `http:`, `C:`), no NUL, no
    leading dash (an option to a command)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not name.startswith("-")
            and not any(c in name for c in "/\\:\0"))


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


# ---------------------------------------------------------------------------- reading untrusted files
class NotRegularFile(OSError):
    """A path that is a link, a FIFO, a device, a socket or a folder where a regular file was expected,
    or a file larger than the caller allows; its message is one line naming the path."""

    def __str__(self) -> str:
        return self.strerror


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def open_regular(path, follow_links: bool = False) -> int:
    """A read-only descriptor of `path`, which must be a regular file: opened without following a link
    (O_NOFOLLOW) and without blocking (O_NONBLOCK: a FIFO with no writer would block the open or the
    read forever), then checked with fstat, so a FIFO, a device or a socket is refused before any read.
    FileNotFoundError passes through; anything else that is not a regular file is NotRegularFile.
    `follow_links` is for paths the user typed (generate.py's photos, prep's image folder), never for
    names found in a folder that came from elsewhere."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exn:
        if exn.errno == errno.ELOOP:
            raise NotRegularFile(errno.ELOOP, f"{path} is a symbolic link, and links are not followed") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise NotRegularFile(errno.EINVAL, f"{path} is {kind}, not a regular file, and is not read")
    return fd


def read_regular(path, limit: int | None = None, follow_links: bool = False) -> bytes:
    """The bytes of the regular file `path` (`open_regular`), reading no more than the size fstat gives
    when it is opened; NotRegularFile when that size is over `limit`."""
    fd = open_regular(path, follow_links)
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise NotRegularFile(errno.EFBIG, f"{path} has {size:,} bytes, more than the {limit:,} such a file "
                                              f"may have, and is not read")
        data = bytearray(size)
        view, got = memoryview(data), 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:  # shrank while being read
                break
            got += n
        return bytes(data[:got])


# ---------------------------------------------------------------------------- locking a folder
class FolderBusy(OSError):
    """Another process holds the folder's lock; `pid` is its process id where the system says (else None)."""

    def __init__(self, folder, pid: int | None):
        super().__init__(errno.EWOULDBLOCK, f"{folder} is locked by another process")
        self.pid = pid


def lock_holder(fd: int) -> int | None:
    """The id of the process holding a flock on the file open as `fd`, from /proc/locks (Linux)."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:56789 0 EOF" (a waiting lock has "->" after the number)
                fields = [x for x in fields if x != "->"]
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode and int(fields[4]) > 0:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


def lock_folder(folder) -> int:
    """A descriptor of `folder` (not followed if it is a link) holding an exclusive `flock` on it: no lock
    file to plant, link or leave behind, and the kernel drops the lock when the process ends, however it
    ends. FolderBusy when another process holds it; on a file system without flock, the descriptor
    without a lock. The lock lasts until the descriptor is closed."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = lock_holder(fd)
        os.close(fd)
        raise FolderBusy(folder, pid) from None
    except OSError as exn:
        if exn.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
            os.close(fd)
            raise
    return fd
