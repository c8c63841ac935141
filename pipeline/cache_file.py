"""The decoded split on disk, beside its shards: a later run loads the pixels the first run decoded.

    <shards>/decoded-train-torch-cpu-center.u8    # decoded-{split}-{loader}-{decode device}-{crop}.u8

One file per split and per way of decoding it: a 4 KiB header, then the split's pixels as raw uint8,
(count, 64, 64, 3) in stored order, exactly as the cache holds them. The header is the magic bytes,
a 4-byte little-endian length and a JSON object: the file format, the manifest's SHA-256, the split,
its keys' SHA-256, what decoded it (loader, device, library versions), the crop, the pixel version
(`pipeline.geometry.PIXELS_VERSION`), the count, the image shape and the pixels' CRC-32. A file is
loaded only when every one of these matches what this run would decode and the pixels' CRC-32 checks;
anything else (another crop, a rebuilt manifest, a truncated or damaged file, a file that is not
this project's) is reported in one line and decoded again, after which the file is replaced.

The file is untrusted input, like the shards: the header is read with one bounded `os.read`, parsed
as JSON of at most 4 KiB (no pickle, nothing evaluated) and compared field by field with the values
this run computes; its count is never used to size anything before it matches the manifest's count
and the file's size. The name is made from the run's own choices, never from the file, and it is
opened with O_NOFOLLOW and must be a regular file: a planted link or FIFO is refused, so nothing
outside the shard folder is read.

Writing goes through `common.files.atomic_write` (a unique temporary file, fsync, `os.replace`):
two processes filling at once each write a whole file and the last rename wins, and a reader holds
whichever whole file it opened. Before writing, the folder's free space must exceed the file's size
by DISK_RESERVE; when it does not, or the folder cannot be written (a read-only dataset), the run
says so in one line and goes on without the file. A temporary left by a writer that was killed is
deleted by the next writer of the same file once it has not changed for STALE_SECONDS.

Reading is `readinto` in chunks, straight into the cache tensor on the CPU, or on CUDA into two pinned
buffers that alternate, each copied to the device with `non_blocking=True` while the next is read and
its CRC-32 computed. Not `mmap`: the bytes are copied once either way (page cache to the tensor), and
a file truncated under a mapping kills the process with SIGBUS where a read just comes back short.
"""

import errno
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import stat
import struct
import time
import zlib
from pathlib import Path

import torch

from common import files
from common.files import TMP_SUFFIX, atomic_write
from pipeline.geometry import IMAGE_SIZE, PIXELS_VERSION
from pipeline.shards import MANIFEST, MAX_MANIFEST_BYTES
from pipeline.torch_loader import jpeg_decoder

MAGIC = b"VAECELEB"
FORMAT = 1
HEADER_BYTES = 4096  # magic, length and JSON; the pixels start here, page-aligned
_LENGTH = struct.Struct("<I")
SHAPE = [IMAGE_SIZE, IMAGE_SIZE, 3]
IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3
CHUNK_BYTES = 32 << 20  # per read or write: big enough for full disk speed, small enough for two pinned buffers
DISK_RESERVE = 10**9  # bytes the folder keeps free after the file is written
STALE_SECONDS = 3600  # a temporary of a decoded file unchanged this long was left by a killed writer
FILE_MODES = ("auto", "off")  # train.py's --cache-file
FIELDS = ("format", "manifest", "split", "keys", "loader", "crop", "pixels", "count", "shape", "crc32")


class Unusable(Exception):
    """Why a decoded file cannot be used, in words (it is then decoded again)."""


def file_name(split: str, decoder: str, crop: str) -> str:
    """The file's name in the shard folder, from this run's own choices (never from a file)."""
    if not all(re.fullmatch(r"[A-Za-z0-9_-]+", part) for part in (split, decoder, crop)):
        raise ValueError(f"not a decoded file's name: {split!r}, {decoder!r}, {crop!r}")
    return f"decoded-{split}-{decoder}-{crop}.u8"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def decoder_of(reader) -> tuple[str, str]:
    """(short name for the file name, full description for the header) of what makes `reader`'s pixels:
    the loader, where it decodes, and the versions of the libraries that decode and resize."""
    kind = type(reader).__name__
    libraries = [f"torch {torch.__version__}"]  # its build too: a CUDA build brings its own nvJPEG
    if kind == "TorchLoader":
        on_gpu = bool(reader.gpu_decode)
        if on_gpu:
            name = jpeg_decoder(reader.device)[0]
            libraries.append(f"{name} {version(name)}")
        else:
            libraries += [f"simplejpeg {version('simplejpeg')}", f"pillow {version('pillow')}"]
        short = f"torch-{'gpu' if on_gpu else 'cpu'}"
    elif kind == "DaliLoader":
        on_gpu = bool(reader.gpu)
        from nvidia.dali import __version__ as dali_version  # imported already: the reader runs DALI
        libraries.append(f"dali {dali_version}")
        if on_gpu:
            libraries.append(f"hw_decoder_load {reader.hw_decoder_load}")
        short = f"dali-{'gpu' if on_gpu else 'cpu'}"
    else:
        short = kind.lower()
    return short, f"{short} ({', '.join(libraries)})"


def expected_header(data_path, split: str, keys: list[str], decoder: str, crop: str) -> dict:
    """Every header field but the CRC-32, as this run would write it."""
    manifest = hashlib.sha256(files.read_regular(Path(data_path) / MANIFEST, MAX_MANIFEST_BYTES)).hexdigest()
    return {"format": FORMAT, "manifest": manifest, "split": split,
            "keys": hashlib.sha256("\n".join(keys).encode()).hexdigest(), "loader": decoder, "crop": crop,
            "pixels": PIXELS_VERSION, "count": len(keys), "shape": SHAPE}


def file_bytes(count: int) -> int:
    return HEADER_BYTES + count * IMAGE_BYTES


def encode_header(header: dict, magic: bytes = MAGIC, what: str = "a decoded file") -> bytes:
    """Magic, length and JSON, padded to HEADER_BYTES: the header of the decoded file (and, with its own
    `magic`, of the FID statistics file, pipeline/fid_stats.py)."""
    text = json.dumps(header, sort_keys=True).encode()
    block = magic + _LENGTH.pack(len(text)) + text
    if len(block) > HEADER_BYTES:
        raise ValueError(f"{what}'s header of {len(block)} bytes is over {HEADER_BYTES}")
    return block.ljust(HEADER_BYTES, b"\0")


def parse_header(block: bytes, expected: dict, magic: bytes = MAGIC, fields: tuple = FIELDS,
                 what: str = "a decoded-images file") -> int:
    """The payload's CRC-32 from a file's first HEADER_BYTES, after checking that the header has exactly
    `fields` and every one but the CRC-32 equals `expected`'s; raises Unusable saying what differs."""
    if len(block) < HEADER_BYTES or not block.startswith(magic):
        raise Unusable(f"it is not {what} of this project")
    (length,) = _LENGTH.unpack_from(block, len(magic))
    start = len(magic) + _LENGTH.size
    if length > HEADER_BYTES - start:
        raise Unusable(f"its header claims {length} bytes, more than {HEADER_BYTES - start}")
    try:
        header = json.loads(block[start:start + length].decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise Unusable("its header is not readable JSON") from None
    if not isinstance(header, dict) or sorted(header) != sorted(fields):
        raise Unusable("its header does not have this format's fields")
    for field, want in expected.items():
        have = header[field]
        if type(have) is not type(want) or have != want:  # type: True == 1, but a bool is no count
            shown = repr(have)  # repr: a control character in the file is shown escaped, not sent to the terminal
            raise Unusable(f"its {field} is {shown if len(shown) <= 80 else shown[:76] + '...'}, not this run's {want!r}")
    crc = header["crc32"]
    if type(crc) is not int or not 0 <= crc < 1 << 32:
        raise Unusable("its header's crc32 is not a CRC-32")
    return crc


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, which must be a regular file and not a link (common/files.py)."""
    try:
        return files.open_regular(path)
    except FileNotFoundError:
        raise
    except files.NotRegularFile as exn:
        why = "it is a link, and links are not followed" if exn.errno == errno.ELOOP else "it is not a regular file"
        raise Unusable(why) from None
    except OSError as exn:
        raise Unusable(f"it cannot be opened ({exn.strerror or exn})") from None


def read_exactly(f, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise Unusable("it ended early (truncated while being read)")
        got += n


def load(path: Path, expected: dict, device) -> torch.Tensor:
    """The (count, 64, 64, 3) uint8 pixels of the decoded file `path` on `device`, if its header matches
    `expected` and its pixels their CRC-32; raises Unusable saying why not. Reads nothing past
    `file_bytes(count)`: a file of any other size is refused before its pixels are read."""
    device = torch.device(device)
    fd = open_regular(path)
    with os.fdopen(fd, "rb", buffering=0) as f:
        size, want = os.fstat(fd).st_size, file_bytes(expected["count"])
        if size < HEADER_BYTES:
            raise Unusable(f"it has {size} bytes, less than a header")
        crc = parse_header(os.read(fd, HEADER_BYTES), expected)
        if size != want:
            raise Unusable(f"it has {size:,} bytes, not the {want:,} of {expected['count']:,} images (truncated?)")
        images = torch.empty((expected["count"], *SHAPE), dtype=torch.uint8, device=device)
        flat, running = images.view(-1), 0
        if device.type == "cpu":  # straight into the tensor
            view = memoryview(flat.numpy())
            for lo in range(0, len(flat), CHUNK_BYTES):
                chunk = view[lo:lo + CHUNK_BYTES]
                read_exactly(f, chunk)
                running = zlib.crc32(chunk, running)  # about 4 GB/s on one core
        else:  # two pinned buffers: one is read and checked while the other is copied to the device
            n = min(CHUNK_BYTES, len(flat)) or 1
            buffers = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            copied = [None, None]
            try:
                for i, lo in enumerate(range(0, len(flat), CHUNK_BYTES)):
                    k, hi = i % 2, min(lo + CHUNK_BYTES, len(flat))
                    if copied[k] is not None:
                        copied[k].synchronize()  # this buffer's previous copy has reached the device
                    chunk = buffers[k][:hi - lo]
                    view = memoryview(chunk.numpy())
                    read_exactly(f, view)
                    running = zlib.crc32(view, running)
                    flat[lo:hi].copy_(chunk, non_blocking=True)
                    copied[k] = torch.cuda.Event()
                    copied[k].record()
            finally:
                torch.cuda.synchronize(device)
        if running != crc:
            raise Unusable("its pixels do not match their CRC-32 (the file is damaged)")
    return images


def host_chunks(images: torch.Tensor):
    """The pixels' bytes as host memoryviews of up to CHUNK_BYTES, in order (from the GPU through a pinned buffer)."""
    flat = images.reshape(-1)
    if flat.device.type == "cpu":
        view = memoryview(flat.contiguous().numpy())
        for lo in range(0, len(view), CHUNK_BYTES):
            yield view[lo:lo + CHUNK_BYTES]
        return
    buffer = torch.empty(min(CHUNK_BYTES, len(flat)) or 1, dtype=torch.uint8, pin_memory=True)
    for lo in range(0, len(flat), CHUNK_BYTES):
        chunk = buffer[:min(CHUNK_BYTES, len(flat) - lo)]
        chunk.copy_(flat[lo:lo + len(chunk)])  # synchronous: the buffer is written into the file next
        yield memoryview(chunk.numpy())


def remove_stale_temporaries(path: Path) -> None:
    """Deletes the temporaries of `path` that a process killed while writing left behind (as large as the
    file): those unchanged for STALE_SECONDS. A writer at work changes its temporary every CHUNK_BYTES."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
        try:
            if stat.S_ISREG(tmp.lstat().st_mode) and now - tmp.lstat().st_mtime > STALE_SECONDS:
                tmp.unlink()  # removes the name itself: a link is never followed
        except OSError:  # gone already, or not ours to remove
            pass


def save(path: Path, images: torch.Tensor, header: dict) -> str | None:
    """Writes `images` with `header` (all fields but the CRC-32) to `path` atomically; returns None, or
    why nothing was written, in words."""
    need = file_bytes(len(images))
    remove_stale_temporaries(path)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError as exn:
        return f"not written ({path.parent}: {exn.strerror or exn})"
    if free < need + DISK_RESERVE:
        return (f"not written: {path.parent} has {free / 1e9:.2f} GB free, and the file needs "
                f"{need / 1e9:.2f} GB with {DISK_RESERVE / 1e9:.2f} GB left over")

    def write(f):
        f.write(b"\0" * HEADER_BYTES)  # the header goes in last, when the CRC-32 is known
        crc = 0
        for chunk in host_chunks(images):
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)
        f.seek(0)
        f.write(encode_header({**header, "crc32": crc}))

    try:
        atomic_write(path, write)
    except OSError as exn:  # a read-only dataset, a full disk: the run goes on without the file
        return f"not written ({exn.strerror or exn}: {exn.filename or path})"
    return None
