"""Shard a folder of CelebA JPEGs into webdataset tars with DALI index files and a manifest.

    python prep/shard.py                      # dataset/celeba/img_align_celeba -> dataset/celeba/shards
    python prep/shard.py --synthetic 5000     # make synthetic faces, then shard them

Every image is decoded once to check it: files that do not decode are skipped, decodable images
that are not baseline RGB JPEGs are re-encoded so every loader reads them alike, and both lists go
into manifest.json. Shards are written under temporary names and renamed when whole, and a journal
records each finished shard, so running the same command again after an interruption finishes the
job without redoing or losing anything.
"""

import argparse
import hashlib
import io
import json
import os
import random
import re
import signal
import sys
import tarfile
import time
from collections import deque
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline.shards import MANIFEST, SPLITS  # noqa: E402

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
CELEBA_SPLIT = {"train": 162_770, "val": 19_867, "test": 19_962}  # official partition sizes
PARTITION_FILE = "list_eval_partition.txt"
JOURNAL = ".journal.jsonl"
DALI_INDEX_VERSION = "v1.2"
SHARD_FILE = re.compile(r"^(train|val|test)-\d{6}\.(tar|idx)(\.tmp)?$")  # the names this script writes
GET_CELEBA = (
    "Download img_align_celeba.zip from the CelebA site (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html; "
    "torchvision's download is not used, it fails on Google Drive quotas), unzip it to "
    "dataset/celeba/img_align_celeba/ (optionally with list_eval_partition.txt beside it), "
    "or make synthetic faces with `python prep/shard.py --synthetic 5000`."
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", type=Path, default=None,
                   help="folder of JPEGs laid out like img_align_celeba (default: dataset/celeba/img_align_celeba, "
                        "or dataset/synthetic/img_align_celeba with --synthetic)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where shards and manifest.json go (default: 'shards' beside the data folder)")
    p.add_argument("--partition-file", type=Path, default=None,
                   help=f"CelebA's official split file (default: {PARTITION_FILE} beside the data folder if present; "
                        "otherwise a deterministic split by key hash in CelebA's proportions)")
    p.add_argument("--shard-size", type=int, default=2000, help="samples per shard (default: 2000, about 20 MB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the write-time shuffle and of synthetic faces")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes that read and check images")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images (default: 95)")
    p.add_argument("--synthetic", type=int, metavar="N", default=0,
                   help="first generate N synthetic CelebA-shaped faces into --data-path, then shard them")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards that an earlier run made from other inputs or options")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.data_path is None:
        args.data_path = Path("dataset/synthetic/img_align_celeba" if args.synthetic else "dataset/celeba/img_align_celeba")
    if args.output_dir is None:
        args.output_dir = args.data_path.parent / "shards"
    if args.partition_file is None and (args.data_path.parent / PARTITION_FILE).is_file():
        args.partition_file = args.data_path.parent / PARTITION_FILE
    if args.shard_size < 1 or args.workers < 1:
        p.error("--shard-size and --workers must be at least 1")
    return args


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------- planning
def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        fail(f"{folder} does not exist. {GET_CELEBA}")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."))
    if not files:
        fail(f"{folder} holds no .jpg/.jpeg/.png files. {GET_CELEBA}")
    return files


def read_partition(path: Path) -> dict[str, str]:
    """file name -> split, from CelebA's `000001.jpg 0` lines (0 train, 1 val, 2 test)."""
    names = {"0": "train", "1": "val", "2": "test"}
    table = {}
    try:
        text = path.read_text()
    except OSError as exn:
        fail(f"cannot read the partition file {path}: {exn.strerror}. Pass the path of CelebA's "
             f"{PARTITION_FILE}, or leave --partition-file out to split by key hash")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in names:
            fail(f"{path}, line {n}: expected '<file name> <0|1|2>', found {line!r}")
        table[parts[0]] = names[parts[1]]
    if not table:
        fail(f"{path} lists no files; expected CelebA's '<file name> <0|1|2>' lines")
    return table


def hash_split(key: str) -> str:
    # A key's split depends on the key alone, so adding or removing files never moves the others.
    u = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64
    total = sum(CELEBA_SPLIT.values())
    if u < CELEBA_SPLIT["train"] / total:
        return "train"
    return "val" if u < (CELEBA_SPLIT["train"] + CELEBA_SPLIT["val"]) / total else "test"


def plan_shards(files, partition, shard_size, seed):
    """[(shard name, [paths])] for every split, plus the files left out and why."""
    by_split, skipped, seen = {s: [] for s in SPLITS}, [], set()
    for path in files:
        key = path.stem.replace(".", "_")  # webdataset splits a name at its first dot
        if key in seen:
            skipped.append({"file": path.name, "reason": f"duplicate key {key!r} (another file has the same stem)"})
            continue
        seen.add(key)
        if partition is None:
            by_split[hash_split(key)].append(path)
        elif path.name in partition:
            by_split[partition[path.name]].append(path)
        else:
            skipped.append({"file": path.name, "reason": f"not listed in {PARTITION_FILE}"})
    plan = []
    for split in SPLITS:
        # Shuffled once at write time: DALI and webdataset read shards in order with bounded buffers.
        paths = by_split[split]
        random.Random(f"{seed}-{split}").shuffle(paths)
        for i in range(0, len(paths), shard_size):
            plan.append((f"{split}-{i // shard_size:06d}", paths[i:i + shard_size]))
    return plan, skipped


def fingerprint(plan, options) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for name, paths in plan:
        for p in paths:
            st = p.stat()
            h.update(f"{name}/{p.name}/{st.st_size}/{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- checking
def ignore_sigint():
    # Ctrl-C is the parent's to handle: it stops the pool; workers dying on their own print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_image(job):
    """(path, quality) -> (key, jpeg bytes or None, note): runs in the worker pool."""
    path, quality = job
    key = path.stem.replace(".", "_")
    try:
        raw = path.read_bytes()
    except OSError as exn:
        return key, None, f"unreadable: {exn}"
    if not raw:
        return key, None, "empty file"
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()  # a full decode: truncation only shows here
    except Exception as exn:  # PIL raises many types for bad data; all mean "skip it"
        return key, None, f"does not decode: {exn}"
    problems = []
    if im.format != "JPEG":
        problems.append(f"{im.format} data, not JPEG")
    if im.mode != "RGB":
        problems.append(f"mode {im.mode}, not RGB")
    if im.info.get("progressive") or im.info.get("progression"):
        problems.append("progressive JPEG")
    if not problems:
        return key, raw, None
    out = io.BytesIO()
    im.convert("RGB").save(out, "JPEG", quality=quality)
    return key, out.getvalue(), "re-encoded as baseline RGB JPEG: " + ", ".join(problems)


# ---------------------------------------------------------------------------- writing
def write_dali_index(tar_path: Path, idx_path: Path) -> int:
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
    with open(idx_path, "w") as f:
        f.write(f"{DALI_INDEX_VERSION} {len(samples)}\n")
        f.writelines(" ".join(components) + "\n" for _, components in samples)
    return len(samples)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def replace_durably(tmp: Path, final: Path):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class ShardWriter:
    """One shard: a tar under a temporary name, renamed with its index once whole."""

    def __init__(self, out_dir: Path, name: str):
        self.out_dir, self.name = out_dir, name
        self.tar, self.idx = out_dir / f"{name}.tar", out_dir / f"{name}.idx"
        self.tmp = out_dir / f"{name}.tar.tmp"
        self.file = open(self.tmp, "wb")
        # A fixed mtime makes the same inputs give byte-identical shards (and checksums).
        self.writer = wds.TarWriter(self.file, mtime=0)
        self.count = 0

    def add(self, key: str, jpeg: bytes):
        self.writer.write({"__key__": key, "jpg": jpeg})
        self.count += 1

    def finish(self) -> dict:
        self.writer.close()
        self.file.close()
        idx_tmp = self.out_dir / f"{self.name}.idx.tmp"
        write_dali_index(self.tmp, idx_tmp)
        record = {"name": self.name, "tar": self.tar.name, "idx": self.idx.name, "num_samples": self.count,
                  "bytes": self.tmp.stat().st_size, "sha256": sha256_file(self.tmp)}
        replace_durably(idx_tmp, self.idx)
        replace_durably(self.tmp, self.tar)  # the tar last: a tar on disk always has its index
        return record


def read_journal(path: Path, plan_id: str, overwrite: bool) -> dict:
    """Shards finished by an earlier run of the same plan: name -> record."""
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("plan") != plan_id:
        if not overwrite:
            fail(f"{path.parent} holds an unfinished run made from other inputs or options; "
                 "pass --overwrite to replace it, or choose another --output-dir")
        return {}
    done = {}
    for entry in lines[1:]:
        shard = entry["shard"]  # None for a shard whose every file was skipped
        if shard is None or ((path.parent / shard["tar"]).is_file() and (path.parent / shard["idx"]).is_file()):
            done[entry["name"]] = entry
    return done


def remove_old_shards(out: Path):
    """Before --overwrite writes a new plan: the old run's shards must not linger beside the new manifest."""
    for p in out.iterdir():
        if SHARD_FILE.match(p.name):
            p.unlink()


def main(argv=None):
    args = parse_args(argv)
    if args.synthetic:
        from prep.synthetic import write_synthetic
        write_synthetic(args.data_path, args.synthetic, seed=args.seed, workers=args.workers, progress=not args.quiet)

    files = list_images(args.data_path)
    partition = read_partition(args.partition_file) if args.partition_file else None
    plan, skipped = plan_shards(files, partition, args.shard_size, args.seed)
    if not plan:
        reasons = sorted({s["reason"] for s in skipped})
        fail(f"none of the {len(files)} images in {args.data_path} can be sharded: " + "; ".join(reasons[:3]))
    options = {"shard_size": args.shard_size, "seed": args.seed, "quality": args.quality,
               "split_source": str(args.partition_file) if partition is not None else "key hash"}
    plan_id = fingerprint(plan, options)

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("plan") == plan_id:
            print(f"{manifest_path} is up to date ({old['num_samples']} samples); nothing to do")
            return 0
        if not args.overwrite:
            fail(f"{out} already holds shards made from other inputs or options; "
                 "pass --overwrite to replace them, or choose another --output-dir")
        manifest_path.unlink()
        remove_old_shards(out)

    journal_path = out / JOURNAL
    done = read_journal(journal_path, plan_id, args.overwrite)
    if not done:
        if args.overwrite:
            remove_old_shards(out)
        journal_path.write_text(json.dumps({"plan": plan_id}) + "\n")
    pending = [(name, paths) for name, paths in plan if name not in done]

    started = time.time()
    with Pool(args.workers, initializer=ignore_sigint) as pool, open(journal_path, "a") as journal, \
            tqdm(total=sum(len(paths) for _, paths in pending), desc="sharding", unit="img",
                 disable=args.quiet) as bar:
        # Work is queued one shard ahead of the writer: the workers never wait on it, and no more than
        # two shards of image bytes sit in memory however far the writer falls behind.
        def submit(paths):
            return pool.imap(check_image, [(path, args.quality) for path in paths], chunksize=16)
        queued = deque(submit(paths) for _, paths in pending[:2])
        for i, (name, paths) in enumerate(pending):
            results = queued.popleft()
            if i + 2 < len(pending):
                queued.append(submit(pending[i + 2][1]))
            writer, notes = ShardWriter(out, name), {"skipped": [], "reencoded": []}
            for path in paths:
                key, jpeg, note = next(results)
                if jpeg is None:
                    notes["skipped"].append({"file": path.name, "reason": note})
                else:
                    writer.add(key, jpeg)
                    if note:
                        notes["reencoded"].append({"file": path.name, "reason": note})
                bar.update()
            if writer.count == 0:  # every file of this shard was bad: keep no empty shard
                writer.writer.close(); writer.file.close(); writer.tmp.unlink()
                done[name] = {"name": name, "shard": None, **notes}
            else:
                done[name] = {"name": name, "shard": writer.finish(), **notes}
            journal.write(json.dumps(done[name]) + "\n")
            journal.flush()
            os.fsync(journal.fileno())

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
        "splits": splits, "skipped": skipped, "reencoded": reencoded,
    }
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    replace_durably(tmp, manifest_path)
    journal_path.unlink()
    counts = ", ".join(f"{s} {splits[s]['num_samples']}" for s in SPLITS)
    print(f"wrote {manifest_path}: {counts}; {len(skipped)} skipped, {len(reencoded)} re-encoded "
          f"({time.time() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: finished shards are kept; run the same command again to finish the job",
              file=sys.stderr)
        sys.exit(130)
