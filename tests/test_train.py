"""train.py end to end on the synthetic shards, on the CPU."""

import contextlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "32", "--workers", "1", "--no-compile"]  # compiling is tested once, below

SEED_SNIPPET = """
import torch
from model import VariationalAutoEncoder

model = VariationalAutoEncoder(z_dim=128)
model.load_state_dict(torch.load("vae_celeba.pth"))
model.eval()

z = torch.randn(16, 128)
samples = model.decode(z)
print(tuple(samples.shape), float(samples.min()), float(samples.max()))
"""


def run(shards, out, *extra):
    return train.main(train.parse_args(["--data-path", str(shards), "--output-dir", str(out), *FAST, *extra]))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss(trained):
    rows = metrics(trained)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    for r in rows:
        assert 0 < r["val_bits_per_dim"] < 8 and r["images_per_s"] > 0 and r["seconds"] > 0
        assert r["val_loss"] == pytest.approx(r["val_bce"] + 1e-3 * r["val_kl"], rel=1e-5)


def test_metrics_rows_carry_the_quality_figures(trained):
    rows = metrics(trained)
    for r in rows:
        for key in ("val_mse", "val_psnr", "val_kl_dim_median", "val_kl_dim_max", "train_bits_per_dim", "lr",
                    "wall_s"):
            assert math.isfinite(r[key]), key
        assert 0 < r["val_mse"] < 0.25 and 5 < r["val_psnr"] < 60
        # PSNR is averaged per image: by Jensen it is at least the PSNR of the mean MSE.
        assert r["val_psnr"] >= -10 * math.log10(r["val_mse"])
        assert isinstance(r["val_active_dims"], int) and 0 <= r["val_active_dims"] <= 128
        assert 0 <= r["val_kl_dim_median"] <= r["val_kl_dim_max"] and r["val_kl_dim_max"] * 128 >= r["val_kl"]
        assert r["lr"] == 3e-4
    assert rows[-1]["val_psnr"] > rows[0]["val_psnr"]
    assert all(b["wall_s"] >= a["wall_s"] + b["seconds"] for a, b in zip(rows, rows[1:]))


def test_outputs_are_pngs_of_the_right_size(trained):
    for epoch in (1, 2, 3):
        with Image.open(trained / f"reconstructions_epoch{epoch}.png") as im:
            assert im.format == "PNG" and im.size == (16 * 66 + 2, 2 * 66 + 2)  # 16 faces over their reconstructions
    with Image.open(trained / "generated_samples.png") as im:
        im.load()
        assert im.format == "PNG" and im.size == (8 * 66 + 2, 8 * 66 + 2)
    with Image.open(trained / "curves.png") as im:
        im.load()
        assert im.format == "PNG" and im.size == (1000, 700)
    with Image.open(trained / "interpolations.png") as im:
        im.load()  # 8 pairs of the 16 preview faces: A, 8 decodings, B
        assert im.format == "PNG" and im.size == (10 * 66 + 2, 8 * 66 + 2)


def test_seed_readme_snippet_loads_the_weights(trained):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", SEED_SNIPPET], cwd=trained, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("(16, 3, 64, 64)")
    weights = torch.load(trained / "vae_celeba.pth")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in weights)
    assert all(t.device.type == "cpu" for t in weights.values())


def same_weights(a, b):
    a, b = torch.load(a / "vae_celeba.pth"), torch.load(b / "vae_celeba.pth")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.flag_effect("train.py", "--resume")
def test_a_streamed_run_resumed_with_another_worker_count_gives_the_uninterrupted_weights(shards, trained, tmp_path):
    """One epoch, then --resume to three: the weights of `trained`, three epochs without a stop. The streamed
    epoch order depends on (seed, epoch) alone, so -j may change between stop and resume (here 0, then 3;
    `trained` ran with 1)."""
    assert run(shards, tmp_path, "--epochs", "1", "--cache", "off", "--workers", "0") == 0
    assert run(shards, tmp_path, "--epochs", "3", "--cache", "off", "--workers", "3", "--resume") == 0
    assert same_weights(trained, tmp_path)
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # The wall clock continues from the first run's rather than starting again.
    assert rows[1]["wall_s"] >= rows[0]["wall_s"] + rows[1]["seconds"]


@pytest.fixture(scope="module")
def cached_run(shards, tmp_path_factory):
    """The output folder of a 3-epoch run with --cache auto (which caches both splits of `shards`), batch 32,
    and what it printed."""
    out = tmp_path_factory.mktemp("cached") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run(shards, out, "--epochs", "3") == 0
    return out, printed.getvalue()


def test_resume_with_the_cache_gives_the_same_weights_as_an_uninterrupted_run(shards, cached_run, tmp_path, capsys):
    assert run(shards, tmp_path, "--epochs", "1", "--cache", "on") == 0
    capsys.readouterr()
    # --cache auto, the default, would stream a single remaining epoch; resuming, it keeps the cache.
    assert run(shards, tmp_path, "--epochs", "3", "--resume") == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("cache on (the run being resumed used it")
    assert same_weights(cached_run[0], tmp_path)
    assert [r["epoch"] for r in metrics(tmp_path)] == [1, 2, 3]


def test_the_cache_trains_and_writes_the_same_outputs(cached_run, trained):
    out, printed = cached_run
    lines = printed.splitlines()[1:]  # after the device line
    assert lines[0].startswith("cache on (3 epochs to run): train 2.4 MB + val 294.9 kB in RAM")
    assert lines[1].startswith("cached train: 194 images in ") and lines[2].startswith("cached val: 24 images in ")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in trained.iterdir())
    rows, streamed = metrics(out), metrics(trained)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["val_loss"] < rows[0]["val_loss"]
    # The same images in another order: a cache that served wrong pixels would land far from the streamed run.
    assert rows[-1]["val_loss"] == pytest.approx(streamed[-1]["val_loss"], rel=0.05)


@pytest.mark.flag_effect("train.py", "--cache")
def test_cache_on_that_does_not_fit_is_one_line(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("pipeline.cache.MEMORY_FRACTION", 1e-9)  # a budget of a few bytes
    assert train.run(["--data-path", str(shards), "--output-dir", str(tmp_path), *FAST, "--cache", "on"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --cache on: the train split needs 2.4 MB, more than the cache may take ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cache_auto_streams_when_it_does_not_fit_and_says_so(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("pipeline.cache.MEMORY_FRACTION", 1e-9)
    assert run(shards, tmp_path, "--epochs", "2") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("cache off: the train split needs 2.4 MB, more than the cache may take ")
    assert "cached" not in out and [r["epoch"] for r in metrics(tmp_path)] == [1, 2]


def test_a_diverging_loss_stops_with_a_clear_message(shards, tmp_path):
    with pytest.raises(train.TrainingError, match="loss became") as raised:
        run(shards, tmp_path, "--epochs", "1", "--lr", "1e30")
    assert not (tmp_path / "vae_celeba.pth").exists() and not (tmp_path / "checkpoint.pt").exists()
    # In epoch 1 there is nothing to resume: the message says so and gives the command that starts again.
    message = str(raised.value)
    command = shlex.join(["python", "train.py", "--data-path", str(shards), "--output-dir", str(tmp_path), *FAST,
                          "--epochs", "1", "--overwrite", "--lr", "1e+29"])
    assert "no checkpoint was saved, so there is nothing to resume" in message and f"`{command}`" in message
    assert "--resume" not in message


def test_a_loss_diverging_after_a_checkpoint_says_how_to_resume(shards, trained, tmp_path):
    out = shutil.copytree(trained, tmp_path / "run")
    with pytest.raises(train.TrainingError, match="loss became") as raised:
        run(shards, out, "--epochs", "4", "--cache", "off", "--resume", "--resume-force", "--lr", "1e30")
    command = shlex.join(["python", "train.py", "--data-path", str(shards), "--output-dir", str(out), *FAST,
                          "--epochs", "4", "--cache", "off", "--resume", "--resume-force", "--lr", "1e+29"])
    assert f"{out / 'checkpoint.pt'} holds epoch 3: continue with `{command}`" in str(raised.value)


def test_missing_shards_say_what_to_do(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--data-path", str(tmp_path / "nowhere"), "--epochs", "1"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert "no manifest.json" in result.stderr and "prep/shard.py" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_continues(tiny, tmp_path):
    cmd = [sys.executable, "train.py", "--data-path", str(tiny), "--output-dir", str(tmp_path), *FAST,
           "--batch-size", "8", "--epochs", "50"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    done = torch.load(tmp_path / "checkpoint.pt")["epoch"]
    assert f"holds epoch {done}: continue with `python train.py " in err and err.rstrip().endswith(" --resume`")
    assert done >= 1
    assert run(tiny, tmp_path, "--batch-size", "8", "--epochs", str(done + 1), "--resume") == 0
    assert metrics(tmp_path)[-1]["epoch"] == done + 1


@pytest.mark.flag_effect("train.py", "--compile")
def test_compile_runs_on_cpu(shards, tmp_path):
    assert run(shards, tmp_path, "--epochs", "1", "--compile") == 0
    assert (tmp_path / "vae_celeba.pth").exists()


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--data-path", "--loader", "--epochs", "--batch-size", "--lr", "--beta", "--z-dim", "--workers",
                 "--device", "--amp", "--channels-last", "--compile", "--crop", "--output-dir", "--resume", "--seed",
                 "--cache", "--tensorboard", "--checkpoint-every"):
        assert flag in result.stdout


def test_dali_loader_trains_and_writes_the_same_outputs(shards, trained, tmp_path):
    assert run(shards, tmp_path, "--loader", "dali", "--epochs", "3", "--cache", "off") == 0
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in trained.iterdir())
    rows, torch_rows = metrics(tmp_path), metrics(trained)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["val_loss"] < rows[0]["val_loss"]
    # Same images, same model and seed: a loader that fed wrong pixels would land far from the torch run.
    assert rows[-1]["val_loss"] == pytest.approx(torch_rows[-1]["val_loss"], rel=0.05)
    for epoch in (1, 2, 3):
        with Image.open(tmp_path / f"reconstructions_epoch{epoch}.png") as im:
            assert im.format == "PNG" and im.size == (16 * 66 + 2, 2 * 66 + 2)


def test_dali_loader_without_dali_is_one_clear_line(shards, tmp_path):
    # A `nvidia.dali` that fails to import, first on the path: as if DALI were not installed.
    (tmp_path / "nvidia" / "dali").mkdir(parents=True)
    (tmp_path / "nvidia" / "__init__.py").write_text("")
    (tmp_path / "nvidia" / "dali" / "__init__.py").write_text("raise ImportError('No module named nvidia.dali')")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "train.py", "--data-path", str(shards), "--output-dir",
                             str(tmp_path / "out"), "--loader", "dali", "--epochs", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith(
        "needs NVIDIA DALI: pip install -e '.[dali]'")
    assert "Traceback" not in result.stderr


@pytest.mark.flag_effect("train.py", "--device")
def test_setup_device_names_the_gpu_it_sets(monkeypatch):
    """`--device cuda` (and auto on a GPU machine) is a device without an index, which
    torch.cuda.set_device refuses; setup_device must hand it the current device's index. The check runs
    torch's own index rule on a stand-in for the GPU."""
    from torch.cuda._utils import _get_device_index
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(_get_device_index(device)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    for flag in ("cuda", "auto", "cuda:0"):
        device, rank, world_size = train.setup_device(train.parse_args(["--device", flag]))
        assert device == torch.device("cuda", 0) and (rank, world_size) == (0, 1)
    assert chosen == [0, 0, 0]


@pytest.mark.flag_effect("train.py", "--tensorboard")
def test_tensorboard_logs_scalars_and_reconstructions(tiny, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed: pip install -e '.[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run(tiny, tmp_path, "--epochs", "2", "--tensorboard") == 0
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    for tag in ("train_step/loss", "train_step/bce", "train_step/kl", "epoch/train_loss", "epoch/val_loss",
                "epoch/val_psnr", "epoch/val_mse", "epoch/val_active_dims", "epoch/val_bits_per_dim", "epoch/lr"):
        assert tag in tags["scalars"], tag
    steps_per_epoch = len(train.build_loader("torch", tiny, "train", 32, "cpu", workers=0))
    assert [e.step for e in events.Scalars("train_step/loss")] == [steps_per_epoch, 2 * steps_per_epoch]
    rows = metrics(tmp_path)
    assert [e.step for e in events.Scalars("epoch/val_psnr")] == [1, 2]
    assert [e.value for e in events.Scalars("epoch/val_psnr")] == pytest.approx([r["val_psnr"] for r in rows])
    assert [e.step for e in events.Images("reconstructions")] == [1, 2]
    assert {"generated_samples", "interpolations"} <= set(tags["images"])


def test_tensorboard_without_the_package_is_one_clear_line(shards, tmp_path):
    # A `tensorboard` that fails to import, first on the path: as if it were not installed.
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "__init__.py").write_text("raise ImportError('No module named tensorboard')")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "train.py", "--data-path", str(shards), "--output-dir",
                             str(tmp_path / "out"), "--tensorboard", "--epochs", "1", *FAST],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --tensorboard needs the tensorboard package: pip install tensorboard (or pip install -e '.[tensorboard]')"]
    assert not (tmp_path / "out" / "checkpoint.pt").exists()



def test_the_end_of_training_writes_every_sample_quality_file_and_field(trained):
    from model import quality

    for name in ("generated_samples_gmm.png", "attributes.png"):
        with Image.open(trained / name) as im:
            assert im.format == "PNG"
    with Image.open(trained / "generated_samples_gmm.png") as im:
        assert im.size == (8 * 66 + 2, 8 * 66 + 2)  # 64 faces
    gmm = quality.load_gmm(trained / "vae_celeba.gmm.pt")  # weights_only
    vectors = quality.load_attribute_vectors(trained / "vae_celeba.attributes.pt")
    with Image.open(trained / "attributes.png") as im:  # a row per attribute, 7 steps, make_grid's padding
        assert im.size == (quality.ATTRIBUTE_STEPS * 66 + 2, len(vectors["names"]) * 66 + 2)
    rows = metrics(trained)
    last = rows[-1]
    assert last["gmm_components"] == len(gmm["weights"]) == 10 and last["gmm_converged"] in (True, False)
    assert last["gmm_codes"] == gmm["codes"] > 100
    for name in ("prior", "gmm", "reconstructions"):
        assert last[f"swd_{name}"] > 0 and len(last["swd_levels"][name]) == 3
    assert last["swd_images"] == last["active_images"] > 10 and last["swd_seed"] == 0 and last["swd_real"] == "val"
    assert 0 <= last["val_active_units_cov"] <= 128 and 0 <= last["val_active_dims_kl"] <= 128
    assert last["attribute_names"] == vectors["names"] and "Smiling" in vectors["names"]
    assert last["quality_seconds"] > 0
    assert all("swd_prior" not in r for r in rows[:-1])  # the last epoch's row alone
