"""Reading the manifest that prep/shard.py writes, and planning who reads which samples.

Both loaders split an epoch the same way: the split's shards, in an order shuffled per epoch for
training, are laid end to end, and each rank takes one contiguous run of samples from that list.
Training gives every rank the same count (DDP needs equal step counts, so up to world_size-1
samples rest out an epoch); evaluation gives every sample to exactly one rank.
"""

import hashlib
import json
import os
import random
import shlex
from dataclasses import dataclass
from pathlib import Path

from common.files import NotRegularFile, open_regular, plain_name, read_regular

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
# The flags a manifest's "rebuild" list may hold, each with one value: prep/shard.py's plan flags.
REBUILD_FLAGS = ("--data-path", "--shard-size", "--seed", "--quality", "--partition-file")
# Samples each training loader's shuffle buffer holds (torch: of the plan, per rank; dali: the reader's
# initial fill, at least); the shards are already shuffled at write time.
SHUFFLE_BUFFER = 2000
# The least a sample takes in a tar: a 512-byte member header and one 512-byte block of data (prep/shard.py
# skips empty images). A count claimed by a manifest is checked against the tar's size with it, before
# anything is sized from that count.
MIN_SAMPLE_BYTES = 1024
MAX_MANIFEST_BYTES = 1 << 26  # CelebA's manifest, with every file listed as re-encoded, is a few MB
INDEX_LINE_BYTES = 512  # at most per `.idx` line: "jpg OFFSET SIZE NAME", NAME a file name of at most 255 bytes


class DataError(RuntimeError):
    """Bad or missing data, with a message that says what to do. Scripts print it without a traceback."""

    def __init__(self, message: str):
        # A DataLoader re-raises a worker's exception as type(exn)(its traceback text): keep the
        # worker's own message so the user sees one clear line.
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


@dataclass(frozen=True)
class Shard:
    tar: Path
    idx: Path
    num_samples: int


@dataclass(frozen=True)
class Span:
    """Samples [start, stop) of one shard, counted in the shard's stored order."""
    shard: Shard
    start: int
    stop: int


def load_manifest(data_path) -> dict:
    """The manifest of the shard folder `data_path`, checked by `manifest_problem`."""
    data_path = Path(data_path)
    path = data_path / MANIFEST
    try:
        raw = read_regular(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raw = None
    except NotRegularFile as exn:
        raise DataError(f"{exn}; {make_again_hint(data_path, overwrite=True)}") from None
    except OSError as exn:
        raise DataError(f"{path} is not a readable manifest ({exn.strerror or exn}); "
                        f"{make_again_hint(data_path, overwrite=True)}") from None
    if raw is None:
        hint = ("make the shards first: `python prep/shard.py` for CelebA in dataset/celeba/img_align_celeba, "
                "or `python prep/shard.py --synthetic 5000` for the built-in synthetic faces")
        if data_path.is_dir() and any(data_path.glob("*.jpg")):
            hint = f"{data_path} holds JPEGs, not shards: run `{shard_command('--data-path', data_path)}` first"
        raise DataError(f"no {MANIFEST} in {data_path}: {hint}")
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exn:
        raise DataError(f"{path} is not a readable manifest ({exn}); {make_again_hint(data_path, overwrite=True)}") \
            from None
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"{path}: {problem}, so these are not shards prep/shard.py wrote and nothing in the folder "
                        f"is read; {make_again_hint(data_path, overwrite=True)}")
    return manifest


def data_identity(data_path) -> str:
    """What the shards in `data_path` are, as a run records it and --resume compares it: the plan digest
    that prep/shard.py writes into the manifest (the source JPEGs' names, sizes and times, the split and
    the options), so that the same shards copied, moved or repaired are the same data; for a manifest
    without one, the SHA-256 of its split tables (every shard's name, count and digest)."""
    manifest = load_manifest(data_path)
    plan = manifest.get("plan")
    if isinstance(plan, str) and plan:
        return plan
    return "splits-" + hashlib.sha256(json.dumps(manifest["splits"], sort_keys=True).encode()).hexdigest()


def manifest_problem(manifest) -> str | None:
    """What makes `manifest` more than data, or None: every file it names must be a plain file name
    (`plain_name`), every count a count, and its rebuild flags only prep/shard.py's plan flags."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        return "it has no 'splits' table"
    for split, entry in manifest["splits"].items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            return f"split {split!r} has no list of shards"
        for record in shards:
            for field in ("tar", "idx"):
                if not plain_name(record.get(field)):
                    return (f"the {field} entry {record.get(field)!r} of split {split!r} is not a plain file name in "
                            "the shard folder (it is a path, a URL or a command)")
            for field in ("num_samples", "bytes"):
                value = record.get(field, 0)
                if type(value) is not int or value < 0:
                    return f"the {field} of shard {record['tar']!r} is {value!r}, not a count"
    flags = manifest.get("rebuild", [])
    if not (isinstance(flags, list) and len(flags) % 2 == 0 and all(isinstance(f, str) for f in flags)
            and all(flag in REBUILD_FLAGS for flag in flags[::2])):
        return f"its rebuild flags {flags!r} are not prep/shard.py's plan flags"
    return None


def shard_command(*flags) -> str:
    """`python prep/shard.py FLAGS`, quoted so that the line does exactly this when pasted into a shell."""
    return shlex.join(["python", "prep/shard.py", *map(str, flags)])


def make_again_hint(data_path, overwrite: bool = False) -> str:
    flags = ["--data-path", "JPEG_FOLDER", "--output-dir", str(Path(data_path).resolve())] + \
        (["--overwrite"] if overwrite else [])
    return f"run `{shard_command(*flags)}` to make the shards again from their JPEGs"


def rebuild_hint(data_path) -> str:
    """The command that checks the shards in `data_path` and rebuilds the damaged ones from their JPEGs,
    with the flags prep/shard.py recorded in the manifest (its plan must match for it to repair)."""
    data_path = Path(data_path)
    try:
        manifest = json.loads(read_regular(data_path / MANIFEST, MAX_MANIFEST_BYTES))
        if manifest_problem(manifest):
            raise ValueError("not a manifest prep/shard.py wrote")
        flags = manifest.get("rebuild") or ["--data-path", manifest["source"]]
        source = Path(flags[flags.index("--data-path") + 1])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):  # no manifest to say how they were made
        return make_again_hint(data_path)
    if data_path.resolve() != (source.parent / "shards").resolve():  # not prep/shard.py's default
        flags = [*flags, "--output-dir", str(data_path.resolve())]
    return f"run `{shard_command(*flags, '--verify')}` to rebuild the damaged shards"


def split_shards(data_path, split: str) -> list[Shard]:
    """The shards of `split`, their paths resolved and checked to lie in `data_path` (a link out of the
    folder is refused), each a regular file with the size the manifest records and an index that
    agrees with its sample count (`shard_claims_problem`)."""
    data_path = Path(data_path)
    manifest = load_manifest(data_path)
    entry = manifest.get("splits", {}).get(split)
    if not entry or not entry["shards"]:
        raise DataError(f"{data_path / MANIFEST} has no samples in split '{split}'")
    folder = data_path.resolve()
    shards = []
    for record in entry["shards"]:
        tar, idx = (folder / record["tar"]).resolve(), (folder / record["idx"]).resolve()
        for path, name in ((tar, record["tar"]), (idx, record["idx"])):
            if path.parent != folder:
                raise DataError(f"{data_path / name} is a link to {path}, outside the shard folder {folder}, and is "
                                f"not read; {rebuild_hint(data_path)}")
        shard = Shard(tar, idx, record["num_samples"])
        problem = shard_claims_problem(shard, record.get("bytes"))
        if problem:
            raise DataError(f"{problem}; {rebuild_hint(data_path)}")
        shards.append(shard)
    return shards


def shard_claims_problem(shard: Shard, recorded_bytes: int | None) -> str | None:
    """What is wrong with `shard`'s files for the manifest's claims, in words, or None: the tar and the
    index must be regular files (`open_regular`: no FIFO or device is waited on), the tar of the recorded
    size, and the sample count no more than its bytes can hold and the one its index's first line says.
    Nothing larger than an index's first line is read: a count claimed in the millions fails here."""
    try:
        fd = open_regular(shard.tar)
    except FileNotFoundError:
        return f"shard {shard.tar} is listed in the manifest but missing"
    except NotRegularFile as exn:
        return f"shard {exn}"
    except OSError as exn:
        return f"shard {shard.tar} cannot be read ({exn.strerror or exn})"
    size = os.fstat(fd).st_size
    os.close(fd)
    if recorded_bytes is not None and size != recorded_bytes:  # a stat per shard finds truncation before an epoch does
        return (f"shard {shard.tar} has {size} bytes but the manifest says {recorded_bytes}: it is truncated or "
                f"was changed")
    if shard.num_samples * MIN_SAMPLE_BYTES > size:
        return (f"the manifest claims {shard.num_samples:,} samples in shard {shard.tar}, but its {size:,} bytes hold "
                f"at most {size // MIN_SAMPLE_BYTES:,}")
    try:
        fd = open_regular(shard.idx)
    except FileNotFoundError:
        return f"index {shard.idx} of shard {shard.tar} is missing, and without it {shard.tar.name} is unreadable"
    except NotRegularFile as exn:
        return f"index {exn}"
    except OSError as exn:
        return f"index {shard.idx} of shard {shard.tar} is unreadable ({exn.strerror or exn})"
    try:
        first = os.read(fd, 64).split(b"\n", 1)[0].split()
    except OSError as exn:
        return f"index {shard.idx} of shard {shard.tar} is unreadable ({exn.strerror or exn})"
    finally:
        os.close(fd)
    if len(first) != 2 or first[1] != str(shard.num_samples).encode():
        return (f"the manifest claims {shard.num_samples:,} samples in shard {shard.tar}, and its index {shard.idx} "
                f"does not say the same")
    return None


def read_index_text(shard: Shard) -> str:
    """The text of `shard`'s `.idx` file (a regular file, at most INDEX_LINE_BYTES per claimed sample);
    OSError or ValueError when it cannot be read."""
    return read_regular(shard.idx, 64 + INDEX_LINE_BYTES * shard.num_samples).decode()


def split_size(data_path, split: str) -> int:
    """Samples in `split`, from the manifest."""
    return sum(shard.num_samples for shard in split_shards(data_path, split))


def stored_keys(shards: list[Shard]) -> list[str]:
    """The key of every sample, in stored order (the evaluation order), from the shards' `.idx` files."""
    keys = []
    for shard in shards:
        try:
            rows = [line.split() for line in read_index_text(shard).splitlines()[1:]]
        except (OSError, ValueError) as exn:
            raise DataError(f"index {shard.idx} of shard {shard.tar} is unreadable "
                            f"({getattr(exn, 'strerror', None) or exn}); run prep/shard.py again") from None
        if len(rows) != shard.num_samples or any(len(row) != 4 for row in rows):
            raise DataError(f"index {shard.idx} of shard {shard.tar} does not match the manifest; "
                            "run prep/shard.py again")
        keys += [row[3].split(".", 1)[0] for row in rows]  # member "<key>.jpg", as webdataset splits it
    return keys


def rank_samples(total: int, rank: int, world_size: int, train: bool) -> tuple[int, int]:
    """The [start, stop) run of the epoch's sample order that `rank` reads."""
    if train:
        per_rank = total // world_size
        return rank * per_rank, (rank + 1) * per_rank
    return total * rank // world_size, total * (rank + 1) // world_size


def epoch_order(shards: list[Shard], epoch: int, seed: int, shuffle: bool) -> list[Shard]:
    # Every rank computes the same order from (seed, epoch), so no communication is needed.
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def take(shards: list[Shard], start: int, stop: int) -> list[Span]:
    """The spans of `shards`, laid end to end, that cover samples [start, stop)."""
    spans, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(stop, offset + shard.num_samples)
        if lo < hi:
            spans.append(Span(shard, lo - offset, hi - offset))
        offset += shard.num_samples
    return spans
