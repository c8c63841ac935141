"""generate.py on the weights of the shared short training run."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from model import figures
from conftest import split_keys
from pipeline import build_loader

ROOT = Path(__file__).resolve().parents[1]


def gen(trained, *argv):
    return generate.run(["--weights", str(trained / "vae_celeba.pth"), *map(str, argv)])


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_samples_are_train_pys_samples_for_the_same_seed(trained, tmp_path):
    assert gen(trained, "--out", tmp_path / "s.png") == 0  # the defaults: 64 faces, seed 0, T = 1
    assert np.array_equal(pixels(tmp_path / "s.png"), pixels(trained / "generated_samples.png"))


@pytest.mark.flag_effect("generate.py", "--samples")
@pytest.mark.flag_effect("generate.py", "--temperature")
@pytest.mark.flag_effect("generate.py", "--seed")
def test_samples_temperature_and_grid(trained, tmp_path):
    assert gen(trained, "--samples", 10, "--temperature", 0, "--out", tmp_path / "flat.png") == 0
    flat = pixels(tmp_path / "flat.png")
    assert flat.shape == (3 * 66 + 2, 4 * 66 + 2, 3)  # 10 faces, 4 to a row
    faces = [flat[2 + 66 * (i // 4):66 * (i // 4 + 1), 2 + 66 * (i % 4):66 * (i % 4 + 1)] for i in range(10)]
    assert all(np.array_equal(faces[0], f) for f in faces)  # T = 0: every z is 0
    assert gen(trained, "--samples", 10, "--seed", 1, "--out", tmp_path / "t1.png") == 0
    assert gen(trained, "--samples", 10, "--seed", 2, "--out", tmp_path / "t2.png") == 0
    assert not np.array_equal(pixels(tmp_path / "t1.png"), pixels(tmp_path / "t2.png"))


def test_images_get_the_loaders_crop_and_resize(shards, faces_dir):
    keys = split_keys(shards, "val")[:8]
    loader = build_loader("torch", shards, "val", 8, "cpu", workers=0, with_keys=True)
    images, loader_keys = next(iter(loader))
    assert loader_keys == keys
    for image, key in zip(images, keys):
        assert torch.equal(generate.read_image(faces_dir / f"{key}.jpg", "center"), image)


@pytest.mark.flag_effect("generate.py", "--reconstruct")
@pytest.mark.flag_effect("generate.py", "--limit")
def test_reconstruct_files_and_folders(trained, faces_dir, tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    for name in ("000001.jpg", "000002.jpg", "000003.jpg"):
        (folder / name).write_bytes((faces_dir / name).read_bytes())
    Image.open(faces_dir / "000004.jpg").save(folder / "000004.png")  # a PNG as well
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    out = tmp_path / "r.png"
    assert gen(trained, "--reconstruct", faces_dir / "000009.jpg", folder, "--out", out) == 0
    grid = pixels(out)
    assert grid.shape == (2 * 66 + 2, 5 * 66 + 2, 3)  # 5 faces over their reconstructions
    first = generate.read_image(faces_dir / "000009.jpg", "center")
    assert np.array_equal(grid[2:66, 2:66], first.permute(1, 2, 0).numpy())  # the real face, as the loaders see it
    model = generate.load_model(trained / "vae_celeba.pth", None, "cpu")
    recon = figures.reconstruct(model, first[None].float() / 255)[0]  # and below it, its reconstruction
    assert np.abs(grid[68:132, 2:66].astype(int) - recon.mul(255).permute(1, 2, 0).numpy()).max() <= 0.51
    assert gen(trained, "--reconstruct", folder, "--limit", 2, "--out", out) == 0
    assert pixels(out).shape == (2 * 66 + 2, 2 * 66 + 2, 3)


@pytest.mark.flag_effect("generate.py", "--interpolate")
@pytest.mark.flag_effect("generate.py", "--steps")
def test_interpolate(trained, faces_dir, tmp_path):
    out = tmp_path / "i.png"
    assert gen(trained, "--interpolate", faces_dir / "000001.jpg", faces_dir / "000002.jpg", "--steps", 5,
               "--out", out) == 0
    row = pixels(out)
    assert row.shape == (66 + 2, 7 * 66 + 2, 3)  # A, 5 decodings, B
    b = generate.read_image(faces_dir / "000002.jpg", "center").permute(1, 2, 0).numpy()
    assert np.array_equal(row[2:66, 6 * 66 + 2:7 * 66], b)


def one_line_error(*argv):
    result = subprocess.run([sys.executable, "generate.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.flag_effect("generate.py", "--z-dim")
def test_a_z_dim_mismatch_names_both_sizes(trained):
    line = one_line_error("--weights", trained / "vae_celeba.pth", "--z-dim", 64)
    assert "--z-dim 64" in line and "z_dim 128" in line


def test_a_non_image_file_is_named(trained, tmp_path):
    bad = tmp_path / "face.jpg"
    bad.write_text("this is not a JPEG")
    line = one_line_error("--weights", trained / "vae_celeba.pth", "--reconstruct", bad)
    assert str(bad) in line and "not an image" in line


@pytest.mark.parametrize("weights", ["missing.pth", "checkpoint.pt"])
def test_weights_that_are_not_there_or_not_weights(trained, weights):
    assert gen(trained, "--weights", trained / weights) == 1
