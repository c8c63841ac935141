"""The FID features and statistics of a split's real images, beside its shards: computed once, then read.

    <shards>/fid-val-center-2048.stats        # fid-{split}-{crop}-{count}.stats

    stats, note = fid_stats.cached(data_path, "val", keys, "center", fid.IDENTITY, decoder, compute)
    # compute() -> {"mean": float64 (D,), "cov": float64 (D, D), "features": float32 (count, D)}

The same rules as the decoded file (pipeline/cache_file.py): a 4 KiB header, then raw little-endian
numbers, never a pickle. The header is the magic bytes, a 4-byte little-endian length and a JSON object:
the format, the manifest's SHA-256, the split, its images' keys' SHA-256 (which images, in which order),
the crop, the pixel version, what decoded the pixels, the network (its SHA-256 and the preprocessing:
model/fid.py's IDENTITY), the count, the feature size and the payload's CRC-32. The payload is the mean
(float64, D), the covariance (float64, D x D) and the features (float32, count x D) that KID needs.

A file is used only when every header field matches what this run would compute, its size is exactly
what that header implies and the payload matches its CRC-32 and holds finite numbers; anything else
(another network, crop or image count, a rebuilt manifest, a truncated or damaged file, a file that is
not this project's, a link) is said in one line, recomputed, and the file replaced. The name is made
from the run's own choices, the file opened without following links; the count sizes nothing before
it equals the run's own. Written with common.files.atomic_write; a folder that cannot be written (a
read-only dataset) is said in one line and the run goes on with the statistics it computed.
"""

import hashlib
import os
import re
import zlib
from pathlib import Path
from typing import Callable

import torch

from common import files
from common.files import atomic_write
from pipeline import cache_file
from pipeline.cache_file import HEADER_BYTES, Unusable, open_regular, read_exactly, remove_stale_temporaries
from pipeline.geometry import PIXELS_VERSION
from pipeline.shards import MANIFEST, MAX_MANIFEST_BYTES

MAGIC = b"VAEFIDST"
FORMAT = 1
FIELDS = ("format", "manifest", "split", "keys", "crop", "pixels", "decoder", "network", "count", "dim", "crc32")


def file_name(split: str, crop: str, count: int) -> str:
    """The file's name in the shard folder, from this run's own choices (never from a file)."""
    if not all(re.fullmatch(r"[A-Za-z0-9_-]+", part) for part in (split, crop)) or type(count) is not int or count < 2:
        raise ValueError(f"not a FID statistics file's name: {split!r}, {crop!r}, {count!r}")
    return f"fid-{split}-{crop}-{count}.stats"


def expected_header(data_path, split: str, keys: list[str], crop: str, network: str, decoder: str,
                    dim: int) -> dict:
    """Every header field but the CRC-32, as this run would write it."""
    manifest = hashlib.sha256(files.read_regular(Path(data_path) / MANIFEST, MAX_MANIFEST_BYTES)).hexdigest()
    return {"format": FORMAT, "manifest": manifest, "split": split,
            "keys": hashlib.sha256("\n".join(keys).encode()).hexdigest(), "crop": crop, "pixels": PIXELS_VERSION,
            "decoder": decoder, "network": network, "count": len(keys), "dim": dim}


def payload_bytes(count: int, dim: int) -> int:
    return dim * 8 + dim * dim * 8 + count * dim * 4


def encode_header(header: dict) -> bytes:
    return cache_file.encode_header(header, MAGIC, "a FID statistics file")


def parse_header(block: bytes, expected: dict) -> int:
    """The payload's CRC-32 from a file's first HEADER_BYTES, every other field checked against `expected`."""
    return cache_file.parse_header(block, expected, MAGIC, FIELDS, "a FID statistics file")


def _tensors(count: int, dim: int) -> dict:
    return {"mean": torch.empty(dim, dtype=torch.float64), "cov": torch.empty((dim, dim), dtype=torch.float64),
            "features": torch.empty((count, dim), dtype=torch.float32)}


def load(path: Path, expected: dict) -> dict:
    """{"mean", "cov", "features"} on the CPU from the file `path`, if it is what `expected` describes;
    raises Unusable saying why not (FileNotFoundError when there is none)."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            raise Unusable(f"it has {size} bytes, less than a header")
        crc = parse_header(os.read(fd, HEADER_BYTES), expected)
        want = HEADER_BYTES + payload_bytes(expected["count"], expected["dim"])
        if size != want:
            raise Unusable(f"it has {size:,} bytes, not the {want:,} its header implies (truncated?)")
        stats, running = _tensors(expected["count"], expected["dim"]), 0
        for tensor in stats.values():
            view = memoryview(tensor.numpy()).cast("B")
            read_exactly(f, view)
            running = zlib.crc32(view, running)
    if running != crc:
        raise Unusable("its numbers do not match their CRC-32 (the file is damaged)")
    if not all(bool(torch.isfinite(t).all()) for t in stats.values()):
        raise Unusable("it holds numbers that are not finite")
    return stats


def save(path: Path, stats: dict, header: dict) -> str | None:
    """Writes `stats` with `header` (all fields but the CRC-32) to `path` atomically; returns None, or why
    nothing was written, in words."""
    tensors = [stats["mean"].to("cpu", torch.float64).contiguous(), stats["cov"].to("cpu", torch.float64).contiguous(),
               stats["features"].to("cpu", torch.float32).contiguous()]
    shapes = [t.shape for t in _tensors(header["count"], header["dim"]).values()]
    if [t.shape for t in tensors] != shapes:
        raise ValueError(f"FID statistics of shapes {[tuple(t.shape) for t in tensors]}, not {[tuple(s) for s in shapes]}")
    remove_stale_temporaries(path)

    def write(f):
        f.write(b"\0" * HEADER_BYTES)  # the header goes in last, when the CRC-32 is known
        crc = 0
        for t in tensors:
            view = memoryview(t.numpy()).cast("B")
            f.write(view)
            crc = zlib.crc32(view, crc)
        f.seek(0)
        f.write(encode_header({**header, "crc32": crc}))

    try:
        atomic_write(path, write)
    except OSError as exn:
        return f"not written ({exn.strerror or exn}: {exn.filename or path})"
    return None


def cached(data_path, split: str, keys: list[str], crop: str, network: str, decoder: str,
           compute: Callable[[], dict], dim: int = 2048) -> tuple[dict, str]:
    """The statistics of the `keys` images of `split` (in that order): read from the file beside the shards
    when it matches, else `compute()`d and written there. Returns them and one line saying which."""
    path = Path(data_path) / file_name(split, crop, len(keys))
    expected = expected_header(data_path, split, keys, crop, network, decoder, dim)
    try:
        return load(path, expected), f"FID statistics of {split} read from {path}"
    except FileNotFoundError:
        why = "none yet"
    except (Unusable, OSError) as exn:
        why = f"{path.name} not used: {exn}"
    stats = compute()
    failed = save(path, stats, expected)
    if failed:
        return stats, f"FID statistics of {split} computed ({why}); {path.name} {failed}"
    return stats, f"FID statistics of {split} computed ({why}) and written to {path}"
