"""train.py under faults, each provoked for real: damaged or hostile checkpoints, a full disk, a
checkpoint write killed midway, an unwritable, occupied or foreign output folder, a second run in the
same folder, planted links, changed settings, a damaged shard.

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
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import generate
import train
from conftest import copy_shards, make_shards
from pipeline.shards import data_identity
from run import checkpoint
from run.folder import RUN_OUTPUTS, check_output_dir, prepare_output_dir
from run.record import saved_args
from prep import shard

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "8", "--workers", "1", "--no-compile"]


def run_args(shards, out, *extra) -> list[str]:
    return ["--data-path", str(shards), "--output-dir", str(out), *FAST, *extra]


def train_run(shards, out, *extra) -> int:
    return train.run(run_args(shards, out, *extra))


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
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


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
    newest = torch.load(two_epochs / "checkpoint.pt", weights_only=True)  # plain torch.load opens it
    older = torch.load(two_epochs / "checkpoint.prev.pt", weights_only=True)
    assert (newest["epoch"], older["epoch"]) == (2, 1)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):  # signed on its bytes, checked before unpickling
        path = two_epochs / name
        assert checkpoint.signed_as(path.read_bytes(), path) == checkpoint.CHECKPOINT_TAG
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
    state, source, note, damaged = checkpoint.load_checkpoint(newest)
    assert source == run_dir / "checkpoint.prev.pt" and state["epoch"] == 1
    assert damaged == (None if damage == "deleted" else newest)
    expected = {"truncated": "is unreadable", "flipped": "is damaged", "deleted": "does not exist"}[damage]
    assert expected in note and f"continuing from {source}, saved after epoch 1" in note and "\n" not in note


@pytest.mark.flag_effect("train.py", "--resume")
def test_resuming_from_the_previous_checkpoint_gives_the_uninterrupted_weights(tiny, run_dir, reference, capsys):
    os.truncate(run_dir / "checkpoint.pt", 1000)
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume") == 0
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "continuing from" in line]) == 1
    assert "Traceback" not in err and "error" not in err
    assert same_weights(run_dir, reference)
    assert epochs_logged(run_dir) == [1, 2, 3]  # epoch 2's line was trained again, not doubled
    assert (run_dir / "checkpoint.pt.damaged").stat().st_size == 1000  # set aside, not kept as the previous one
    assert torch.load(run_dir / "checkpoint.prev.pt")["epoch"] == 2


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


@pytest.mark.flag_effect("train.py", "--resume-force")
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


@pytest.mark.flag_effect("train.py", "--resume-force")
def test_resume_force_carries_on_with_the_new_settings(tiny, run_dir, capsys):
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume", "--resume-force", "--lr", "1e-3") == 0
    assert "--resume-force: --lr 0.001 now, --lr 0.0003 in the checkpoint" in capsys.readouterr().err
    state = torch.load(run_dir / "checkpoint.pt")
    assert state["epoch"] == 3 and state["args"]["lr"] == 1e-3
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-3]  # not the checkpoint's


@pytest.mark.parametrize("epochs", ["1", "2"])
def test_resuming_a_complete_run_changes_nothing(tiny, run_dir, capsys, epochs):
    before = snapshot(run_dir)
    assert train_run(tiny, run_dir, "--epochs", epochs, "--resume") == 0
    assert "already complete; nothing changed" in capsys.readouterr().out
    assert snapshot(run_dir) == before


EDITS = {  # a checkpoint edited and signed again: field -> how, and what the one line names
    "a weight of the wrong shape": (lambda s: s["model"].__setitem__("encoder.0.weight", torch.zeros(3, 3)),
                                    "model['encoder.0.weight'] is a torch.float32 tensor of shape (3, 3)"),
    "a random state of the wrong type": (lambda s: s["rng"][0].__setitem__("torch", [1, 2, 3]), "rng[0]['torch']"),
    "a missing field": (lambda s: s.pop("scaler"), "it has no field 'scaler'"),
    "Adam's state of another shape": (lambda s: s["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(5)),
                                      "optimizer['state'][0]['exp_avg']"),
    "Adam's groups for other weights": (lambda s: s["optimizer"]["param_groups"][0].__setitem__("params", [0, 1]),
                                        "optimizer['param_groups'] list the parameters [0, 1]"),
    "a negative epoch": (lambda s: s.__setitem__("epoch", -5), "'epoch' is -5"),
    "an epoch beyond its --epochs": (lambda s: s.__setitem__("epoch", 99), "'epoch' is 99"),
    "a setting of the wrong type": (lambda s: s["args"].__setitem__("z_dim", "128"), "args['z_dim'] is '128'"),
}


def sign_edited(run_dir: Path, folder: Path, edit: str) -> Path:
    """run_dir's checkpoint with one of EDITS made and its digest computed again, alone in `folder`."""
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    EDITS[edit][0](state)
    edited = folder / "checkpoint.pt"
    edited.parent.mkdir(parents=True, exist_ok=True)
    edited.write_bytes(checkpoint.serialize(state))  # the digest is unkeyed: anyone can sign an edit
    return edited


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_checkpoint_with_a_valid_digest_is_refused_naming_the_field(run_dir, tmp_path, edit):
    edited = sign_edited(run_dir, tmp_path / "edited", edit)  # no checkpoint.prev.pt beside it to fall back to
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.load_checkpoint(edited)
    line = str(refused.value)
    assert f"{edited} is not a checkpoint this train.py wrote: {EDITS[edit][1]}" in line and "\n" not in line
    # Beside a good previous checkpoint, the edited newest one is set aside with a note that names the field.
    shutil.copy(edited, run_dir / "checkpoint.pt")
    loaded = checkpoint.load_checkpoint(run_dir / "checkpoint.pt")
    assert loaded.source == run_dir / "checkpoint.prev.pt" and EDITS[edit][1] in loaded.note


@pytest.mark.parametrize("edit", ["a weight of the wrong shape", "a negative epoch"])
def test_train_refuses_an_edited_checkpoint_in_one_line(tiny, run_dir, tmp_path, capsys, edit):
    # Before the check, the first was a traceback from load_state_dict and the second trained epochs -4 to 3.
    edited = sign_edited(run_dir, tmp_path / "edited", edit)
    assert train_run(tiny, tmp_path / "out", "--epochs", "3", "--resume", str(edited)) == 1
    line = error_line(capsys.readouterr().err)
    assert str(edited) in line and EDITS[edit][1] in line and "--overwrite" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.flag_effect("train.py", "--resume-force")
def test_resuming_on_other_shards_is_refused_unless_forced(tiny, run_dir, tmp_path, capsys):
    assert data_identity(copy_shards(tiny, tmp_path / "copy")) == data_identity(tiny)  # moved or copied: the same
    other = make_shards(tiny.parent / "img_align_celeba", tmp_path / "other", 8)  # the same faces, other shards
    before = snapshot(run_dir)
    assert train_run(other, run_dir, "--epochs", "3", "--resume") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: --resume: ")
    assert [line for line in err.splitlines() if line.startswith("  ")] == [
        f"  --data-path {other} (shards {data_identity(other)[:12]}) now, --data-path {tiny} "
        f"(shards {data_identity(tiny)[:12]}) in the checkpoint"]
    assert "--resume-force" in err.splitlines()[-1] and snapshot(run_dir) == before
    assert train_run(other, run_dir, "--epochs", "3", "--resume", "--resume-force") == 0
    assert "--resume-force: --data-path" in capsys.readouterr().err
    state = torch.load(run_dir / "checkpoint.pt")
    assert state["epoch"] == 3 and state["args"]["data"] == data_identity(other)


# ----------------------------------------------------------------------------- the output folder


@pytest.mark.flag_effect("train.py", "--overwrite")
def test_a_previous_run_is_kept_unless_resume_or_overwrite(tiny, run_dir, capsys):
    before = snapshot(run_dir)
    assert train_run(tiny, run_dir, "--epochs", "1") == 1
    line = error_line(capsys.readouterr().err)
    assert "holds a previous run" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(run_dir) == before


@pytest.mark.flag_effect("train.py", "--overwrite")
def test_overwrite_replaces_the_previous_run(tiny, run_dir):
    assert (run_dir / "reconstructions_epoch2.png").exists() and (run_dir / "checkpoint.prev.pt").exists()
    assert train_run(tiny, run_dir, "--epochs", "1", "--overwrite") == 0
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pt", "curves.png", "generated_samples.png", "generated_samples_gmm.png", "interpolations.png",
        "metrics.jsonl", "reconstructions_epoch1.png", "run.json", "vae_celeba.gmm.pt", "vae_celeba.pth"]
    assert epochs_logged(run_dir) == [1]
    marker = json.loads((run_dir / "run.json").read_text())
    assert marker["pid"] == os.getpid() and marker["settings"]["epochs"] == 1
    assert {"checkpoint.pt", "reconstructions_epoch1.png", "vae_celeba.pth"} <= set(marker["files"])


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
    assert f"{run_dir / 'checkpoint.pt'} (epoch 2), is untouched" in line
    assert line.endswith(f"then run `{shlex.join(['python', 'train.py', *run_args(tiny, run_dir, '--epochs', '3')])}"
                         f" --resume`")
    assert kept == {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest() for name in kept}
    assert not list(run_dir.glob("*.tmp"))
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume") == 0
    assert same_weights(run_dir, reference)
    assert epochs_logged(run_dir) == [1, 2, 3]


# ----------------------------------------------------------------------------- a damaged shard


def test_a_damaged_shard_is_one_line_after_the_bar_and_its_hint_repairs_it(tiny, tmp_path, capsys):
    shards = tmp_path / "shards"
    copy_shards(tiny, shards)
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
    command = shlex.join(["python", "train.py", *run_args(tiny, tmp_path / "out", "--epochs", "1")])
    assert capsys.readouterr().err.strip() == ("interrupted before a checkpoint was saved, so there is nothing to "
                                               f"resume: start again with `{command}`")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- files from elsewhere


class CreatesAFile:
    """Unpickled without weights_only, this object opens (so creates) a file: what a hostile checkpoint does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.parametrize("signed", [False, True], ids=["plain", "with-a-valid-digest"])
def test_a_checkpoint_that_would_run_code_is_refused_unopened(tiny, tmp_path, capsys, signed):
    created = tmp_path / "PWNED"
    hostile = {"model": CreatesAFile(created), "optimizer": {}, "scaler": {}, "epoch": 1, "args": {}, "rng": []}
    bad = tmp_path / "downloaded" / "checkpoint.pt"
    bad.parent.mkdir()
    if signed:  # the digest is only a checksum: anyone can compute it, so weights_only must refuse too
        bad.write_bytes(checkpoint.serialize(hostile))
    else:
        torch.save(hostile, bad)
    assert train_run(tiny, tmp_path / "out", "--epochs", "2", "--resume", str(bad)) == 1
    line = error_line(capsys.readouterr().err)
    assert str(bad) in line
    assert ("holds objects other than tensors" if signed else "does not end with the digest") in line
    weights = bad.with_name("vae_celeba.pth")
    hostile_weights = {"hid_2mu.weight": CreatesAFile(created)}
    if signed:
        weights.write_bytes(checkpoint.serialize(hostile_weights, checkpoint.WEIGHTS_TAG))
    else:
        torch.save(hostile_weights, weights)
    assert generate.run(["--weights", str(weights), "--out", str(tmp_path / "x.png")]) == 1
    line = error_line(capsys.readouterr().err)
    assert str(weights) in line and "holds objects other than tensors" in line
    assert not created.exists() and not (tmp_path / "out").exists() and not (tmp_path / "x.png").exists()
    # The provocation is real: unpickled the old way, the file appears.
    torch.load(bad, weights_only=False)
    assert created.exists()


def foreign_folder(tmp_path: Path) -> Path:
    """A folder of another project's: TensorBoard logs in tb/ and a checkpoint.pt of its own."""
    folder = tmp_path / "theirs"
    (folder / "tb").mkdir(parents=True)
    (folder / "tb" / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"their training logs")
    (folder / "checkpoint.pt").write_bytes(b"their model")
    return folder


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--overwrite", "--tensorboard"]])
def test_overwrite_never_touches_files_this_project_did_not_write(tiny, tmp_path, capsys, flags):
    folder = foreign_folder(tmp_path)
    before = snapshot(folder), snapshot(folder / "tb")
    assert train_run(tiny, folder, "--epochs", "1", *flags) == 1
    line = error_line(capsys.readouterr().err)
    assert f"{folder} holds checkpoint.pt" in line and "neither replaces nor deletes them, even with --overwrite" in line
    assert ("tb/" in line) == ("--tensorboard" in flags)
    assert (snapshot(folder), snapshot(folder / "tb")) == before


def test_overwrite_deletes_only_its_own_tensorboard_files(tiny, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed: pip install -e '.[tensorboard]'")
    out = tmp_path / "run"
    assert train_run(tiny, out, "--epochs", "1", "--tensorboard") == 0
    (ours,) = json.loads((out / "run.json").read_text())["tb"]["events"]
    theirs = out / "tb" / "events.out.tfevents.1700000000.elsewhere.7.0"
    theirs.write_bytes(b"another writer's logs, put here later")
    assert train_run(tiny, out, "--epochs", "1", "--tensorboard", "--overwrite") == 0
    left = sorted(p.name for p in (out / "tb").iterdir())
    assert theirs.name in left and ours not in left and len(left) == 2  # theirs, and the new run's
    assert theirs.read_bytes() == b"another writer's logs, put here later"


def test_falling_back_from_another_folders_checkpoint_leaves_that_folder_untouched(tiny, run_dir, tmp_path,
                                                                                reference, capsys):
    os.truncate(run_dir / "checkpoint.pt", 1000)  # damaged: --resume falls back to checkpoint.prev.pt
    before = snapshot(run_dir)
    assert train_run(tiny, tmp_path / "elsewhere", "--epochs", "3", "--resume", str(run_dir / "checkpoint.pt")) == 0
    assert f"continuing from {run_dir / 'checkpoint.prev.pt'}" in capsys.readouterr().err
    assert snapshot(run_dir) == before  # no .damaged rename outside --output-dir
    assert same_weights(tmp_path / "elsewhere", reference)


def test_a_second_run_in_the_same_folder_stops_naming_the_first(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "train.py", *run_args(tiny, out, "--epochs", "200")], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "run.json").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()
        for flags in ([], ["--overwrite"], ["--resume"]):
            assert train_run(tiny, out, "--epochs", "1", *flags) == 1
            line = error_line(capsys.readouterr().err)
            assert f"is in use by another train.py (process {first.pid})" in line, line
        assert first.poll() is None  # still training, its folder as it left it
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "Traceback" not in err


def test_an_output_dir_linked_to_a_folder_is_followed_once(tiny, run_dir, reference, tmp_path, capsys):
    # A new run: checked, locked and marked in the folder the link names, by its real path.
    scratch, fresh = tmp_path / "scratch", tmp_path / "fresh"
    scratch.mkdir()
    fresh.symlink_to(scratch, target_is_directory=True)
    args = train.parse_args(run_args(tiny, fresh, "--epochs", "1"))
    assert check_output_dir(args) is None and args.output_dir == str(scratch.resolve())
    prepare_output_dir(args, saved_args(args), None, None).close()
    assert (scratch / "run.json").is_file() and fresh.is_symlink()
    # A run resumed through a link goes on in the real folder.
    linked = tmp_path / "linked"
    linked.symlink_to(run_dir, target_is_directory=True)
    assert train_run(tiny, linked, "--epochs", "3", "--resume") == 0
    assert "Traceback" not in capsys.readouterr().err
    assert linked.is_symlink() and same_weights(run_dir, reference)
    assert json.loads((run_dir / "run.json").read_text())["settings"]["output_dir"] == str(run_dir.resolve())
    # generate.py reads weights from a linked folder and writes into one.
    assert generate.run(["--weights", str(linked / "vae_celeba.pth"), "--out", str(fresh / "samples.png")]) == 0
    assert (scratch / "samples.png").is_file()


def test_a_link_planted_at_a_temporary_name_is_not_followed(tiny, tmp_path, monkeypatch):
    target = tmp_path / "precious"
    target.write_bytes(b"not to be overwritten")
    out = tmp_path / "out"
    out.mkdir()
    names = [*RUN_OUTPUTS, "reconstructions_epoch1.png", "run.json"]
    links = [out / f".{name}.planted.tmp" for name in names] + [out / f"{name}.tmp" for name in names]
    for link in links:
        link.symlink_to(target)
    real = tempfile._get_candidate_names
    # Every temporary name the run draws is first the planted one, as if an attacker had guessed it.
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(["planted", *(next(real()) for _ in range(99))]))
    assert train_run(tiny, out, "--epochs", "1") == 0
    assert target.read_bytes() == b"not to be overwritten"
    assert all(link.is_symlink() and link.resolve() == target for link in links)
    assert torch.load(out / "checkpoint.pt")["epoch"] == 1 and json.loads((out / "run.json").read_text())["files"]


def test_resuming_on_another_precision_or_compile_mode_is_refused(tiny, run_dir, monkeypatch, capsys):
    saved = torch.load(run_dir / "checkpoint.pt")["args"]
    assert saved["amp"] in ("bf16", "off") and saved["compile"] is False  # as resolved, not "auto"
    other = "off" if saved["amp"] == "bf16" else "bf16"
    before = snapshot(run_dir)
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume", "--amp", other, "--compile") == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("  ")] == [
        f"  --amp {other} now, --amp {saved['amp']} in the checkpoint", "  --compile now, --no-compile in the checkpoint"]
    # --amp auto on a machine whose CPU resolves it otherwise: the same refusal.
    monkeypatch.setattr("model.step.native_bf16_cpu", lambda: None if saved["amp"] == "bf16" else "avx512_bf16")
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume") == 1
    assert f"  --amp {other} now, --amp {saved['amp']} in the checkpoint" in capsys.readouterr().err.splitlines()
    assert snapshot(run_dir) == before


def test_resume_force_help_lists_the_checked_settings(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key, flag in checkpoint.SETTINGS.items():
        if key != "z_dim":
            assert flag in text.split("--resume-force", 2)[2].split("--checkpoint-every")[0], flag


# ----------------------------------------------------------------------------- the background checkpoint writer

STALLED_WRITE = """
import pathlib, sys, time
sys.path.insert(0, {root!r})
import train
from run import checkpoint

real = checkpoint.atomic_write

def stalled(path, data, **kwargs):
    def half(f):  # half the checkpoint on disk, then the process is killed
        f.write(data[:len(data) // 2])
        f.flush()
        pathlib.Path({ready!r}).touch()
        time.sleep(600)
    return real(path, half, **kwargs)

checkpoint.atomic_write = stalled
sys.exit(train.run({argv!r}))
"""


def test_a_checkpoint_write_killed_midway_keeps_the_previous_one(tiny, run_dir, reference, tmp_path):
    kept = snapshot(run_dir)
    ready = tmp_path / "ready"
    script = STALLED_WRITE.format(root=str(ROOT), ready=str(ready),
                                  argv=run_args(tiny, run_dir, "--epochs", "3", "--resume"))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not ready.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint write began"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert [p.name for p in run_dir.glob(".checkpoint.pt.*.tmp")], "the half-written file was not there"
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        assert snapshot(run_dir)[name] == kept[name]
    assert torch.load(run_dir / "checkpoint.pt")["epoch"] == 2
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume") == 0
    assert same_weights(run_dir, reference)
    assert epochs_logged(run_dir) == [1, 2, 3]


def test_ctrl_c_waits_for_the_checkpoint_writer(tiny, tmp_path, monkeypatch, capsys):
    real_write, real_epoch = checkpoint.write_checkpoint, train.train_one_epoch

    def slow_write(path, state):
        time.sleep(3)  # still writing when Ctrl-C comes
        real_write(path, state)

    def train_one_epoch(train_step, loader, epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(train_step, loader, epoch, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_checkpoint", slow_write)
    monkeypatch.setattr(train, "train_one_epoch", train_one_epoch)
    out = tmp_path / "out"
    assert train_run(tiny, out, "--epochs", "3") == 130
    assert not [t for t in threading.enumerate() if t.name == "checkpoint writer"]
    assert torch.load(out / "checkpoint.pt")["epoch"] == 1
    command = shlex.join(["python", "train.py", *run_args(tiny, out, "--epochs", "3"), "--resume"])
    assert capsys.readouterr().err.strip().endswith(
        f"interrupted in epoch 2; {out / 'checkpoint.pt'} holds epoch 1: continue with `{command}`")


def test_a_failed_background_write_stops_training_at_the_next_epoch(tiny, run_dir, reference, monkeypatch, capsys):
    real_write = checkpoint.write_checkpoint
    trained = []

    def failing_write(path, state):
        if state["epoch"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, state)

    real_epoch = train.train_one_epoch
    monkeypatch.setattr(train, "train_one_epoch", lambda step, loader, epoch, *a, **k: (
        trained.append(epoch + 1), real_epoch(step, loader, epoch, *a, **k))[1])
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "write_checkpoint", failing_write)
        assert train_run(tiny, run_dir, "--epochs", "5", "--resume") == 1
    line = error_line(capsys.readouterr().err)
    assert "No space left on device" in line and f"{run_dir / 'checkpoint.pt'} (epoch 2), is untouched" in line
    assert trained == [3, 4]  # epoch 4 trained while the write failed; its end stopped the run
    assert epochs_logged(run_dir) == [1, 2, 3] and not (run_dir / "reconstructions_epoch4.png").exists()
    assert torch.load(run_dir / "checkpoint.pt")["epoch"] == 2
    assert train_run(tiny, run_dir, "--epochs", "3", "--resume") == 0
    assert same_weights(run_dir, reference)


@pytest.mark.flag_effect("train.py", "--checkpoint-every")
def test_checkpoint_every_saves_every_nth_epoch_and_the_last(tiny, tmp_path, monkeypatch):
    real_write, saved = checkpoint.write_checkpoint, []

    def write(path, state):
        saved.append(state["epoch"])
        real_write(path, state)

    monkeypatch.setattr(checkpoint, "write_checkpoint", write)
    assert train_run(tiny, tmp_path / "every", "--epochs", "3") == 0
    assert saved == [1, 2, 3]
    saved.clear()
    assert train_run(tiny, tmp_path / "third", "--epochs", "5", "--checkpoint-every", "3") == 0
    assert saved == [3, 5]
    out = tmp_path / "third"
    assert (torch.load(out / "checkpoint.pt")["epoch"], torch.load(out / "checkpoint.prev.pt")["epoch"]) == (5, 3)
