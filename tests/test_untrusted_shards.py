"""Shard folders come from other people: a manifest is data, never a command or a path elsewhere.

Each case is provoked for real: a manifest entry that webdataset would run in a shell, absolute and
`..` entries, URLs, a shard that is a link out of its folder. Each ends in one line naming the entry,
exit code 1 from train.py, nothing run and nothing changed. File names that a DALI index line cannot
hold go through prep/shard.py and load in every loader.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import train
from conftest import copy_shards
from pipeline import ALL_LOADERS, DataError, build_loader
from pipeline.shards import MANIFEST, Shard, Span, split_shards
from pipeline.torch_loader import read_spans
from prep import shard

PWNED = "PWNED"
PIPE_ENTRY = f"pipe:touch {PWNED}; cat train-000000.tar"


def snapshot(folder: Path) -> dict:
    """relative path -> SHA-256 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").split("\n") if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def hostile_copy(tiny: Path, dest: Path, field: str, entry: str) -> Path:
    """A copy of `tiny` whose manifest names its first training shard's `field` as `entry`."""
    copy_shards(tiny, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][0][field] = entry
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


def test_a_pipe_entry_runs_nothing(tiny, tmp_path, monkeypatch, capsys):
    """webdataset opens `pipe:` URLs with a shell: with --data-path . and a file of that very name beside
    the manifest, such an entry once trained normally and created PWNED."""
    shards = hostile_copy(tiny, tmp_path / "shards", "tar", PIPE_ENTRY)
    shutil.copy(shards / "train-000000.tar", shards / PIPE_ENTRY)  # the file the entry names, if read as a name
    monkeypatch.chdir(shards)
    before = snapshot(tmp_path)
    assert train.run(["--data-path", ".", "--output-dir", str(tmp_path / "out"), "--epochs", "1",
                      "--batch-size", "8", "--workers", "1", "--no-compile"]) == 1
    line = error_line(capsys.readouterr().err)
    assert repr(PIPE_ENTRY) in line and "not a plain file name" in line and "prep/shard.py" in line
    assert not list(tmp_path.rglob(PWNED)), "the manifest entry ran a command"
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_the_torch_loader_hands_webdataset_an_open_file_not_a_url(tiny, tmp_path, monkeypatch):
    """Below the manifest check: a shard whose file name looks like a `pipe:` URL is read as a file."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny / "train-000000.tar", tmp_path / PIPE_ENTRY)
    n = json.loads((tiny / MANIFEST).read_text())["splits"]["train"]["shards"][0]["num_samples"]
    samples = list(read_spans([Span(Shard(Path(PIPE_ENTRY), Path("unused.idx"), n), 0, n)]))
    assert len(samples) == n and all(sample["jpg"] for sample in samples)
    assert not (tmp_path / PWNED).exists()


@pytest.mark.parametrize("field", ["tar", "idx"])
@pytest.mark.parametrize("entry", ["ABSOLUTE", "../outside/train-000000.tar", "sub/train-000000.tar",
                                   "http://example.com/train-000000.tar", "..", ""])
def test_entries_that_are_not_plain_file_names_are_refused_in_one_line(tiny, tmp_path, capsys, field, entry):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tiny / "train-000000.tar", outside / "train-000000.tar")
    shutil.copy(tiny / "train-000000.idx", outside / "train-000000.idx")
    if entry == "ABSOLUTE":
        entry = str(outside / f"train-000000.{field}")
    shards = hostile_copy(tiny, tmp_path / "shards", field, entry)
    before = snapshot(tmp_path)
    for name in ALL_LOADERS:
        with pytest.raises(DataError) as caught:
            build_loader(name, shards, "train", 8, "cpu", workers=0)
        message = str(caught.value)
        assert "\n" not in message and repr(entry) in message and "not a plain file name" in message, message
    assert train.run(["--data-path", str(shards), "--output-dir", str(tmp_path / "out"), "--epochs", "1",
                      "--batch-size", "8", "--workers", "1", "--no-compile"]) == 1
    assert repr(entry) in error_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_shard_linked_out_of_its_folder_is_refused(tiny, tmp_path):
    outside = tmp_path / "outside.tar"
    shutil.copy(tiny / "train-000000.tar", outside)
    shards = copy_shards(tiny, tmp_path / "shards")
    (shards / "train-000000.tar").unlink()
    (shards / "train-000000.tar").symlink_to(outside)
    with pytest.raises(DataError, match=r"train-000000\.tar is a link to .*outside\.tar, outside the shard folder"):
        split_shards(shards, "train")
    # A link to the whole folder is fine: every shard resolves inside the folder it names.
    (tmp_path / "linked").symlink_to(tiny)
    assert [s.tar for s in split_shards(tmp_path / "linked", "train")] == [s.tar for s in split_shards(tiny, "train")]


def test_rebuild_flags_from_the_manifest_are_only_plan_flags(tiny, tmp_path):
    shards = copy_shards(tiny, tmp_path / "shards")
    manifest = json.loads((shards / MANIFEST).read_text())
    manifest["rebuild"] += ["--output-dir", "/home"]
    (shards / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="rebuild flags .* are not prep/shard.py's plan flags"):
        build_loader("torch", shards, "train", 8, "cpu", workers=0)


# ----------------------------------------------------------------------------- names a DALI index cannot hold


def test_a_file_name_with_spaces_loads_in_every_loader(faces_dir, tmp_path):
    data = tmp_path / "celeba" / "img_align_celeba"
    data.mkdir(parents=True)
    files = sorted(faces_dir.glob("*.jpg"))[:12]
    for f in files:
        shutil.copy2(f, data / f.name)
    shutil.copy2(files[0], data / "my photo.jpg")
    shutil.copy2(files[1], data / "two.dots.jpg")
    # every split holds one of the odd names
    (data.parent / shard.PARTITION_FILE).write_text(
        "my photo.jpg 0\ntwo.dots.jpg 1\n" + "".join(f"{f.name} {i % 3}\n" for i, f in enumerate(files)))
    out = tmp_path / "shards"
    assert shard.main(["--data-path", str(data), "--output-dir", str(out), "--workers", "2", "--quiet"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["renamed"] == [{"file": "my photo.jpg", "key": "my_photo"}, {"file": "two.dots.jpg", "key": "two_dots"}]
    assert manifest["skipped"] == []
    for entry in (s for split in manifest["splits"].values() for s in split["shards"]):
        assert all(len(line.split()) == 4 for line in (out / entry["idx"]).read_text().splitlines()[1:])
    expected = {"train": {"my_photo"} | {f.stem for f in files[0::3]}, "val": {"two_dots"} | {f.stem for f in files[1::3]},
                "test": {f.stem for f in files[2::3]}}
    for name in ALL_LOADERS:
        for split, keys in expected.items():
            loader = build_loader(name, out, split, 4, "cpu", train=False, workers=1, with_keys=True)
            got = [key for _, batch_keys in loader for key in batch_keys]
            assert sorted(got) == sorted(keys), (name, split)
