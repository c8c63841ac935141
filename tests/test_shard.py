"""Tests of prep/shard.py: shards, DALI indexes, manifest, bad inputs, splits, resuming.

The session fixtures `faces_dir` (240 synthetic faces) and `shards` (their shards, 40 per shard,
split by key hash) come from conftest.py and are never modified here: tests that need another
folder copy files out of `faces_dir` into tmp_path.
"""

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from conftest import copy_shards
from pipeline.shards import MANIFEST, SPLITS
from prep import shard
from prep.synthetic import make_face

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 40  # as in conftest.py


def run_shard(data: Path, out: Path, *extra: str) -> int:
    return shard.main(["--data-path", str(data), "--output-dir", str(out),
                       "--workers", "2", "--quiet", *map(str, extra)])


def load(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def all_shards(manifest: dict):
    """(split, shard record) for every shard of the manifest."""
    return [(split, s) for split in SPLITS for s in manifest["splits"][split]["shards"]]


def tar_members(tar_path: Path) -> list[tuple[str, bytes]]:
    """(member name, contents) of every regular file, in stored order, read with Python's tarfile."""
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def wds_samples(tar_path: Path) -> list[dict]:
    return list(wds.WebDataset([str(tar_path)], shardshuffle=False))


def keys_by_split(out: Path) -> dict[str, list[str]]:
    manifest = load(out)
    return {split: [s["__key__"] for rec in manifest["splits"][split]["shards"]
                    for s in wds.tarfile_samples([{"url": str(out / rec["tar"])}])]
            for split in SPLITS}


def copy_faces(faces_dir: Path, dest: Path, n: int) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(faces_dir.glob("*.jpg"))[:n]
    assert len(files) == n
    for f in files:
        shutil.copy2(f, dest / f.name)
    return [dest / f.name for f in files]


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, mtime_ns, size) of every file in the folder."""
    return {p.name: (st.st_ino, st.st_mtime_ns, st.st_size)
            for p in sorted(folder.iterdir()) for st in [p.stat()]}


# ---------------------------------------------------------------------------- 1. shards readable and complete
@pytest.mark.flag_effect("prep/shard.py", "--data-path")
def test_every_reader_sees_every_sample_with_the_manifest_counts(faces_dir, shards):
    manifest = load(shards)
    records = all_shards(manifest)
    assert records, "the manifest lists no shards"
    seen_keys = []
    for split, rec in records:
        tar_path = shards / rec["tar"]
        n = rec["num_samples"]
        assert 0 < n <= SHARD_SIZE
        # webdataset
        samples = wds_samples(tar_path)
        assert len(samples) == n, f"webdataset reads {len(samples)} samples from {rec['tar']}, manifest says {n}"
        assert all(set(s) >= {"__key__", "jpg"} for s in samples)
        # Python's tarfile: exactly one .jpg member per sample
        members = tar_members(tar_path)
        assert len(members) == n
        assert all(name.endswith(".jpg") for name, _ in members)
        # GNU tar
        listed = subprocess.run(["tar", "-tf", str(tar_path)], capture_output=True, text=True, check=True)
        names = listed.stdout.split()
        assert names == [name for name, _ in members]
        # the three readers agree on the keys and the bytes
        assert [s["__key__"] for s in samples] == [name.split(".", 1)[0] for name, _ in members]
        assert [bytes(s["jpg"]) for s in samples] == [data for _, data in members]
        seen_keys += [s["__key__"] for s in samples]

    for split in SPLITS:
        entry = manifest["splits"][split]
        assert entry["num_samples"] == sum(rec["num_samples"] for rec in entry["shards"])
        assert entry["num_samples"] == sum(len(wds_samples(shards / rec["tar"])) for rec in entry["shards"])
    assert len(seen_keys) == len(set(seen_keys)), "a key is stored twice"
    assert sorted(seen_keys) == sorted(p.stem for p in faces_dir.glob("*.jpg")), "keys lost or invented"


def test_baseline_rgb_jpegs_are_stored_byte_for_byte(faces_dir, shards):
    checked = 0
    for _, rec in all_shards(load(shards)):
        for name, data in tar_members(shards / rec["tar"]):
            key = name.split(".", 1)[0]
            assert data == (faces_dir / f"{key}.jpg").read_bytes(), f"{name} differs from the input file"
            checked += 1
    assert checked == len(list(faces_dir.glob("*.jpg")))


# ---------------------------------------------------------------------------- 2. DALI index files
def test_idx_files_equal_what_dali_wds2idx_writes(shards, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    assert shutil.which("tar"), "GNU tar is needed for wds2idx's own path"
    for _, rec in all_shards(load(shards)):
        theirs = tmp_path / rec["idx"]
        with wds2idx.IndexCreator(str(shards / rec["tar"]), str(theirs), verbose=False) as creator:
            creator.create_index()
        ours = (shards / rec["idx"]).read_text()
        assert ours == theirs.read_text(), f"{rec['idx']} differs from DALI's wds2idx output"


def test_idx_offsets_and_sizes_point_at_the_member_contents(shards):
    for _, rec in all_shards(load(shards)):
        tar_bytes = (shards / rec["tar"]).read_bytes()
        members = dict(tar_members(shards / rec["tar"]))
        lines = (shards / rec["idx"]).read_text().splitlines()
        version, count = lines[0].split()
        assert version == "v1.2"
        assert int(count) == len(lines) - 1 == rec["num_samples"]
        seen = []
        for line in lines[1:]:
            fields = line.split()
            assert len(fields) % 4 == 0 and fields, f"malformed index line {line!r}"
            for i in range(0, len(fields), 4):
                ext, offset, size, name = fields[i:i + 4]
                offset, size = int(offset), int(size)
                assert offset % 512 == 0
                assert name.split(".", 1)[1] == ext
                assert tar_bytes[offset:offset + size] == members[name], f"{rec['idx']}: {name} points elsewhere"
                seen.append(name)
        assert seen == list(members), "the index does not list every member once, in order"


# ---------------------------------------------------------------------------- 3. manifest
@pytest.mark.flag_effect("prep/shard.py", "--shard-size")
def test_manifest_records_counts_sizes_checksums_and_options(faces_dir, shards):
    manifest = load(shards)
    assert manifest["format"] == "webdataset"
    attributes = hashlib.sha256((faces_dir.parent / "list_attr_celeba.txt").read_bytes()).hexdigest()
    assert manifest["options"] == {"shard_size": SHARD_SIZE, "seed": 0, "quality": 95, "split_source": "key hash",
                                   "attributes": attributes}  # the synthetic faces' attribute file
    assert manifest["skipped"] == [] and manifest["reencoded"] == []
    assert manifest["source"] == str(faces_dir.resolve())
    n = len(list(faces_dir.glob("*.jpg")))
    assert manifest["num_samples"] == sum(manifest["splits"][s]["num_samples"] for s in SPLITS) == n
    for split, rec in all_shards(manifest):
        tar_path, idx_path = shards / rec["tar"], shards / rec["idx"]
        assert rec["name"].startswith(f"{split}-") and rec["tar"] == f"{rec['name']}.tar"
        assert idx_path.is_file() and rec["idx"] == f"{rec['name']}.idx"
        assert rec["bytes"] == tar_path.stat().st_size
        assert rec["sha256"] == hashlib.sha256(tar_path.read_bytes()).hexdigest()
    # all shards but the last of each split are full
    for split in SPLITS:
        counts = [rec["num_samples"] for rec in manifest["splits"][split]["shards"]]
        assert all(c == SHARD_SIZE for c in counts[:-1])
    # no leftovers of the writing process
    assert not list(shards.glob("*.tmp")) and not (shards / shard.JOURNAL).exists()


def test_hash_split_follows_celeba_proportions(shards):
    manifest = load(shards)
    total = manifest["num_samples"]
    share = {s: manifest["splits"][s]["num_samples"] / total for s in SPLITS}
    # CelebA: 80.6 % / 9.8 % / 9.9 %; loose bounds for 240 images
    assert 0.7 <= share["train"] <= 0.9, share
    assert 0.03 <= share["val"] <= 0.18, share
    assert 0.03 <= share["test"] <= 0.18, share


def test_sharding_is_deterministic(faces_dir, shards, tmp_path):
    out = tmp_path / "again"
    assert run_shard(faces_dir, out, "--shard-size", SHARD_SIZE) == 0
    first, second = load(shards), load(out)
    assert first["plan"] == second["plan"]
    assert keys_by_split(shards) == keys_by_split(out)
    assert [(s, r["name"], r["sha256"]) for s, r in all_shards(first)] == \
           [(s, r["name"], r["sha256"]) for s, r in all_shards(second)]
    for _, rec in all_shards(first):
        assert (shards / rec["tar"]).read_bytes() == (out / rec["tar"]).read_bytes()
        assert (shards / rec["idx"]).read_bytes() == (out / rec["idx"]).read_bytes()


# Computed once with the SHA-1 split: a key's split is the same in every process and on every machine.
KNOWN_SPLITS = {"000001": "train", "000002": "train", "000003": "train", "000014": "test", "000017": "val",
                "000020": "test", "000022": "val", "000034": "test", "000042": "val", "000053": "val",
                "000079": "test", "000080": "test", "202599": "train", "face_ü": "val", "celeba_202599": "test"}


def test_hash_split_of_a_key_is_fixed():
    assert {key: shard.hash_split(key) for key in KNOWN_SPLITS} == KNOWN_SPLITS


def test_hash_split_of_a_key_does_not_depend_on_the_other_files(faces_dir, shards, tmp_path):
    # Half the files: every remaining key keeps the split it had among all 240.
    data = tmp_path / "img_align_celeba"
    copy_faces(faces_dir, data, 120)
    assert run_shard(data, tmp_path / "out", "--shard-size", SHARD_SIZE) == 0
    full = {k: s for s, ks in keys_by_split(shards).items() for k in ks}
    half = {k: s for s, ks in keys_by_split(tmp_path / "out").items() for k in ks}
    assert len(half) == 120
    assert all(full[k] == s for k, s in half.items())


# ---------------------------------------------------------------------------- 4. official split
def make_partition_folder(faces_dir, tmp_path, n_listed=30, extra=1):
    data = tmp_path / "celeba" / "img_align_celeba"
    files = copy_faces(faces_dir, data, n_listed + extra)
    listed = files[:n_listed]
    expected = {"train": [p.stem for p in listed[:20]], "val": [p.stem for p in listed[20:25]],
                "test": [p.stem for p in listed[25:]]}
    lines = [f"{p.name} {0 if i < 20 else 1 if i < 25 else 2}" for i, p in enumerate(listed)]
    partition = data.parent / shard.PARTITION_FILE
    partition.write_text("\n".join(lines) + "\n")
    return data, partition, expected, files[n_listed:]


@pytest.mark.flag_effect("prep/shard.py", "--partition-file")
def test_official_partition_file_decides_the_splits(faces_dir, tmp_path):
    data, partition, expected, unlisted = make_partition_folder(faces_dir, tmp_path)
    out = tmp_path / "out"
    assert run_shard(data, out, "--shard-size", 8) == 0  # found beside the data folder by default
    manifest = load(out)
    digest = hashlib.sha256(partition.read_bytes()).hexdigest()
    assert manifest["options"]["split_source"] == f"{shard.PARTITION_FILE} sha256:{digest}"  # its contents, not its path
    assert manifest["partition_file"] == str(partition.resolve())
    got = keys_by_split(out)
    assert {s: sorted(got[s]) for s in SPLITS} == {s: sorted(expected[s]) for s in SPLITS}
    assert {s: manifest["splits"][s]["num_samples"] for s in SPLITS} == {"train": 20, "val": 5, "test": 5}
    assert [e["file"] for e in manifest["skipped"]] == [p.name for p in unlisted]
    assert all(shard.PARTITION_FILE in e["reason"] for e in manifest["skipped"])
    assert manifest["reencoded"] == []


@pytest.mark.flag_effect("prep/shard.py", "--partition-file")
def test_explicit_partition_file_option(faces_dir, tmp_path):
    data, partition, expected, _ = make_partition_folder(faces_dir, tmp_path)
    moved = tmp_path / "elsewhere.txt"
    partition.rename(moved)
    out = tmp_path / "out"
    assert run_shard(data, out, "--partition-file", moved) == 0
    assert load(out)["options"]["split_source"].endswith(hashlib.sha256(moved.read_bytes()).hexdigest())
    assert load(out)["partition_file"] == str(moved.resolve())
    got = keys_by_split(out)
    assert {s: sorted(got[s]) for s in SPLITS} == {s: sorted(expected[s]) for s in SPLITS}


@pytest.mark.parametrize("bad_line", ["000003.jpg 7", "000003.jpg", "000003.jpg 0 extra"])
def test_malformed_partition_line_names_file_and_line(faces_dir, tmp_path, capsys, bad_line):
    data, partition, _, _ = make_partition_folder(faces_dir, tmp_path)
    lines = partition.read_text().splitlines()
    lines[2] = bad_line
    partition.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        run_shard(data, out)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "error:" in err and str(partition) in err and "line 3" in err, err
    assert not (out / MANIFEST).exists()


def test_files_with_the_same_stem_are_stored_once(faces_dir, tmp_path):
    data = tmp_path / "img_align_celeba"
    copy_faces(faces_dir, data, 6)
    shutil.copy(data / "000001.jpg", data / "000001.png")  # same key as 000001.jpg
    shutil.copy(data / "000002.jpg", data / "000002.JPEG")
    out = tmp_path / "out"
    assert run_shard(data, out) == 0
    manifest = load(out)
    keys = [k for ks in keys_by_split(out).values() for k in ks]
    assert sorted(keys) == [f"{i:06d}" for i in range(1, 7)]
    assert sorted(e["file"] for e in manifest["skipped"]) == ["000001.png", "000002.jpg"]
    assert all("duplicate" in e["reason"] for e in manifest["skipped"])


# ---------------------------------------------------------------------------- 5. bad inputs
def make_bad_folder(faces_dir, tmp_path):
    data = tmp_path / "img_align_celeba"
    good = copy_faces(faces_dir, data, 8)
    src = make_face(7, 1000)
    jpeg = io.BytesIO()
    src.save(jpeg, "JPEG", quality=90)
    (data / "bad_empty.jpg").write_bytes(b"")
    (data / "bad_truncated.jpg").write_bytes(jpeg.getvalue()[:int(len(jpeg.getvalue()) * 0.4)])
    (data / "bad_text.jpg").write_text("not an image\n")
    src.convert("L").save(data / "odd_gray.jpg", "JPEG", quality=90)
    src.convert("CMYK").save(data / "odd_cmyk.jpg", "JPEG", quality=90)
    src.save(data / "odd_png.jpg", "PNG")
    src.save(data / "odd_progressive.jpg", "JPEG", quality=90, progressive=True)
    # sanity of the fixtures themselves
    with Image.open(data / "odd_progressive.jpg") as im:
        assert im.info.get("progressive")
    with Image.open(data / "odd_cmyk.jpg") as im:
        assert im.mode == "CMYK"
    bad = ["bad_empty.jpg", "bad_truncated.jpg", "bad_text.jpg"]
    odd = ["odd_cmyk.jpg", "odd_gray.jpg", "odd_png.jpg", "odd_progressive.jpg"]
    return data, [p.name for p in good], bad, odd


def test_bad_files_are_skipped_and_odd_ones_reencoded(faces_dir, tmp_path):
    data, good, bad, odd = make_bad_folder(faces_dir, tmp_path)
    out = tmp_path / "out"
    assert run_shard(data, out, "--shard-size", 4) == 0
    manifest = load(out)

    skipped = {e["file"]: e["reason"] for e in manifest["skipped"]}
    assert sorted(skipped) == sorted(bad)
    assert all(reason for reason in skipped.values())
    assert "empty" in skipped["bad_empty.jpg"]

    reencoded = {e["file"]: e["reason"] for e in manifest["reencoded"]}
    assert sorted(reencoded) == sorted(odd)
    assert "CMYK" in reencoded["odd_cmyk.jpg"]
    assert "mode L" in reencoded["odd_gray.jpg"]
    assert "PNG" in reencoded["odd_png.jpg"]
    assert "progressive" in reencoded["odd_progressive.jpg"]

    stored = {}
    for _, rec in all_shards(manifest):
        for name, blob in tar_members(out / rec["tar"]):
            stored[name.split(".", 1)[0]] = blob
    assert manifest["num_samples"] == len(stored) == len(good) + len(odd)
    assert sorted(stored) == sorted(Path(f).stem for f in good + odd)
    for name in odd:
        with Image.open(data / name) as source:
            size = source.size
        im = Image.open(io.BytesIO(stored[Path(name).stem]))
        im.load()
        assert im.format == "JPEG" and im.mode == "RGB", (name, im.format, im.mode)
        assert not im.info.get("progressive") and not im.info.get("progression"), name
        assert im.size == size, name
    for name in good:
        assert stored[Path(name).stem] == (data / name).read_bytes()


# ---------------------------------------------------------------------------- 6. missing or empty input
def test_missing_folder_exits_nonzero_with_instructions(tmp_path):
    missing = tmp_path / "nowhere" / "img_align_celeba"
    proc = subprocess.run([sys.executable, "prep/shard.py", "--data-path", str(missing), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and str(missing) in proc.stderr
    assert "CelebA" in proc.stderr and "img_align_celeba" in proc.stderr and "--synthetic" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (missing.parent / "shards").exists()


def test_empty_folder_exits_nonzero_with_instructions(tmp_path, capsys):
    data = tmp_path / "img_align_celeba"
    data.mkdir()
    (data / "readme.txt").write_text("no images here")
    (data / ".hidden.jpg").write_bytes(b"x")
    with pytest.raises(SystemExit) as exc:
        run_shard(data, tmp_path / "out")
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "error:" in err and str(data) in err
    assert "CelebA" in err and "--synthetic" in err


# ---------------------------------------------------------------------------- 7. atomic and resumable
def interrupt_on_call(monkeypatch, n: int):
    """Make the n-th ShardWriter.finish raise KeyboardInterrupt instead of finishing, with worker tasks
    still in flight: the pool must stop without waiting for the rest of the job."""
    original, calls = shard.ShardWriter.finish, []

    def finish(self):
        calls.append(self.name)
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(shard.ShardWriter, "finish", finish)
    return calls


def test_interrupted_run_resumes_without_redoing_finished_shards(faces_dir, shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ("--shard-size", SHARD_SIZE)
    with monkeypatch.context() as m:
        calls = interrupt_on_call(m, 3)
        with pytest.raises(KeyboardInterrupt):
            run_shard(faces_dir, out, *args)
    assert len(calls) == 3
    assert not (out / MANIFEST).exists(), "a manifest exists before the run finished"
    tars = sorted(out.glob("*.tar"))
    assert [t.stem for t in tars] == calls[:2], "only the shards finished before the interruption are on disk"
    for t in tars:
        assert t.with_suffix(".idx").is_file(), f"{t.name} has no index"
    before = {t.name: (t.stat().st_ino, t.stat().st_mtime_ns) for t in tars}

    assert run_shard(faces_dir, out, *args) == 0
    after = {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in before}
    assert after == before, "shards finished before the interruption were rewritten"
    assert not list(out.glob("*.tmp")) and not (out / shard.JOURNAL).exists()

    resumed, reference = load(out), load(shards)
    assert resumed["plan"] == reference["plan"]
    assert resumed["num_samples"] == reference["num_samples"]
    assert [(s, r["name"], r["num_samples"], r["sha256"]) for s, r in all_shards(resumed)] == \
           [(s, r["name"], r["num_samples"], r["sha256"]) for s, r in all_shards(reference)]
    for _, rec in all_shards(resumed):
        assert hashlib.sha256((out / rec["tar"]).read_bytes()).hexdigest() == rec["sha256"]
    assert resumed["skipped"] == [] and resumed["reencoded"] == []

    # a third run has nothing to do and touches nothing
    capsys.readouterr()
    state = snapshot(out)
    assert run_shard(faces_dir, out, *args) == 0
    assert "up to date" in capsys.readouterr().out
    assert snapshot(out) == state

    # other options into the same folder: refused without --overwrite ...
    with pytest.raises(SystemExit) as exc:
        run_shard(faces_dir, out, "--shard-size", 60)
    assert exc.value.code not in (0, None)
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == state
    # ... and done with it
    assert run_shard(faces_dir, out, "--shard-size", 60, "--overwrite") == 0
    replaced = load(out)
    assert replaced["options"]["shard_size"] == 60
    assert replaced["num_samples"] == reference["num_samples"]
    assert all(r["num_samples"] <= 60 for _, r in all_shards(replaced))
    assert sorted(k for ks in keys_by_split(out).values() for k in ks) == sorted(p.stem for p in faces_dir.glob("*.jpg"))


def test_unfinished_run_of_other_options_needs_overwrite(faces_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "img_align_celeba"
    copy_faces(faces_dir, data, 40)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_on_call(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run_shard(data, out, "--shard-size", 10)
    assert (out / shard.JOURNAL).is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_shard(data, out, "--shard-size", 7)
    assert "--overwrite" in capsys.readouterr().err
    assert run_shard(data, out, "--shard-size", 7, "--overwrite") == 0
    manifest = load(out)
    assert manifest["options"]["shard_size"] == 7 and manifest["num_samples"] == 40


# ---------------------------------------------------------------------------- 8. --synthetic end to end
@pytest.mark.flag_effect("prep/shard.py", "--synthetic")
def test_synthetic_option_makes_faces_then_shards(tmp_path):
    data = tmp_path / "img_align_celeba"
    assert shard.main(["--synthetic", "30", "--data-path", str(data), "--shard-size", "8",
                       "--workers", "2", "--quiet"]) == 0
    assert sorted(p.name for p in data.iterdir()) == [f"{i:06d}.jpg" for i in range(1, 31)]
    for p in data.iterdir():
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (178, 218))
    out = tmp_path / "shards"  # the default: beside the data folder
    manifest = load(out)
    assert manifest["num_samples"] == 30
    assert manifest["skipped"] == [] and manifest["reencoded"] == []
    assert sorted(k for ks in keys_by_split(out).values() for k in ks) == [f"{i:06d}" for i in range(1, 31)]


# ---------------------------------------------------------------------------- resuming, replacing, partition files
def test_resume_after_a_shard_of_only_bad_files(faces_dir, tmp_path, monkeypatch):
    """A shard whose every file is undecodable is journalled with no tar; resuming must cope."""
    data = tmp_path / "celeba" / "img_align_celeba"
    copy_faces(faces_dir, data, 4)
    (data / "broken.jpg").write_bytes(b"")
    (data.parent / shard.PARTITION_FILE).write_text(
        "000001.jpg 0\n000002.jpg 0\n000003.jpg 0\nbroken.jpg 1\n000004.jpg 2\n")
    out = tmp_path / "out"
    # plan: train-000000 (3 good), val-000000 (only broken.jpg: no tar, no finish), test-000000
    with monkeypatch.context() as m:
        calls = interrupt_on_call(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run_shard(data, out)
    assert calls == ["train-000000", "test-000000"]
    assert not list(out.glob("val-*.tar"))
    assert run_shard(data, out) == 0
    manifest = load(out)
    assert manifest["num_samples"] == 4
    assert [e["file"] for e in manifest["skipped"]] == ["broken.jpg"]
    assert manifest["splits"]["val"]["shards"] == []


@pytest.mark.flag_effect("prep/shard.py", "--overwrite")
def test_overwrite_leaves_no_shards_of_the_old_run(faces_dir, tmp_path):
    """--overwrite replaces the earlier shards: surplus ones would be read by anything globbing `train-*.tar`."""
    data = tmp_path / "img_align_celeba"
    copy_faces(faces_dir, data, 40)
    out = tmp_path / "out"
    assert run_shard(data, out, "--shard-size", 5) == 0
    assert run_shard(data, out, "--shard-size", 20, "--overwrite") == 0
    listed = {r[key] for _, r in all_shards(load(out)) for key in ("tar", "idx")}
    on_disk = {p.name for p in out.iterdir() if p.suffix in (".tar", ".idx")}
    assert on_disk == listed, f"--overwrite left the old run's shards {sorted(on_disk - listed)}"


def test_missing_partition_file_is_a_user_error(faces_dir, tmp_path, capsys):
    """A --partition-file that does not exist ends with `error: ...` and status 2, no traceback."""
    data = tmp_path / "img_align_celeba"
    copy_faces(faces_dir, data, 3)
    missing = tmp_path / "no_such_partition.txt"
    with pytest.raises(SystemExit) as exc:
        run_shard(data, tmp_path / "out", "--partition-file", missing)
    assert exc.value.code == 2
    assert str(missing) in capsys.readouterr().err


def test_empty_partition_file_is_refused(faces_dir, tmp_path, capsys):
    """An empty partition file would skip every image as unlisted; it is refused with the file named."""
    data = tmp_path / "celeba" / "img_align_celeba"
    copy_faces(faces_dir, data, 3)
    partition = data.parent / shard.PARTITION_FILE
    partition.write_text("\n")
    with pytest.raises(SystemExit) as exc:
        run_shard(data, tmp_path / "out")
    assert exc.value.code == 2
    assert str(partition) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_partition_file_of_other_images_is_refused(faces_dir, tmp_path, capsys):
    """When no image of the folder is listed, nothing is written and the message says why."""
    data = tmp_path / "celeba" / "img_align_celeba"
    copy_faces(faces_dir, data, 3)
    (data.parent / shard.PARTITION_FILE).write_text("999998.jpg 0\n999999.jpg 1\n")
    with pytest.raises(SystemExit) as exc:
        run_shard(data, tmp_path / "out")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "not listed" in err and str(data) in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- verifying and repairing


@pytest.mark.flag_effect("prep/shard.py", "--verify")
def test_damaged_shards_are_found_and_only_they_are_rebuilt(faces_dir, shards, tmp_path, capsys):
    out = copy_shards(shards, tmp_path / "shards")
    names = [r["name"] for _, r in all_shards(load(shards))]
    truncated, deleted, no_index, flipped = names[:4]
    os.truncate(out / f"{truncated}.tar", 5000)
    (out / f"{deleted}.tar").unlink()
    (out / f"{no_index}.idx").unlink()
    with open(out / f"{flipped}.tar", "r+b") as f:  # same size: only the checksum can tell
        f.seek(3000)
        f.write(b"\xff" * 64)
    untouched = {n: snapshot(out)[f"{n}.tar"] for n in names[4:]}
    capsys.readouterr()

    # Without --verify: what a stat and the index header show, and nothing else is touched.
    assert run_shard(faces_dir, out, "--shard-size", SHARD_SIZE) == 0
    said = capsys.readouterr().out
    assert f"rebuilding 3 of {len(names)} shards" in said
    assert f"{truncated} (5000 bytes where the manifest records" in said and f"{deleted} (missing)" in said
    assert f"{no_index} (its index {no_index}.idx is missing)" in said and flipped not in said
    assert {n: snapshot(out)[f"{n}.tar"] for n in names[4:]} == untouched
    for name in (truncated, deleted, no_index):
        assert (out / f"{name}.tar").read_bytes() == (shards / f"{name}.tar").read_bytes()
        assert (out / f"{name}.idx").read_bytes() == (shards / f"{name}.idx").read_bytes()

    # --verify: the checksums find the flipped bytes.
    assert run_shard(faces_dir, out, "--shard-size", SHARD_SIZE, "--verify") == 0
    assert f"rebuilding 1 of {len(names)} shards" in capsys.readouterr().out
    assert (out / f"{flipped}.tar").read_bytes() == (shards / f"{flipped}.tar").read_bytes()
    assert load(out)["splits"] == load(shards)["splits"]
    assert not list(out.glob("*.tmp")) and not (out / shard.JOURNAL).exists()
    assert run_shard(faces_dir, out, "--shard-size", SHARD_SIZE, "--verify") == 0
    assert "up to date" in capsys.readouterr().out


def test_the_loaders_hint_names_the_command_that_repairs(faces_dir, shards, tmp_path):
    from pipeline import DataError, build_loader
    out = copy_shards(shards, tmp_path / "shards")
    name = all_shards(load(shards))[0][1]["name"]
    os.truncate(out / f"{name}.tar", 5000)
    with pytest.raises(DataError) as caught:
        build_loader("torch", out, name.split("-")[0], 8, "cpu", workers=0)
    message = str(caught.value)
    assert "\n" not in message and "5000 bytes but the manifest says" in message
    command = re.search(r"run `python (prep/shard\.py [^`]+)` to rebuild", message).group(1)
    argv = shlex.split(command)[1:]
    assert argv[:2] == ["--data-path", str(faces_dir.resolve())] and "--verify" in argv
    assert shard.main(argv + ["--quiet"]) == 0
    assert (out / f"{name}.tar").read_bytes() == (shards / f"{name}.tar").read_bytes()


def test_the_printed_repair_command_works_verbatim_in_the_default_celeba_layout(faces_dir, tmp_path):
    """dataset/celeba/img_align_celeba with list_eval_partition.txt beside it, sharded by a bare
    `python prep/shard.py` from the checkout's root: the line a loader prints for a damaged shard,
    split as a shell splits it and run from there, repairs it."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "prep").symlink_to(ROOT / "prep")  # the script runs from a checkout of its own
    make_partition_folder(faces_dir, checkout / "dataset")
    made = subprocess.run([sys.executable, "prep/shard.py", "--shard-size", "8", "--workers", "2", "--quiet"],
                          cwd=checkout, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    out = checkout / "dataset" / "celeba" / "shards"
    assert load(out)["num_samples"] == 30
    name = all_shards(load(out))[0][1]["name"]
    original = (out / f"{name}.tar").read_bytes()
    os.truncate(out / f"{name}.tar", 3000)
    from pipeline import DataError, build_loader
    with pytest.raises(DataError) as caught:
        build_loader("torch", out, name.split("-")[0], 8, "cpu", workers=0)
    command = re.search(r"run `([^`]+)` to rebuild", str(caught.value)).group(1)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "prep/shard.py"]
    repaired = subprocess.run([sys.executable, *argv[1:]], cwd=checkout, capture_output=True, text=True, timeout=300)
    assert repaired.returncode == 0, repaired.stderr
    assert "rebuilt 1 shard" in repaired.stdout
    assert (out / f"{name}.tar").read_bytes() == original


@pytest.mark.flag_effect("prep/shard.py", "--overwrite")
def test_overwrite_rebuilds_every_shard(faces_dir, tmp_path):
    data = tmp_path / "img_align_celeba"
    copy_faces(faces_dir, data, 40)
    out = tmp_path / "out"
    assert run_shard(data, out, "--shard-size", 10) == 0
    before = snapshot(out)
    assert run_shard(data, out, "--shard-size", 10, "--overwrite") == 0
    after = snapshot(out)
    tars = [n for n in before if n.endswith(".tar")]
    # (inode, mtime): a freed inode can be reused by the file that replaces it
    assert tars and all(after[n][:2] != before[n][:2] for n in tars), "a shard was not written again"
    assert all(after[n][2] == before[n][2] for n in tars)


@pytest.mark.parametrize("manifest", ['{"plan": "cut short', '{"name": "another project", "splits": []}',
                                      '{"plan": "x", "splits": {"train": {"shards": [{"tar": "../train-000000.tar", '
                                      '"idx": "train-000000.idx", "num_samples": 1}]}, "val": {}, "test": {}}}'],
                         ids=["unreadable", "foreign", "escaping"])
def test_an_unusable_manifest_keeps_the_shards_unless_overwrite(faces_dir, tmp_path, capsys, manifest):
    """A manifest prep/shard.py cannot use may be another tool's: its folder is left untouched, in one line
    saying what to do; --overwrite makes every shard again."""
    data = tmp_path / "img_align_celeba"
    copy_faces(faces_dir, data, 20)
    out = tmp_path / "out"
    assert run_shard(data, out, "--shard-size", 10) == 0
    reference = load(out)
    (out / MANIFEST).write_text(manifest)
    (out / "notes.txt").write_text("someone else's")
    state = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_shard(data, out, "--shard-size", 10)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith(f"error: {out / MANIFEST} ") and "--overwrite" in captured.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == state, "shards were changed without --overwrite"
    assert run_shard(data, out, "--shard-size", 10, "--overwrite") == 0
    assert load(out)["splits"] == reference["splits"]
    assert (out / "notes.txt").read_text() == "someone else's"


def test_an_unusable_output_dir_is_one_line_and_creates_nothing(faces_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "shards"):
        with pytest.raises(SystemExit) as exc:
            run_shard(faces_dir, out)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err == f"error: --output-dir {out}: {a_file} is a file, not a folder; choose another folder\n"
    # --synthetic writes into --data-path: checked before a face is drawn.
    with pytest.raises(SystemExit):
        shard.main(["--synthetic", "5", "--data-path", str(a_file / "faces"), "--output-dir", str(tmp_path / "out")])
    assert "--data-path" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


SLOW_SHARD = """
import sys, time
sys.path.insert(0, {root!r})
from prep import shard
check_image = shard.check_image
def slow(job):  # the worker processes fork from here, and see this
    time.sleep(0.05)
    return check_image(job)
shard.check_image = slow
sys.exit(shard.run(sys.argv[1:]))
"""


def test_ctrl_c_stops_promptly_and_the_same_command_finishes(faces_dir, shards, tmp_path):
    out = tmp_path / "out"
    argv = ["--data-path", str(faces_dir), "--output-dir", str(out), "--shard-size", str(SHARD_SIZE),
            "--workers", "2", "--quiet"]
    # Its own session: the signal goes to the script and its workers, as Ctrl-C in a terminal does.
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SHARD.format(root=str(ROOT)), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("prep/shard.py hung after Ctrl-C")
    assert proc.returncode == 130
    assert err.strip() == "interrupted: finished shards are kept; run the same command again to finish the job"
    kept = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    assert kept and not (out / MANIFEST).exists()
    assert shard.main(argv) == 0
    assert {name: (out / name).stat().st_ino for name in kept} == kept
    assert load(out)["splits"] == load(shards)["splits"]
