"""Shard a folder of CelebA JPEGs into webdataset tars with DALI index files and a manifest.

    python prep/shard.py                      # dataset/celeba/img_align_celeba -> dataset/celeba/shards
    python prep/shard.py --synthetic 5000     # make synthetic faces, then shard them

Every image is decoded once to check it: files that do not decode, or whose header claims more than
pipeline/images.py's pixel bound, are skipped; images that some decoder would read otherwise than
the rest (EXIF orientation, progressive frames, CMYK, grayscale, odd chroma subsampling, PNG, ...)
are re-encoded upright as baseline RGB JPEGs, and both lists go into manifest.json. The output folder
is locked while it runs (a second run on it stops, naming the first one's process). Shards are written under temporary names and renamed when whole, and a journal
records each finished shard, so running the same command again after an interruption finishes the
job without redoing or losing anything.

Run again on finished shards, it checks the ones the manifest lists (present, and of the size it
records; with --verify also their SHA-256 and DALI index) and rebuilds only those that are damaged
or missing, from the JPEGs. --overwrite rebuilds everything. A manifest.json it cannot read, or one
it did not write, stops it without touching the folder unless --overwrite is given.

File names become sample keys with "_" for every character other than letters, digits, "_" and "-"
(a DALI index line is space-separated; webdataset splits a member name at its first dot); the manifest
lists those under "renamed".
"""

import argparse
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import tarfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import webdataset as wds  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import cli  # noqa: E402
from common.celeba import CELEBA_SPLIT  # noqa: E402
from common.files import atomic_write, temporary_beside  # noqa: E402
from pipeline.attributes import (ATTRIBUTES, CELEBA_ATTRIBUTES_FILE, AttributeFileError, file_digest,  # noqa: E402
                                 format_attributes, parse_attributes)
from common.files import FolderBusy, lock_folder, open_regular, read_regular  # noqa: E402
from pipeline.images import DEFAULT_QUALITY, TooManyPixels, stored_form  # noqa: E402
from pipeline.shards import MANIFEST, MAX_MANIFEST_BYTES, SPLITS, manifest_problem, shard_command  # noqa: E402
from prep.synthetic import write_synthetic  # noqa: E402

PARTITION_FILE = "list_eval_partition.txt"
JOURNAL = ".journal.jsonl"
DALI_INDEX_VERSION = "v1.2"
# The names this script writes: shards, their indexes, and their temporary files (common/files.py's names).
SHARD_FILE = re.compile(r"^(train|val|test)-\d{6}\.(tar|idx)$|^\.(train|val|test)-\d{6}\.(tar|idx)\..+\.tmp$")
# What a sample key may hold: a DALI index line is space-separated fields, and webdataset splits a member
# name at its first dot. Other characters in a file name become "_" (listed in the manifest's "renamed").
KEY_CHAR = re.compile(r"[^A-Za-z0-9_-]")
CHUNK = 16  # images per task sent to a worker process
TASKS_PER_WORKER = 4  # tasks in flight per worker: they never wait on the writer, and memory stays bounded
GET_CELEBA = (
    "Download img_align_celeba.zip from the CelebA site (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html; "
    "torchvision's download is not used, it fails on Google Drive quotas), unzip it to "
    "dataset/celeba/img_align_celeba/ (optionally with list_eval_partition.txt beside it), "
    f"or make synthetic faces with `{shard_command('--synthetic', 5000)}`."
)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", type=Path, default=None,
                   help="folder of JPEGs laid out like img_align_celeba (default: dataset/celeba/img_align_celeba, "
                        "or dataset/synthetic/img_align_celeba with --synthetic)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where shards and manifest.json go (default: 'shards' beside the data folder)")
    p.add_argument("--partition-file", type=Path, default=None,
                   help=f"CelebA's official split file (default: {PARTITION_FILE} beside the data folder if present; "
                        "otherwise a deterministic split by key hash in CelebA's proportions)")
    p.add_argument("--shard-size", type=cli.positive_int, default=2000,
                   help="samples per shard (default: 2000, about 20 MB)")
    p.add_argument("--seed", type=cli.seed, default=0, help="seed of the write-time shuffle and of synthetic faces")
    p.add_argument("--workers", type=cli.positive_int, default=cli.default_workers(cap=None, spare=0),
                   help=f"processes that read and check images (default: {cli.workers_rule(cap=None, spare=0)})")
    p.add_argument("--quality", type=cli.int_at_least(1, 100), default=DEFAULT_QUALITY,
                   help=f"JPEG quality for re-encoded images (default: {DEFAULT_QUALITY})")
    p.add_argument("--synthetic", type=cli.positive_int, metavar="N", default=None,
                   help="first generate N synthetic CelebA-shaped faces into --data-path, then shard them")
    p.add_argument("--verify", action="store_true",
                   help="when the shards are already made: check each one's SHA-256 and DALI index too, not "
                        "only that it is there with the size the manifest records; damaged ones are rebuilt")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild every shard, also over shards that an earlier run made from other inputs or options, "
                        "or beside a manifest.json this script cannot read or did not write")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.data_path is None:
        args.data_path = Path("dataset/synthetic/img_align_celeba" if args.synthetic else "dataset/celeba/img_align_celeba")
    if args.output_dir is None:
        args.output_dir = args.data_path.parent / "shards"
    if args.partition_file is None and (args.data_path.parent / PARTITION_FILE).is_file():
        args.partition_file = args.data_path.parent / PARTITION_FILE
    return args


def rebuild_flags(args, partition_used: bool) -> list[str]:
    """The flags that make this plan again from the same JPEGs, all but --output-dir: the manifest keeps them
    so that a loader finding a damaged shard can name the command that rebuilds it."""
    flags = ["--data-path", str(args.data_path.resolve())]
    defaults = build_parser()
    for name in ("shard_size", "seed", "quality"):
        if getattr(args, name) != defaults.get_default(name):
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if partition_used and args.partition_file.resolve() != (args.data_path.parent / PARTITION_FILE).resolve():
        flags += ["--partition-file", str(args.partition_file.resolve())]
    return flags


def sample_key(path: Path) -> str:
    """The webdataset key of an image file: its stem, with every character a DALI index line or a
    webdataset member name cannot hold (spaces, dots, ...) as "_"."""
    return KEY_CHAR.sub("_", path.stem)


def shown_name(path: Path) -> str:
    """A file name as the manifest and messages show it: bytes that are not UTF-8 (which Python holds
    as lone surrogates, and which neither JSON nor a terminal takes) as \\xNN escapes."""
    return os.fsencode(path.name).decode("utf-8", "backslashreplace")


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------- planning
def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        fail(f"{folder} does not exist. {GET_CELEBA}")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in cli.IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))
    if not files:
        fail(f"{folder} holds no .jpg/.jpeg/.png files. {GET_CELEBA}")
    return files


def read_partition(path: Path) -> tuple[dict[str, str], str]:
    """(file name -> split, SHA-256 of the file), from CelebA's `000001.jpg 0` lines (0 train, 1 val, 2 test).
    The plan holds the digest, not the path: the same file typed another way is the same plan."""
    names = {"0": "train", "1": "val", "2": "test"}
    table = {}
    try:
        raw = path.read_bytes()
        text = raw.decode()
    except UnicodeDecodeError:
        fail(f"{path} is not text; expected CelebA's '<file name> <0|1|2>' lines")
    except OSError as exn:
        fail(f"cannot read the partition file {path}: {exn.strerror}. Pass the path of CelebA's "
             f"{PARTITION_FILE}, or leave --partition-file out to split by key hash")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)  # a file name may hold spaces
        if len(parts) != 2 or parts[1] not in names:
            fail(f"{path}, line {n}: expected '<file name> <0|1|2>', found {line!r}")
        table[parts[0]] = names[parts[1]]
    if not table:
        fail(f"{path} lists no files; expected CelebA's '<file name> <0|1|2>' lines")
    return table, hashlib.sha256(raw).hexdigest()


def read_attribute_file(path: Path) -> tuple[list[str], dict[str, list[int]]]:
    """CelebA's list_attr_celeba.txt: (attribute names, {file name: +-1 values})."""
    try:
        return parse_attributes(path.read_text(), path)
    except (OSError, UnicodeDecodeError) as exn:
        fail(f"cannot read the attribute file {path}: {getattr(exn, 'strerror', None) or exn}; fix or remove it")
    except AttributeFileError as exn:
        fail(f"{exn}; fix or remove it")


def write_attributes(out: Path, plan, attributes) -> dict:
    """ATTRIBUTES in the shard folder, the rows of the planned images keyed by sample key; its manifest entry."""
    names, table = attributes
    rows = [(sample_key(p), table[p.name]) for _, paths in plan for p in paths if p.name in table]
    path = atomic_write(out / ATTRIBUTES, format_attributes(names, sorted(rows)).encode())
    return {"file": ATTRIBUTES, "source": CELEBA_ATTRIBUTES_FILE, "names": names, "images": len(rows),
            "sha256": file_digest(path)}


def hash_split(key: str) -> str:
    # A key's split depends on the key alone, so adding or removing files never moves the others.
    u = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64
    total = sum(CELEBA_SPLIT.values())
    if u < CELEBA_SPLIT["train"] / total:
        return "train"
    return "val" if u < (CELEBA_SPLIT["train"] + CELEBA_SPLIT["val"]) / total else "test"


def plan_shards(files, partition, shard_size, seed):
    """[(shard name, [paths])] for every split, the files left out and why, and the files stored under
    a key other than their stem."""
    by_split, skipped, renamed, seen = {s: [] for s in SPLITS}, [], [], set()
    for path in files:
        key = sample_key(path)
        if key in seen:
            skipped.append({"file": shown_name(path), "reason": f"duplicate key {key!r} (another file has the same stem)"})
            continue
        seen.add(key)
        if key != path.stem:
            renamed.append({"file": shown_name(path), "key": key})
        if partition is None:
            by_split[hash_split(key)].append(path)
        elif path.name in partition:
            by_split[partition[path.name]].append(path)
        else:
            skipped.append({"file": shown_name(path), "reason": f"not listed in {PARTITION_FILE}"})
    plan = []
    for split in SPLITS:
        # Shuffled once at write time: DALI and webdataset read shards in order with bounded buffers.
        paths = by_split[split]
        random.Random(f"{seed}-{split}").shuffle(paths)
        for i in range(0, len(paths), shard_size):
            plan.append((f"{split}-{i // shard_size:06d}", paths[i:i + shard_size]))
    return plan, skipped, renamed


def fingerprint(plan, options) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for name, paths in plan:
        for p in paths:
            st = p.stat()
            h.update(f"{name}/".encode() + os.fsencode(p.name) + f"/{st.st_size}/{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- checking
def ignore_sigint():
    # Ctrl-C is the parent's to handle: it stops the pool; workers dying on their own print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_chunk(jobs):
    """A task for a worker: check_image on a few images, so that one round trip carries several."""
    return [check_image(job) for job in jobs]


def check_image(job):
    """(path, quality) -> (key, jpeg bytes or None, note): runs in the worker pool. The stored bytes are the
    file's own when every decoder reads it alike, else re-encoded (pipeline/images.py's `stored_form`)."""
    path, quality = job
    key = sample_key(path)
    try:
        raw = read_regular(path, follow_links=True)
    except OSError as exn:
        return key, None, f"unreadable: {exn.strerror or exn}"
    if not raw:
        return key, None, "empty file"
    try:
        jpeg, problems = stored_form(raw, quality)
    except TooManyPixels as exn:
        return key, None, str(exn)
    except Exception as exn:  # PIL raises many types for bad data; all mean "skip it"
        return key, None, f"does not decode: {exn}"
    if not problems:
        return key, raw, None
    return key, jpeg, "re-encoded as baseline RGB JPEG: " + ", ".join(problems)


# ---------------------------------------------------------------------------- writing
def dali_index(tar_path: Path) -> str:
    """The `.idx` file DALI's fn.readers.webdataset wants, in the format its wds2idx tool writes."""
    samples = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = member.name.split(".", 1)
            component = f"{ext} {member.offset_data} {member.size} {member.name}"
            if samples and samples[-1][0] == key:
                samples[-1][1].append(component)
            else:
                samples.append((key, [component]))
    return f"{DALI_INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(c) + "\n" for _, c in samples)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """One shard: a tar streamed into a temporary file of its own (common/files.py), renamed once it
    is whole and its index is written."""

    def __init__(self, out_dir: Path, name: str):
        self.out_dir, self.name = out_dir, name
        self.tar, self.idx = out_dir / f"{name}.tar", out_dir / f"{name}.idx"
        fd, self.tmp = temporary_beside(self.tar)
        self.file = os.fdopen(fd, "wb")
        # A fixed mtime makes the same inputs give byte-identical shards (and checksums).
        self.writer = wds.TarWriter(self.file, mtime=0)
        self.count = 0

    def add(self, key: str, jpeg: bytes):
        try:
            self.writer.write({"__key__": key, "jpg": jpeg})
        except OSError as exn:  # a full disk: the error names no file
            exn.filename = exn.filename or str(self.tmp)
            raise
        self.count += 1

    def finish(self) -> dict:
        try:
            self.writer.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as exn:
            exn.filename = exn.filename or str(self.tmp)
            raise
        os.chmod(self.tmp, 0o644)  # mkstemp makes 0600 files
        record = {"name": self.name, "tar": self.tar.name, "idx": self.idx.name, "num_samples": self.count,
                  "bytes": self.tmp.stat().st_size, "sha256": sha256_file(self.tmp)}
        atomic_write(self.idx, dali_index(self.tmp).encode())
        # The tar last: a tar on disk always has its index. The folder is synced once, when the
        # manifest is written; until then a run checks each journalled shard before trusting it.
        os.replace(self.tmp, self.tar)
        return record

    def abort(self):
        """Closes and removes the unfinished tar."""
        if not self.file.closed:
            try:
                self.writer.close()  # else the tar stream writes its end into a closed file when collected
            except OSError:  # a full disk, say: the file goes anyway
                pass
            try:
                self.file.close()  # flushes what is buffered: on a full disk that fails again
            except OSError:
                pass
        self.tmp.unlink(missing_ok=True)


def read_journal(path: Path, plan_id: str, overwrite: bool) -> dict:
    """Shards finished by an earlier run of the same plan: name -> record."""
    try:
        text = read_regular(path).decode(errors="replace")
    except FileNotFoundError:
        return {}
    except OSError as exn:
        fail(f"cannot read {path} ({exn.strerror or exn}); pass --overwrite to start again, or choose another "
             "--output-dir")
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # the last line, cut short by a crash: its shard is written again
            pass
    if not lines or lines[0].get("plan") != plan_id:
        if not overwrite:
            fail(f"{path.parent} holds an unfinished run made from other inputs or options; "
                 "pass --overwrite to replace it, or choose another --output-dir")
        return {}
    done = {}
    for entry in lines[1:]:
        shard = entry["shard"]  # None for a shard whose every file was skipped
        if shard is None or shard_problem(path.parent, shard, deep=False) is None:
            done[entry["name"]] = entry
    return done


def remove_old_shards(out: Path):
    """Before --overwrite writes a new plan: the old run's shards must not linger beside the new manifest."""
    for p in out.iterdir():
        if SHARD_FILE.match(p.name):
            p.unlink()


def remove_temporaries(out: Path):
    """The unfinished tars and indexes of a run that was killed before it could remove them."""
    for p in out.iterdir():
        if p.name.startswith(".") and SHARD_FILE.match(p.name):
            p.unlink()


# ---------------------------------------------------------------------------- verifying
def read_manifest(path: Path) -> tuple[dict | None, str | None]:
    """(the manifest of a finished run, None), or (None, why it is not one) when `path` exists but cannot
    be read or was not written by this script, or (None, None) when there is none."""
    if not os.path.lexists(path):
        return None, None
    try:
        manifest = json.loads(read_regular(path, MAX_MANIFEST_BYTES))
    except (OSError, ValueError, RecursionError) as exn:
        return None, f"cannot be read ({getattr(exn, 'strerror', None) or exn})"
    if not isinstance(manifest, dict) or not {"plan", "splits", "num_samples"} <= manifest.keys() \
            or not isinstance(manifest["splits"], dict) \
            or not all(isinstance(manifest["splits"].get(s), dict) for s in SPLITS):
        return None, "is not a manifest prep/shard.py wrote"
    problem = manifest_problem(manifest)
    if problem is None and not all({"name", "tar", "idx", "num_samples", "bytes", "sha256"} <= record.keys()
                                   for s in SPLITS for record in manifest["splits"][s].get("shards", [])):
        problem = "a shard's record lacks a field"
    return (None, f"is not a manifest prep/shard.py wrote: {problem}") if problem else (manifest, None)


def shard_problem(out: Path, record: dict, deep: bool) -> str | None:
    """What is wrong with a shard the manifest lists, or None. Present, of the recorded size, and with an
    index of the recorded length; `deep` also compares the tar's SHA-256 and the whole index."""
    tar, idx = out / record["tar"], out / record["idx"]
    if not os.path.lexists(tar):
        return "missing"
    if tar.is_symlink() or not tar.is_file():
        return "not a regular file"
    size = tar.stat().st_size
    if size != record["bytes"]:
        return f"{size} bytes where the manifest records {record['bytes']}"
    try:
        fd = open_regular(idx)
        try:
            header = os.read(fd, 64).split(b"\n", 1)[0].decode(errors="replace").split()
        finally:
            os.close(fd)
    except FileNotFoundError:
        return f"its index {idx.name} is missing"
    except OSError:
        return f"its index {idx.name} is not a regular file"
    if header != [DALI_INDEX_VERSION, str(record["num_samples"])]:
        return f"its index {idx.name} does not match it"
    if not deep:
        return None
    if sha256_file(tar) != record["sha256"]:
        return "its SHA-256 differs from the manifest's"
    try:
        matches = read_regular(idx).decode() == dali_index(tar)
    except (OSError, ValueError, tarfile.TarError):
        matches = False
    return None if matches else f"its index {idx.name} does not match it"


# ---------------------------------------------------------------------------- the run
def write_shards(pending, out: Path, args, finished) -> None:
    """Writes each shard of `pending` [(name, paths)] in order, calling finished(journal entry) as each
    one is whole.

    Worker processes check the images in tasks of CHUNK, with at most TASKS_PER_WORKER tasks per worker
    submitted ahead of the writer: the workers rarely wait on it, results held in memory stay bounded,
    and on Ctrl-C the pool stops after the few tasks already running."""
    chunks = (paths[i:i + CHUNK] for _, paths in pending for i in range(0, len(paths), CHUNK))
    with ProcessPoolExecutor(args.workers, initializer=ignore_sigint) as pool, \
            tqdm(total=sum(len(paths) for _, paths in pending), desc="sharding", unit="img",
                 disable=args.quiet) as bar:
        def results():
            in_flight = deque()
            for chunk in chunks:
                in_flight.append(pool.submit(check_chunk, [(path, args.quality) for path in chunk]))
                if len(in_flight) >= args.workers * TASKS_PER_WORKER:
                    yield from in_flight.popleft().result()
            while in_flight:
                yield from in_flight.popleft().result()

        stream, writer = results(), None
        try:
            for name, paths in pending:
                writer, notes = ShardWriter(out, name), {"skipped": [], "reencoded": []}
                for path in paths:
                    key, jpeg, note = next(stream)
                    if jpeg is None:
                        notes["skipped"].append({"file": shown_name(path), "reason": note})
                    else:
                        writer.add(key, jpeg)
                        if note:
                            notes["reencoded"].append({"file": shown_name(path), "reason": note})
                    bar.update()
                if writer.count == 0:  # every file of this shard was bad: keep no empty shard
                    writer.abort()
                    finished({"name": name, "shard": None, **notes})
                else:
                    finished({"name": name, "shard": writer.finish(), **notes})
        except BrokenProcessPool as exn:
            writer.abort()
            fail(f"a worker process stopped without finishing its images ({exn}); finished shards are kept: "
                 f"run the same command again to finish the job")
        except BaseException:
            if writer is not None:
                writer.abort()  # a finished shard is already renamed: only an unfinished one goes
            pool.shutdown(wait=True, cancel_futures=True)  # queued tasks are dropped, running ones are short
            raise


def nbytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


def write_failed(exn: OSError, out: Path, pending) -> None:
    """Stops in one line for an OSError while writing into `out`: which file, why, and for a full disk
    (or a file size limit) how much the shards of `pending` [(name, paths)] still need."""
    name = exn.filename or out
    why = exn.strerror or str(exn)
    if exn.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        need = sum(p.stat().st_size + 1024 for _, paths in pending for p in paths)  # + a tar header each
        try:
            free = f"{nbytes(shutil.disk_usage(out).free)} free"
        except OSError:
            free = "its free space unknown"
        limit = " or raise the file size limit (ulimit -f)" if exn.errno == errno.EFBIG else ""
        fail(f"cannot write {name}: {why}; the shards still to write need about {nbytes(need)} in {out} "
             f"({free}): free some space{limit} and run the same command again, which keeps the finished shards")
    fail(f"cannot write {name}: {why}; finished shards are kept: fix that and run the same command again")


def write_manifest(path: Path, manifest: dict) -> None:
    atomic_write(path, json.dumps(manifest, indent=1).encode())


def repair(out: Path, manifest: dict, plan, args) -> int:
    """Shards of an unchanged plan: checks the ones the manifest lists, rebuilds the damaged ones."""
    manifest_path = out / MANIFEST
    (out / JOURNAL).unlink(missing_ok=True)  # left by a run stopped between its manifest and its cleanup
    records = {rec["name"]: rec for split in SPLITS for rec in manifest["splits"][split]["shards"]}
    checks = tqdm(records.values(), desc="verifying", unit="shard", disable=args.quiet or not args.verify)
    damaged = {rec["name"]: why for rec in checks if (why := shard_problem(out, rec, args.verify))}
    if not damaged:
        how = "present, sizes, SHA-256 and indexes checked" if args.verify else "present with the recorded sizes"
        print(f"{manifest_path} is up to date ({manifest['num_samples']} samples in {len(records)} shards, {how}); "
              f"nothing to do")
        return 0
    named = [f"{name} ({why})" for name, why in damaged.items()]
    print(f"rebuilding {len(damaged)} of {len(records)} shards from {args.data_path}: "
          + "; ".join(named[:5]) + (f"; and {len(named) - 5} more" if len(named) > 5 else ""))
    started, rebuilt = time.time(), {}
    pending = [(name, paths) for name, paths in plan if name in damaged]
    try:
        write_shards(pending, out, args, lambda entry: rebuilt.__setitem__(entry["name"], entry))
    except OSError as exn:
        write_failed(exn, out, [(name, paths) for name, paths in pending if name not in rebuilt])
    for name, entry in rebuilt.items():
        if entry["shard"] is None or entry["shard"]["num_samples"] != records[name]["num_samples"]:
            fail(f"{name} rebuilt from {args.data_path} holds other samples than {manifest_path} lists: the "
                 "images changed since the shards were made; run again with --overwrite to rebuild everything")
        records[name].update(entry["shard"])  # the same bytes, unless an image changed in place
    try:
        write_manifest(manifest_path, manifest)
    except OSError as exn:
        write_failed(exn, out, [])
    print(f"rebuilt {len(rebuilt)} shard{'s' if len(rebuilt) != 1 else ''} and updated {manifest_path} ({time.time() - started:.1f} s)")
    return 0


def main(argv=None):
    args = parse_args(argv)
    # Nothing is created before the folders are known to be writable.
    for flag, folder in (("--output-dir", args.output_dir), ("--data-path", args.data_path if args.synthetic else None)):
        problem = folder is not None and cli.unwritable(folder)
        if problem:
            fail(f"{flag} {folder}: {problem}; choose another folder")
    if args.synthetic:
        write_synthetic(args.data_path, args.synthetic, seed=args.seed, workers=args.workers, progress=not args.quiet)

    files = list_images(args.data_path)
    partition, partition_sha256 = read_partition(args.partition_file) if args.partition_file else (None, None)
    attributes_file = args.data_path.parent / CELEBA_ATTRIBUTES_FILE  # CelebA's layout: beside the images
    attributes = read_attribute_file(attributes_file) if attributes_file.is_file() else None
    plan, skipped, renamed = plan_shards(files, partition, args.shard_size, args.seed)
    if not plan:
        reasons = sorted({s["reason"] for s in skipped})
        fail(f"none of the {len(files)} images in {args.data_path} can be sharded: " + "; ".join(reasons[:3]))
    options = {"shard_size": args.shard_size, "seed": args.seed, "quality": args.quality,
               "split_source": f"{PARTITION_FILE} sha256:{partition_sha256}" if partition is not None else "key hash"}
    if attributes is not None:
        options["attributes"] = file_digest(attributes_file)
    plan_id = fingerprint(plan, options)

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)  # a folder that exists is left as it is
    lock = lock_output(out)
    try:
        return make_shards(args, out, plan, plan_id, options, skipped, renamed, partition, attributes)
    finally:
        os.close(lock)


def lock_output(out: Path) -> int:
    """The lock on the output folder (common/files.py's, as train.py takes on its own): a second run on the
    same folder would delete the first one's temporary files. A link to a folder is followed once, here."""
    try:
        return lock_folder(out.resolve())
    except FolderBusy as exn:
        who = f"process {exn.pid}" if exn.pid else "another process"
        fail(f"--output-dir {out} is in use by {who}, another prep/shard.py run on it: wait for it to end, "
             "or choose another --output-dir")
    except OSError as exn:
        fail(f"--output-dir {out}: cannot open it ({exn.strerror or exn}); choose another folder")


def make_shards(args, out: Path, plan, plan_id: str, options: dict, skipped: list, renamed: list, partition,
                attributes) -> int:
    """The shards of `plan` in the locked folder `out`: repaired when its manifest is of the same plan,
    written (or their unfinished run finished) otherwise."""
    manifest_path = out / MANIFEST
    old, unusable = read_manifest(manifest_path)
    if unusable and not args.overwrite:  # it may be someone else's folder: nothing in it is touched
        fail(f"{manifest_path} {unusable}; its folder is left as it is: pass --overwrite to make every shard "
             "there again, or choose another --output-dir")
    if old is not None and not args.overwrite:
        if old["plan"] != plan_id:
            fail(f"{out} already holds shards made from other inputs or options; "
                 "pass --overwrite to replace them, or choose another --output-dir")
        return repair(out, old, plan, args)
    done = {}
    try:
        return write_all(args, out, plan, plan_id, options, skipped, renamed, partition, attributes, done)
    except OSError as exn:
        write_failed(exn, out, [(name, paths) for name, paths in plan if name not in done])


def write_all(args, out, plan, plan_id, options, skipped, renamed, partition, attributes, done) -> int:
    """Writes the shards of `plan` not in the journal, then the manifest; `done` fills with the finished ones."""
    manifest_path = out / MANIFEST
    if manifest_path.exists():  # --overwrite: every shard is made again
        manifest_path.unlink()
        remove_old_shards(out)

    journal_path = out / JOURNAL
    done.update(read_journal(journal_path, plan_id, args.overwrite))
    if not done:
        if args.overwrite:
            remove_old_shards(out)
        atomic_write(journal_path, (json.dumps({"plan": plan_id}) + "\n").encode())
    remove_temporaries(out)  # of a run killed mid-shard
    pending = [(name, paths) for name, paths in plan if name not in done]

    started = time.time()
    with open(journal_path, "a") as journal:
        def finished(entry):
            done[entry["name"]] = entry
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
        write_shards(pending, out, args, finished)

    splits = {s: {"num_samples": 0, "shards": []} for s in SPLITS}
    for name, _ in plan:
        entry = done[name]
        skipped += entry["skipped"]
        if entry["shard"]:
            split = name.split("-")[0]
            splits[split]["shards"].append(entry["shard"])
            splits[split]["num_samples"] += entry["shard"]["num_samples"]
    reencoded = [r for name, _ in plan for r in done[name]["reencoded"]]
    manifest = {
        "format": "webdataset", "sample": {"jpg": "JPEG image"}, "index": f"DALI {DALI_INDEX_VERSION}",
        "source": str(args.data_path.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "plan": plan_id, "options": options, "num_samples": sum(s["num_samples"] for s in splits.values()),
        "splits": splits, "skipped": skipped, "reencoded": reencoded, "renamed": renamed,
        "rebuild": rebuild_flags(args, partition is not None),
    }
    if partition is not None:
        manifest["partition_file"] = str(args.partition_file.resolve())
    if attributes is not None:
        manifest["attributes"] = write_attributes(out, plan, attributes)
    write_manifest(manifest_path, manifest)
    journal_path.unlink()
    counts = ", ".join(f"{s} {splits[s]['num_samples']}" for s in SPLITS)
    print(f"wrote {manifest_path}: {counts}; {len(skipped)} skipped, {len(reencoded)} re-encoded, "
          f"{len(renamed)} renamed "
          f"({time.time() - started:.1f} s)")
    return 0


def run(argv=None) -> int:
    """main(), with Ctrl-C as a line that says what was kept, and exit code 130."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted: finished shards are kept; run the same command again to finish the job",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
