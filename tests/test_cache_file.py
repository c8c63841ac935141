"""The decoded file beside the shards: a later fill loads exactly what a fresh one decodes, anything that
does not match (another key, a truncated, damaged or hostile file, a link) is decoded again and said, and
two processes filling at once leave a whole, correct file."""

import json
import os
import shutil
import struct

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from pipeline import build_loader, cache_file
from pipeline.cache_file import HEADER_BYTES, IMAGE_BYTES, MAGIC
from conftest import copy_shards

BATCH = 16


@pytest.fixture
def data(shards, tmp_path):
    """A copy of the shards that a test may write beside (and damage), without the decoded files that
    earlier tests' runs left beside the session's shards."""
    return copy_shards(shards, tmp_path / "shards")


def filled(data, split="val", crop="center", mode="auto"):
    return build_loader("cache", data, split, BATCH, "cpu", workers=0, crop=crop, cache_file=mode).cache


def path_of(data, split="val", crop="center"):
    return data / cache_file.file_name(split, "torch-cpu", crop)


def test_a_second_fill_loads_exactly_what_a_fresh_fill_decodes(data):
    fresh = filled(data, mode="off")
    assert fresh.source == "decoded" and fresh.file_note is None and not path_of(data).exists(), "off writes nothing"
    first = filled(data)
    assert first.source == "decoded" and first.decoded == len(fresh) and first.file_note.startswith("wrote ")
    assert path_of(data).stat().st_size == HEADER_BYTES + len(fresh) * IMAGE_BYTES
    second = filled(data)
    assert second.source == "loaded" and second.decoded == 0 and second.file_note == f"loaded from {path_of(data)}"
    assert second.keys == fresh.keys and torch.equal(second.images, fresh.images)
    assert torch.equal(first.images, fresh.images)
    assert not list(data.glob("*.tmp")) and not list(data.glob(".*.tmp"))
    assert filled(data, mode="off").source == "decoded", "off does not read the file either"


def test_each_loader_has_its_own_file_and_loads_its_own_pixels(data):
    made = {source: build_loader("cache", data, "val", BATCH, "cpu", workers=1, source=source, cache_file="auto").cache
            for source in ("torch", "dali")}
    assert sorted(p.name for p in data.glob("decoded-*")) == ["decoded-val-dali-cpu-center.u8",
                                                              "decoded-val-torch-cpu-center.u8"]
    for source, first in made.items():
        again = build_loader("cache", data, "val", BATCH, "cpu", workers=1, source=source, cache_file="auto").cache
        assert again.source == "loaded" and torch.equal(again.images, first.images)
        assert f"{source}-cpu (torch {torch.__version__}" in header_of(data / f"decoded-val-{source}-cpu-center.u8")["loader"]


def test_another_key_is_decoded_again_and_said(data):
    center = filled(data)
    shutil.copy(path_of(data), path_of(data, crop="none"))  # a file of the center crop, named for the other
    other = filled(data, crop="none")
    assert other.source == "decoded" and not torch.equal(other.images, center.images)
    assert "its crop is 'center', not this run's 'none'; decoded again; wrote " in other.file_note
    assert torch.equal(filled(data, crop="none").images, other.images), "rewritten with the right pixels"

    manifest = json.loads((data / "manifest.json").read_text())
    manifest["note"] = "rebuilt"  # any change to the manifest: the shards may differ
    (data / "manifest.json").write_text(json.dumps(manifest))
    again = filled(data)
    assert again.source == "decoded" and "its manifest is " in again.file_note
    assert torch.equal(again.images, center.images) and filled(data).source == "loaded"


@pytest.mark.parametrize("damage", ["truncated", "longer", "flipped byte", "header only"])
def test_a_damaged_file_is_decoded_again(data, damage):
    good = filled(data)
    path = path_of(data)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if damage == "truncated":
            f.truncate(size - 1000)
        elif damage == "longer":
            f.seek(0, 2)
            f.write(b"\0" * IMAGE_BYTES)
        elif damage == "flipped byte":
            f.seek(HEADER_BYTES + 5 * IMAGE_BYTES + 77)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 1]))
        else:
            f.truncate(HEADER_BYTES)
    again = filled(data)
    assert again.source == "decoded" and torch.equal(again.images, good.images)
    why = "CRC-32" if damage == "flipped byte" else "bytes, not the"
    assert f"{path} was not used, as " in again.file_note and why in again.file_note
    assert filled(data).source == "loaded"


def header_of(path):
    block = path.read_bytes()[:HEADER_BYTES]
    (length,) = struct.unpack_from("<I", block, len(MAGIC))
    return json.loads(block[len(MAGIC) + 4:len(MAGIC) + 4 + length])


def with_header(path, header=None, raw=None):
    """Rewrites the file's header block: `header` as JSON, or the `raw` bytes after the magic."""
    body = raw if raw is not None else (lambda t: struct.pack("<I", len(t)) + t)(json.dumps(header).encode())
    pixels = path.read_bytes()[HEADER_BYTES:]
    path.write_bytes((MAGIC + body).ljust(HEADER_BYTES, b"\0")[:HEADER_BYTES] + pixels)


HOSTILE = {
    "huge count": (lambda h: {**h, "count": 2**62}, "its count is 4611686018427387904"),
    "count as a bool": (lambda h: {**h, "count": True}, "its count is True"),
    "other shape": (lambda h: {**h, "shape": [64, 64, 4]}, "its shape is [64, 64, 4]"),
    "a field missing": (lambda h: {k: v for k, v in h.items() if k != "crc32"}, "does not have this format's fields"),
    "an extra field": (lambda h: {**h, "path": "/etc/passwd"}, "does not have this format's fields"),
    "not a crc": (lambda h: {**h, "crc32": -1}, "crc32 is not a CRC-32"),
    "a list": (lambda h: [h], "does not have this format's fields"),
}


@pytest.mark.parametrize("case", [*HOSTILE, "length past the block", "deep nesting", "not utf-8", "not ours"])
def test_a_hostile_header_is_refused_before_any_pixel_is_read(data, case, monkeypatch):
    good = filled(data)
    path = path_of(data)
    if case in HOSTILE:
        edit, why = HOSTILE[case]
        with_header(path, edit(header_of(path)))
    elif case == "length past the block":
        with_header(path, raw=struct.pack("<I", 2**32 - 1) + b"{}")
        why = "its header claims 4294967295 bytes"
    elif case == "deep nesting":
        text = b"[" * 2000 + b"]" * 2000  # deeper than Python's recursion limit, within the block
        with_header(path, raw=struct.pack("<I", len(text)) + text)
        why = "its header is not readable JSON"
    elif case == "not utf-8":
        with_header(path, raw=struct.pack("<I", 4) + b"\xff\xfe{}")
        why = "its header is not readable JSON"
    else:
        path.write_bytes(b"PK\3\4" + path.read_bytes()[4:])
        why = "it is not a decoded-images file of this project"
    reads = []
    real = cache_file.read_exactly
    monkeypatch.setattr(cache_file, "read_exactly", lambda f, view: reads.append(len(view)) or real(f, view))
    again = filled(data)
    assert again.source == "decoded" and torch.equal(again.images, good.images)
    assert f"{path} was not used, as " in again.file_note and why in again.file_note
    assert reads == [], "no pixel is read from a file whose header does not match"
    assert filled(data).source == "loaded", "and it is replaced by a good one"


def test_a_link_or_a_fifo_is_not_followed(data, tmp_path):
    good = filled(data)
    outside = tmp_path / "elsewhere.u8"
    shutil.move(path_of(data), outside)  # a good file, outside the shard folder
    path_of(data).symlink_to(outside)
    again = filled(data)
    assert again.source == "decoded" and "it is a link, and links are not followed" in again.file_note
    assert not path_of(data).is_symlink() and torch.equal(again.images, good.images), "replaced, not written through"
    assert outside.read_bytes()[:len(MAGIC)] == MAGIC
    path_of(data).unlink()
    os.mkfifo(path_of(data))  # opening it for reading would wait for a writer forever
    assert "it is not a regular file" in filled(data).file_note


def test_no_room_or_no_right_to_write_means_no_file(data, monkeypatch):
    monkeypatch.setattr(cache_file.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 10**6))
    short = filled(data)
    assert short.source == "decoded" and not path_of(data).exists()
    assert short.file_note.startswith(f"{path_of(data)} not written: {data} has 0.00 GB free, and the file needs ")
    monkeypatch.undo()

    def read_only(path, data):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(cache_file, "atomic_write", read_only)
    refused = filled(data)
    assert refused.file_note == f"{path_of(data)} not written (Read-only file system: {path_of(data)})"
    assert not path_of(data).exists() and torch.equal(refused.images, short.images)


def test_a_killed_writers_old_temporary_is_removed_and_a_fresh_one_kept(data):
    old, fresh = (data / f".{path_of(data).name}.{name}{cache_file.TMP_SUFFIX}" for name in ("killed", "writing"))
    for tmp in (old, fresh):
        tmp.write_bytes(b"\0" * 1000)
    os.utime(old, (0, 0))
    elsewhere = data / f".{path_of(data, 'train').name}.killed{cache_file.TMP_SUFFIX}"  # another file's
    shutil.copy2(old, elsewhere)
    assert filled(data).file_note.startswith("wrote ")
    assert not old.exists() and fresh.exists() and elsewhere.exists()


# ----------------------------------------------------------------------------- two processes


def fill_at_once(rank, data, out):
    """Both processes decode, then each waits for the other before writing: the writes overlap."""
    real = cache_file.atomic_write

    def write_when_both_are_ready(path, write):
        (out / f"ready{rank}").touch()
        while not (out / f"ready{1 - rank}").exists():
            pass
        return real(path, write)
    cache_file.atomic_write = write_when_both_are_ready
    made = filled(data, split="train")
    torch.save({"images": made.images, "source": made.source, "note": made.file_note}, out / f"p{rank}.pt")


def test_two_processes_filling_at_once_leave_one_whole_correct_file(data, tmp_path):
    mp.spawn(fill_at_once, args=(data, tmp_path), nprocs=2)
    fresh = filled(data, split="train", mode="off")
    for rank in (0, 1):
        made = torch.load(tmp_path / f"p{rank}.pt")
        assert made["source"] == "decoded" and made["note"].startswith("wrote ")
        assert torch.equal(made["images"], fresh.images)
    loaded = filled(data, split="train")
    assert loaded.source == "loaded" and torch.equal(loaded.images, fresh.images)
    assert [p.name for p in data.iterdir() if p.name.startswith((".decoded", "decoded"))] == [path_of(data, "train").name]


def fill_in_a_group(rank, store, data, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for run in range(2):  # the first decodes and writes, the second loads
            made = build_loader("cache", data, "train", 4, "cpu", rank=rank, world_size=2, workers=0,
                                cache_file="auto").cache
            torch.save({"images": made.images, "source": made.source, "decoded": made.decoded},
                       out / f"run{run}rank{rank}.pt")
            dist.barrier()  # rank 0 has written the file
    finally:
        dist.destroy_process_group()


def test_ranks_write_once_after_the_exchange_and_all_load_it_later(data, tmp_path):
    mp.spawn(fill_in_a_group, args=(tmp_path / "store", data, tmp_path), nprocs=2)
    fresh = filled(data, split="train", mode="off")
    for run, source in enumerate(["decoded", "loaded"]):
        ranks = [torch.load(tmp_path / f"run{run}rank{r}.pt") for r in range(2)]
        assert [r["source"] for r in ranks] == [source, source]
        assert all(torch.equal(r["images"], fresh.images) for r in ranks)
        decoded = [r["decoded"] for r in ranks]
        assert (sum(decoded) == len(fresh) and all(decoded)) if source == "decoded" else decoded == [0, 0]
    assert path_of(data, "train").exists()


# ----------------------------------------------------------------------------- train.py


@pytest.mark.flag_effect("train.py", "--cache-file")
def test_train_says_whether_it_decoded_or_loaded_and_off_writes_no_file(data, tmp_path, capsys):
    flags = ["--data-path", str(data), "--batch-size", "32", "--workers", "0", "--no-compile", "--epochs", "1",
             "--cache", "on"]

    def loaders(*extra):  # train.py's own loaders and its lines about them, without training
        train.build_loaders(train.parse_args([*flags, *extra]), torch.device("cpu"), 0, 1, cached=("train", "val"))
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("cached ")]

    off = loaders("--cache-file", "off")
    assert off[0].startswith("cached train: 194 images in ") and "(decoded by the torch loader)" in off[0]
    assert not list(data.glob("decoded-*")), "--cache-file off writes nothing"
    assert train.main(train.parse_args([*flags, "--output-dir", str(tmp_path / "run")])) == 0  # the default: auto
    first = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cached ")]
    assert "(decoded by the torch loader)" in first[0] and f"wrote {path_of(data, 'train')} (" in first[0]
    second = loaders()
    assert [line.split(" (")[1].split(")")[0] for line in second] == ["loaded", "loaded"]
    assert second[0].endswith(f"; loaded from {path_of(data, 'train')}")
    assert all("(decoded by the torch loader)" in line for line in loaders("--cache-file", "off")), "nor reads it"
