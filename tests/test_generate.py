"""generate.py on the weights of the shared short training run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

import generate
from model import figures, quality
from conftest import split_keys
from pipeline import build_loader

ROOT = Path(__file__).resolve().parents[1]


def gen(trained, *argv):
    return generate.run(["--weights", str(trained / "vae_celeba.pth"), *map(str, argv)])


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


@pytest.mark.flag_effect("generate.py", "--weights")
@pytest.mark.flag_effect("generate.py", "--out")
def test_samples_are_train_pys_samples_for_the_same_seed(trained, tmp_path):
    assert gen(trained, "--out", tmp_path / "s.png") == 0  # the defaults: 64 faces, seed 0, T = 1
    assert np.array_equal(pixels(tmp_path / "s.png"), pixels(trained / "generated_samples.png"))


@pytest.mark.flag_effect("generate.py", "--samples")
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


# ----------------------------------------------------------------------------- flags and their effects


def model_of(trained):
    return generate.load_model(trained / "vae_celeba.pth", None, "cpu")


def as_pixels(grid: torch.Tensor) -> np.ndarray:
    """A grid as save_image writes it."""
    return quality.to_uint8(grid).permute(1, 2, 0).numpy()


@pytest.mark.flag_effect("generate.py", "--temperature")
def test_temperature_half_is_the_decoding_of_half_eps(trained, tmp_path):
    assert gen(trained, "--samples", 9, "--temperature", 0.5, "--seed", 3, "--out", tmp_path / "t.png") == 0
    eps = torch.randn(9, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = make_grid(model_of(trained).decode(0.5 * eps), nrow=3)
    assert np.abs(pixels(tmp_path / "t.png").astype(int) - as_pixels(expected).astype(int)).max() <= 1


@pytest.mark.flag_effect("generate.py", "--sampler")
def test_the_gmm_sampler_decodes_the_mixtures_draws(trained, tmp_path):
    assert gen(trained, "--samples", 4, "--sampler", "gmm", "--seed", 5, "--out", tmp_path / "g.png") == 0
    assert gen(trained, "--samples", 4, "--sampler", "prior", "--seed", 5, "--out", tmp_path / "p.png") == 0
    gmm = quality.load_gmm(trained / "vae_celeba.gmm.pt")
    z = quality.draw_latents(4, 128, torch.Generator().manual_seed(5), gmm=gmm)
    with torch.no_grad():
        expected = make_grid(model_of(trained).decode(z), nrow=2)
    got = pixels(tmp_path / "g.png")
    assert np.abs(got.astype(int) - as_pixels(expected).astype(int)).max() <= 1
    assert not np.array_equal(got, pixels(tmp_path / "p.png"))


@pytest.mark.flag_effect("generate.py", "--attribute")
@pytest.mark.flag_effect("generate.py", "--strength")
@pytest.mark.flag_effect("generate.py", "--rows")
def test_attribute_rows_run_from_minus_to_plus_strength(trained, tmp_path):
    out = tmp_path / "a.png"
    assert gen(trained, "--attribute", "Smiling", "--strength", 2, "--rows", 3, "--steps", 5, "--out", out) == 0
    grid = pixels(out)
    assert grid.shape == (3 * 66 + 2, 5 * 66 + 2, 3)  # 3 faces, 5 steps each, make_grid's 2 px padding
    vectors = quality.load_attribute_vectors(trained / "vae_celeba.attributes.pt")
    v = vectors["vectors"][vectors["names"].index("Smiling")]
    z = quality.draw_latents(3, 128, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ends = model_of(trained).decode(torch.cat([z - 2 * v, z, z + 2 * v]))
    for col, images in zip((0, 2, 4), ends.split(3)):  # -S, 0 and +S
        for row, image in enumerate(images):
            face = grid[2 + 66 * row:66 * (row + 1), 2 + 66 * col:66 * (col + 1)].astype(int)
            assert np.abs(face - quality.to_uint8(image).permute(1, 2, 0).numpy()).max() <= 1


def test_an_unknown_attribute_lists_the_known_ones(trained):
    line = one_line_error("--weights", trained / "vae_celeba.pth", "--attribute", "Wearing_Hat")
    assert "Wearing_Hat" in line and "Smiling, Wearing_Lipstick" in line and "Eyeglasses" in line


@pytest.mark.flag_effect("generate.py", "--crop")
def test_crop_changes_what_the_model_sees(trained, faces_dir, tmp_path):
    face = faces_dir / "000003.jpg"
    for crop in ("center", "none"):
        assert gen(trained, "--reconstruct", face, "--crop", crop, "--out", tmp_path / f"{crop}.png") == 0
    center, whole = pixels(tmp_path / "center.png"), pixels(tmp_path / "none.png")
    assert np.array_equal(center[2:66, 2:66], generate.read_image(face, "center").permute(1, 2, 0).numpy())
    assert np.array_equal(whole[2:66, 2:66], generate.read_image(face, "none").permute(1, 2, 0).numpy())
    assert not np.array_equal(center, whole)


@pytest.fixture(scope="module")
def old_run(trained, tmp_path_factory):
    """A copy of the run's weights alone, as a run made before the GMM and attribute files existed."""
    folder = tmp_path_factory.mktemp("old_run")
    (folder / "vae_celeba.pth").write_bytes((trained / "vae_celeba.pth").read_bytes())
    return folder


@pytest.mark.flag_effect("generate.py", "--fit-gmm")
def test_fit_gmm_writes_the_mixture_and_the_attribute_vectors_for_an_old_run(old_run, shards, tmp_path):
    weights = old_run / "vae_celeba.pth"
    line = one_line_error("--weights", weights, "--sampler", "gmm", "--out", tmp_path / "x.png")
    assert "--fit-gmm" in line  # before: the GMM is missing, and the line says how to make it
    assert generate.run(["--fit-gmm", str(weights), "--data-path", str(shards)]) == 0
    gmm = torch.load(old_run / "vae_celeba.gmm.pt", weights_only=True)
    assert gmm["means"].shape == (10, 128) and gmm["codes"] == json.loads(
        (shards / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    vectors = quality.load_attribute_vectors(old_run / "vae_celeba.attributes.pt")
    assert "Smiling" in vectors["names"] and vectors["vectors"].shape[1] == 128
    assert generate.run(["--weights", str(weights), "--sampler", "gmm", "--out", str(tmp_path / "g.png")]) == 0


@pytest.mark.flag_effect("generate.py", "--evaluate")
@pytest.mark.flag_effect("generate.py", "--data-path")
@pytest.mark.flag_effect("generate.py", "--images")
def test_evaluate_appends_the_swd_of_each_sampler_to_metrics(trained, shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("vae_celeba.pth", "vae_celeba.gmm.pt", "metrics.jsonl"):
        (run / name).write_bytes((trained / name).read_bytes())
    before = (run / "metrics.jsonl").read_text()
    assert generate.run(["--weights", str(run / "vae_celeba.pth"), "--evaluate", "--data-path", str(shards),
                         "--images", "12", "--seed", "1"]) == 0
    text = (run / "metrics.jsonl").read_text()
    assert text.startswith(before)
    row = json.loads(text.splitlines()[-1])
    assert row["kind"] == "evaluate" and row["swd_images"] == 12 and row["swd_seed"] == 1
    for name in ("prior", "gmm", "reconstructions"):
        assert len(row["swd_levels"][name]) == 3 and row[f"swd_{name}"] > 0
    assert {"val_active_units_cov", "val_active_dims_kl"} <= row.keys()
    assert generate.run(["--weights", str(run / "vae_celeba.pth"), "--evaluate", "--data-path",
                         str(tmp_path / "nowhere")]) == 1


@pytest.mark.flag_effect("generate.py", "--fid-weights")
def test_fid_weights_are_checked_before_they_are_read_as_a_network(trained, shards, tmp_path, capsys):
    planted = tmp_path / "PWNED"
    bad = tmp_path / "inception.pt"
    torch.save({"conv.weight": FileMaker(planted)}, bad)  # unpickling it would create `planted`

    def one_line(*argv):  # in this process: the check comes before anything is loaded
        assert gen(trained, "--evaluate", "--data-path", shards, *argv) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ")
        return line

    for fid_flags in (["--fid", "4"], []):  # with FID asked for, and with the default (off on the CPU)
        line = one_line(*fid_flags, "--fid-weights", bad)
        assert str(bad) in line and "not the" in line and not planted.exists() and not (ROOT / "PWNED").exists()
    assert "no such file" in one_line("--fid", 4, "--fid-weights", tmp_path / "missing.pt")


class FileMaker:
    """Pickles as a call that creates a file: what a hostile weights file would do when unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def parse_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        generate.parse_args([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and err.endswith(" --help)\n"), err
    return err


@pytest.mark.parametrize("argv, reason", [
    (["--temperature", "nan"], "expected a finite number, not 'nan'"),
    (["--temperature", "inf"], "expected a finite number, not 'inf'"),
    (["--temperature", "-1"], "must be at least 0"),
    (["--out", "faces"], "expected a file name ending in .png, .jpg, .jpeg, not 'faces'"),
    (["--out", "faces.txt"], "not 'faces.txt'"),
    (["--samples", "0"], "a whole number of at least 1"),
    (["--steps", "1", "--interpolate", "a.jpg", "b.jpg"], "a whole number of at least 2"),
    (["--reconstruct", "a.jpg", "--temperature", "0.5"], "--temperature goes with --samples or --attribute, "
                                                         "not with --reconstruct"),
    (["--samples", "4", "--limit", "3"], "--limit goes with --reconstruct, not with --samples"),
    (["--steps", "4"], "--steps goes with --interpolate or --attribute, not with --samples"),
    (["--fid", "8"], "--fid goes with --evaluate, not with --samples"),
    (["--fid-weights", "x.pt"], "--fid-weights goes with --evaluate, not with --samples"),
    (["--evaluate", "--fid", "1"], "must be 0 (off) or at least 2 images, not 1"),
    (["--evaluate", "--out", "x.png"], "--out goes with"),
    (["--interpolate", "a.jpg", "b.jpg", "--sampler", "gmm"], "--sampler goes with --samples or --attribute"),
    (["--attribute", "Smiling", "--reconstruct", "a.jpg"], "not allowed with argument"),
])
def test_generate_flags_are_checked_before_anything_runs(argv, reason, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = parse_error(capsys, *argv)
    assert reason in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_flag_given_its_default_value_with_another_mode_is_still_refused(capsys):
    err = parse_error(capsys, "--reconstruct", "a.jpg", "--seed", "0")
    assert "--seed goes with" in err
