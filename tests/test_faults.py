"""train.py under faults, each provoked for real: damaged checkpoints, a full disk, an unwritable or
occupied output folder, changed settings, a damaged shard.

Each ends in one line that says what to do, exit code 1 and no traceback (train.run is what the
command line runs), changes nothing it should not, and leaves the last good checkpoint able to
resume to the weights of an uninterrupted run.
"""

import errno
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from conftest import make_shards
from model import checkpoint
from prep import shard

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "8", "--workers", "1", "--no-compile"]


@pytest.fixture(scope="module")
def tiny(faces_dir, tmp_path_factory) -> Path:
    """48 faces in shards of 16, split by key hash: an epoch is a few steps of 8."""
    data = tmp_path_factory.mktemp("tiny") / "img_align_celeba"
    data.mkdir()
    for f in sorted(faces_dir.glob("*.jpg"))[:48]:
        shutil.copy2(f, data / f.name)
    return make_shards(data, data.parent / "shards", 16)


def train_run(shards, out, *extra) -> int:
    return train.run(["--data-path", str(shards), "--output-dir", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> dict:
    """The weights of three epochs without a stop."""
    out = tmp_path_factory.mktemp("reference")
    assert train_run(tiny, out, "--epochs", "3") == 0
    return torch.load(out / "vae_celeba.pth")


@pytest.fixture(scope="module")
def two_epochs(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    assert train_run(tiny, out, "--epochs", "2") == 0
    return out


@pytest.fixture
def run_dir(two_epochs, tmp_path) -> Path:
    """A copy of a finished two-epoch run, to damage."""
    shutil.copytree(two_epochs, tmp_path / "run")
    return tmp_path / "run"


def error_line(err: str) -> str:
    """The one `error:` line on stderr, which must start a line of its own (progress bars aside)."""
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").split("\n") if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "error: " not in err.replace(lines[0], ""), "an error glued onto another line"
    return lines[0]


def snapshot(folder: Path) -> dict:
    """name -> SHA-256 of every file in the folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def same_weights(out: Path, reference: dict) -> bool:
    weights = torch.load(out / "vae_celeba.pth")
    return weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)


def epochs_logged(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def flip_bytes(path: Path, offset: int, n: int = 64) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


# ----------------------------------------------------------------------------- checkpoints


def test_each_epoch_keeps_the_previous_checkpoint(two_epochs):
    newest = torch.load(two_epochs / "checkpoint.pt", weights_only=False)
    older = torch.load(two_epochs / "checkpoint.prev.pt", weights_only=False)
    assert (newest["epoch"], older["epoch"]) == (2, 1)
    for state in (newest, older):
        assert state.pop("digest") == checkpoint.digest(state)
    assert not list(two_epochs.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncated", "flipped", "deleted"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(run_dir, damage):
    newest = run_dir / "checkpoint.pt"
    if damage == "truncated":
        os.truncate(newest, newest.stat().st_size // 2)
    elif damage == "flipped":  # the middle of the file is tensor data, which torch.load does not check
        flip_bytes(newest, newest.stat().st_size // 2)
    else:
        newest.unlink()
    state, source, note = checkpoint.load_checkpoint(newest)
    assert source == run_dir / "checkpoint.prev.pt" and state["epoch"] == 1
    expected = {"truncated": "is unreadable", "flipped": "is damaged", "deleted": "does not exist"}[damage]
    assert expected in note and f"continuing from {source}, saved after epoch 1" in note and "\n" not in note


def test_resuming_from_the_previous_checkpoint_gives_the_uninterrupted_weights(tiny, run_dir, reference, capsys):
    os.truncate(run_dir / "checkpoint.pt", 1000)
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume") == 0
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "continuing from" in line]) == 1
    assert "Traceback" not in err and "error" not in err
    assert same_weights(run_dir, reference)
    assert epochs_logged(run_dir) == [1, 2, 3]  # epoch 2's line was trained again, not doubled
    assert (run_dir / "checkpoint.pt.damaged").stat().st_size == 1000  # set aside, not kept as the previous one
    assert torch.load(run_dir / "checkpoint.prev.pt", weights_only=False)["epoch"] == 2


def test_no_readable_checkpoint_is_one_line_and_changes_nothing(run_dir):
    os.truncate(run_dir / "checkpoint.pt", 1000)
    flip_bytes(run_dir / "checkpoint.prev.pt", (run_dir / "checkpoint.prev.pt").stat().st_size // 2)
    before = snapshot(run_dir)
    result = subprocess.run([sys.executable, "train.py", "--data-path", "unused", "--output-dir", str(run_dir),
                             "--resume", "--epochs", "3"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert result.stderr.strip() == line
    assert "checkpoint.pt is unreadable" in line and "checkpoint.prev.pt is damaged" in line and "--overwrite" in line
    assert snapshot(run_dir) == before


def test_weights_given_to_resume_say_which_file_to_pass(tiny, run_dir, capsys):
    before = snapshot(run_dir)
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume", str(run_dir / "vae_celeba.pth")) == 1
    line = error_line(capsys.readouterr().err)
    assert "vae_celeba.pth holds only model weights" in line and "checkpoint.pt" in line
    assert snapshot(run_dir) == before


def test_resuming_with_other_settings_stops_with_one_line_per_difference(tiny, run_dir, capsys):
    before = snapshot(run_dir)
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume", "--lr", "1e-3", "--crop", "none") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("  ")] == [
        "  --lr 0.001 now, --lr 0.0003 in the checkpoint", "  --crop none now, --crop center in the checkpoint"]
    assert err.startswith("error: --resume: ") and "--resume-force" in err.splitlines()[-1]
    # The model's shape cannot be forced.
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume", "--resume-force", "--z-dim", "16") == 1
    assert "even --resume-force cannot" in error_line(capsys.readouterr().err)
    assert snapshot(run_dir) == before


def test_resume_force_carries_on_with_the_new_settings(tiny, run_dir, capsys):
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume", "--resume-force", "--lr", "1e-3") == 0
    assert "--resume-force: --lr 0.001 now, --lr 0.0003 in the checkpoint" in capsys.readouterr().err
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 3 and state["args"]["lr"] == 1e-3
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-3]  # not the checkpoint's


@pytest.mark.parametrize("epochs", ["1", "2"])
def test_resuming_a_complete_run_changes_nothing(tiny, run_dir, capsys, epochs):
    before = snapshot(run_dir)
    assert train_run(tiny, run_dir, "--epochs", epochs, "--resume") == 0
    assert "already complete; nothing changed" in capsys.readouterr().out
    assert snapshot(run_dir) == before


# ----------------------------------------------------------------------------- the output folder


def test_a_previous_run_is_kept_unless_resume_or_overwrite(tiny, run_dir, capsys):
    before = snapshot(run_dir)
    assert train_run(tiny, run_dir, "--epochs", "1") == 1
    line = error_line(capsys.readouterr().err)
    assert "holds a previous run" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(run_dir) == before


def test_overwrite_replaces_the_previous_run(tiny, run_dir):
    (run_dir / "reconstructions_epoch7.png").write_bytes(b"from an older run")
    assert train_run(tiny, run_dir, "--epochs", "1", "--overwrite") == 0
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pt", "curves.png", "generated_samples.png", "generated_samples_gmm.png", "interpolations.png",
        "metrics.jsonl", "reconstructions_epoch1.png", "vae_celeba.gmm.pt", "vae_celeba.pth"]
    assert epochs_logged(run_dir) == [1]


def make_unwritable(folder: Path):
    """chmod, and for root (whom permission bits do not stop) the immutable attribute; None if neither works."""
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None and \
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        (folder / "probe").write_text("")
    except OSError:
        return immutable
    folder.chmod(0o755)
    return None


def test_an_unusable_output_dir_stops_before_anything_is_read(tiny, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "inside"):
        assert train_run(tiny, out, "--epochs", "1") == 1
        assert f"--output-dir {out}: {a_file} is a file, not a folder" in error_line(capsys.readouterr().err)
    locked = tmp_path / "locked"
    immutable = make_unwritable(locked)
    if immutable is None:
        pytest.skip("no way to make a folder unwritable here (root without chattr)")
    try:
        assert train_run(tiny, locked / "out", "--epochs", "1") == 1
        line = error_line(capsys.readouterr().err)
        assert f"cannot write into {locked}" in line and "choose another folder" in line
        assert list(locked.iterdir()) == []
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(0o755)


def test_a_failed_run_leaves_no_folder_behind(tiny, tmp_path, capsys):
    assert train_run(tmp_path / "no_shards", tmp_path / "out", "--epochs", "1") == 1
    assert "no manifest.json" in error_line(capsys.readouterr().err)
    train_images = json.loads((tiny / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    assert train_run(tiny, tmp_path / "out", "--epochs", "1", "--batch-size", str(train_images + 1)) == 1
    line = error_line(capsys.readouterr().err)
    assert f"the train split has {train_images} images, fewer than one batch of {train_images + 1}" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- a full disk


def full_disk(real_write):
    """A writer that writes a little, then fails as a full disk does."""
    def write(obj, target, *args, **kwargs):
        data = io.BytesIO()
        real_write(obj, data, *args, **kwargs)
        if isinstance(target, (str, os.PathLike)):
            Path(target).write_bytes(data.getvalue()[:100])
        else:
            target.write(data.getvalue()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


@pytest.mark.parametrize("writing", ["checkpoint", "picture"])
def test_a_full_disk_keeps_the_last_good_checkpoint(tiny, run_dir, reference, monkeypatch, capsys, writing):
    kept = {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
            for name in ("checkpoint.pt", "checkpoint.prev.pt")}
    with monkeypatch.context() as m:
        if writing == "checkpoint":
            m.setattr(torch, "save", full_disk(torch.save))
        else:
            real_save = Image.Image.save
            m.setattr(Image.Image, "save", full_disk(lambda im, f, *a, **k: real_save(im, f, format="PNG")))
        assert train_run(tiny, run_dir, "--epochs", "3", "--resume") == 1
    line = error_line(capsys.readouterr().err)
    assert "No space left on device" in line
    assert f"{run_dir / 'checkpoint.pt'} (epoch 2), is untouched" in line and "--resume" in line
    assert kept == {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest() for name in kept}
    assert not list(run_dir.glob("*.tmp"))
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume") == 0
    assert same_weights(run_dir, reference)
    assert epochs_logged(run_dir) == [1, 2, 3]


# ----------------------------------------------------------------------------- a damaged shard


def test_a_damaged_shard_is_one_line_after_the_bar_and_its_hint_repairs_it(tiny, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(tiny, shards)
    tar = shards / "train-000000.tar"
    with open(tar, "r+b") as f:  # every image of the shard zeroed, the size unchanged: only decoding can tell
        for row in (shards / "train-000000.idx").read_text().splitlines()[1:]:
            _, offset, size, _ = row.split()
            f.seek(int(offset))
            f.write(bytes(int(size)))
    assert train_run(shards, tmp_path / "out", "--epochs", "1") == 1
    err = capsys.readouterr().err
    line = error_line(err)
    assert "epoch 1/1" in err  # the bar was there, and the error starts a line after it
    assert re.match(rf"error: sample \w+ in {re.escape(str(tar))} does not decode", line)
    command = re.search(r"run `python (prep/shard\.py [^`]+ --verify)` to rebuild", line).group(1)
    assert shard.main(shlex.split(command)[1:] + ["--quiet", "--workers", "2"]) == 0
    assert tar.read_bytes() == (tiny / "train-000000.tar").read_bytes()
    assert train_run(shards, tmp_path / "out", "--epochs", "1", "--overwrite") == 0


def test_ctrl_c_before_the_first_epoch_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "build_loader", interrupted)
    assert train_run(tiny, tmp_path / "out", "--epochs", "1") == 130
    assert capsys.readouterr().err.strip() == "interrupted before an epoch was saved: run the same command again"
    assert not (tmp_path / "out").exists()
