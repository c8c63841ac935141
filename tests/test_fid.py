"""model/fid.py and pipeline/fid_stats.py: the Fréchet distance, KID, the FID network's file and its
check, the real network on synthetic faces, and the reals' statistics cached beside the shards; and
their wiring (run/fid_plan.py): train.py's and generate.py's --fid and --fid-weights."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

import generate
import train
from conftest import copy_shards, split_keys
from model import fid
from pipeline import fid_stats
from pipeline.torch_loader import decode_resized_batch
from run import fid_plan

NETWORK = fid.packaged_file()
needs_network = pytest.mark.skipif(NETWORK is None, reason="the FID network's file is not installed: "
                                   f"{fid.INSTALL} (the README's test command installs it)")


def inception_like(n: int, dim: int, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Non-negative, correlated features of the Inception pool's scale (means ~0.3, values up to ~5)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    return F.relu(torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix + shift).to(torch.float32)


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula in float64: scipy's sqrtm of the product of the covariances."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(covmean.imag).max() < 1e-6 if np.iscomplexobj(covmean) else True
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


# ----------------------------------------------------------------------------- the arithmetic


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_frechet_distance_matches_scipy_sqrtm_in_float64(shift):
    a, b = inception_like(700, 96, seed=1), inception_like(500, 96, shift=shift, seed=2)
    want = reference_fid(a.double().numpy(), b.double().numpy())
    have = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
    assert want > 0.5 and have == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert fid.frechet_distance_of_features(a, b) == pytest.approx(want, rel=1e-9, abs=1e-9)
    mu, cov = fid.statistics(a)
    assert mu.dtype == cov.dtype == torch.float64
    np.testing.assert_allclose(cov.numpy(), np.cov(a.double().numpy(), rowvar=False), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n,dim", [(400, 64), (40, 256)])  # fewer images than dimensions: singular covariances
def test_fid_of_a_set_against_itself_is_zero(n, dim):
    a = inception_like(n, dim, seed=3)
    stats = fid.statistics(a)
    assert abs(fid.frechet_distance(*stats, *stats)) < 1e-6
    assert abs(fid.frechet_distance_of_features(a, a)) < 1e-6
    shifted = fid.frechet_distance(*stats, *fid.statistics(a + 0.05))
    assert shifted == pytest.approx(0.05**2 * dim, rel=1e-6)  # only the means' term
    assert fid.frechet_distance_of_features(a, a + 0.05) == pytest.approx(shifted, rel=1e-6)


def test_both_ways_agree_on_singular_covariances():
    a, b = inception_like(30, 256, seed=8), inception_like(45, 256, shift=0.1, seed=9)
    via_statistics = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
    assert fid.frechet_distance_of_features(a, b) == pytest.approx(via_statistics, rel=1e-7)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_kid_matches_torchmetrics_on_the_same_features(monkeypatch):
    from torchmetrics.image.kid import KernelInceptionDistance  # here: the reference, a test-only dependency

    real, fake = inception_like(130, 64, seed=4).double(), inception_like(90, 64, shift=0.2, seed=5).double()
    # The features themselves go in, through an identity "network".
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=100, subset_size=60)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(7)  # torchmetrics draws its subsets from the global generator, real then fake
    want_mean, want_std = (float(t) for t in metric.compute())
    mean, std = fid.kid(real, fake, subset=60, subsets=100, seed=7)
    assert mean == pytest.approx(want_mean, rel=1e-9) and std == pytest.approx(want_std, rel=1e-9)
    monkeypatch.setattr(fid, "KID_WHOLE", 10)  # each subset's kernels computed on their own: the same KID
    assert fid.kid(real, fake, subset=60, subsets=100, seed=7) == pytest.approx((mean, std), rel=1e-9)
    assert mean > 3 * std > 0


def test_kid_subsets_shrink_to_the_smaller_set_and_results_carry_the_counts():
    real, fake = inception_like(40, 16, seed=6), inception_like(30, 16, shift=0.5, seed=7)
    out = fid.scores(real, fake)
    assert out["images"] == 30 and out["real_images"] == 40
    assert out["kid"] == fid.kid(real, fake, subset=30)[0] and out["fid"] > 0
    big_real, big_fake = inception_like(300, 16, seed=10), inception_like(200, 16, seed=11)  # N1·N2 > D²
    stats = fid.statistics(big_real)
    assert fid.scores(big_real, big_fake, stats)["fid"] == fid.frechet_distance(*stats, *fid.statistics(big_fake))


def test_preprocessing_is_stylegan_s_resize_and_range():
    """StyleGAN2-ADA's op sequence: the source coordinate of output pixel i is i * 64/299 (TF1's
    resize_bilinear), clamped at the border, on float values 0..255, then x/128 - 1."""
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    images[0, 0, 0, 0], images[0, 0, 1, 1] = 0, 255
    x = fid.preprocess(images)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 0.9921875
    src = torch.arange(299, dtype=torch.float64) * 64 / 299
    lo = src.floor().long()
    hi, t = (lo + 1).clamp(max=63), src - lo
    v = images.double()
    rows = v[..., lo, :] * (1 - t)[:, None] + v[..., hi, :] * t[:, None]
    want = rows[..., lo] * (1 - t) + rows[..., hi] * t
    torch.testing.assert_close(x.double(), want / 128 - 1, atol=2e-5, rtol=0)
    assert float(x[0, 0, 0, 0]) == -1.0  # output pixel 0 is input pixel 0 exactly
    # The loaders' and the cache's batches are channels_last views: the same result.
    torch.testing.assert_close(fid.preprocess(images.contiguous(memory_format=torch.channels_last)), x)
    with pytest.raises(ValueError, match="uint8"):
        fid.preprocess(images.float())


# ----------------------------------------------------------------------------- the network's file


def test_without_the_package_one_line_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(fid.FidError, match="never downloaded") as info:
        fid.load_network()
    assert fid.INSTALL in str(info.value) and "\n" not in str(info.value)


def test_a_missing_path_is_one_line(tmp_path):
    with pytest.raises(fid.FidError, match="no such file"):
        fid.load_network(tmp_path / "missing.pt")


@needs_network
def test_the_packaged_file_is_found_without_importing_the_package():
    import sys

    assert fid.PACKAGE not in sys.modules  # nothing imported it: find_spec located the folder only
    assert NETWORK.stat().st_size == fid.FILE_BYTES


@needs_network
def test_a_changed_byte_is_refused_before_loading(tmp_path, monkeypatch):
    copy = changed_copy(tmp_path)
    loads = []
    monkeypatch.setattr(fid.torch.jit, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(fid.FidError, match="SHA-256") as info:
        fid.load_network(copy)
    assert "\n" not in str(info.value) and fid.INSTALL in str(info.value) and loads == []
    with open(copy, "ab") as f:
        f.write(b"\0")
    with pytest.raises(fid.FidError, match="bytes, not the"):
        fid.load_network(copy)
    assert loads == []


# ----------------------------------------------------------------------------- the real network, CPU

HALF = 12  # images per set, 4 sets through Inception (a few images per second per core); the order holds from 8


@pytest.fixture(scope="module")
def network():
    return fid.load_network(device="cpu")


@pytest.fixture(scope="module")
def faces(faces_dir) -> torch.Tensor:
    """2 * HALF synthetic faces as the loaders make them: uint8 (N, 3, 64, 64)."""
    jpegs = [p.read_bytes() for p in sorted(faces_dir.glob("*.jpg"))[:2 * HALF]]
    return decode_resized_batch(jpegs, "center").permute(0, 3, 1, 2).contiguous()


@needs_network
def test_real_network_orders_halves_blur_and_noise(network, faces, tmp_path):
    a, b = faces[:HALF], faces[HALF:]
    blurred = gaussian_blur(b, kernel_size=9, sigma=3.0)
    noise = torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = fid.features(network, torch.cat([a, b, blurred, noise]), batch=16)
    assert feats.shape == (4 * HALF, fid.DIM) and feats.dtype == torch.float32 and (feats >= 0).all()
    real, fb, fblur, fnoise = feats.split(HALF)
    out = {name: fid.scores(real, f) for name, f in (("halves", fb), ("blur", fblur), ("noise", fnoise))}
    assert out["halves"]["fid"] < out["blur"]["fid"] < out["noise"]["fid"], out
    assert out["halves"]["kid"] < out["blur"]["kid"] < out["noise"]["kid"], out
    assert all(o["images"] == HALF for o in out.values())
    # The batch does not change the features; a copy of the file from a path gives the same network.
    copy = tmp_path / "inception.pt"
    shutil.copyfile(NETWORK, copy)
    again = fid.features(fid.load_network(copy), a[:2], batch=1)
    torch.testing.assert_close(again, real[:2], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the reals' statistics file

DIM = 8


class Counted:
    """A compute() for fid_stats.cached that counts its calls and returns statistics of random features."""

    def __init__(self, count: int, seed: int = 0):
        self.calls, self.count, self.seed = 0, count, seed

    def __call__(self) -> dict:
        self.calls += 1
        feats = inception_like(self.count, DIM, seed=self.seed + self.calls)
        mean, cov = fid.statistics(feats)
        return {"mean": mean, "cov": cov, "features": feats}


def cached(data, keys, compute, network=fid.IDENTITY, crop="center"):
    return fid_stats.cached(data, "val", keys, crop, network, "torch-cpu (test)", compute, dim=DIM)


@pytest.fixture
def data(shards, tmp_path):
    return copy_shards(shards, tmp_path / "shards")


KEYS = [f"{i:06d}" for i in range(1, 13)]


def test_statistics_are_reused_when_they_match(data):
    compute = Counted(len(KEYS))
    first, note = cached(data, KEYS, compute)
    assert compute.calls == 1 and "written to" in note and "none yet" in note
    path = data / fid_stats.file_name("val", "center", len(KEYS))
    assert path.is_file() and path.stat().st_size == fid_stats.HEADER_BYTES + fid_stats.payload_bytes(12, DIM)
    second, note = cached(data, KEYS, compute)
    assert compute.calls == 1 and "read from" in note
    for name in ("mean", "cov", "features"):
        assert torch.equal(first[name], second[name]) and second[name].dtype == first[name].dtype


@pytest.mark.parametrize("damage,why", [
    (lambda p: p.write_bytes(p.read_bytes()[:-8]), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1])), "CRC-32"),
    (lambda p: p.write_bytes(b"\0" * p.stat().st_size), "not a FID statistics file"),
])
def test_a_damaged_file_is_recomputed_and_replaced(data, damage, why):
    compute = Counted(len(KEYS))
    cached(data, KEYS, compute)
    path = data / fid_stats.file_name("val", "center", len(KEYS))
    damage(path)
    stats, note = cached(data, KEYS, compute)
    assert compute.calls == 2 and why in note and "written to" in note and "\n" not in note
    again, note = cached(data, KEYS, compute)
    assert compute.calls == 2 and "read from" in note and torch.equal(again["features"], stats["features"])


@pytest.mark.parametrize("change,field", [
    (dict(network="sha256:" + "0" * 64 + " another resize"), "network"),
    (dict(keys=KEYS[::-1]), "keys"),  # the same count, other images or order
])
def test_a_foreign_file_is_never_read(data, change, field):
    compute = Counted(len(KEYS))
    theirs, _ = cached(data, **{"keys": KEYS, "compute": compute, **change})
    ours, note = cached(data, KEYS, compute)
    assert compute.calls == 2 and f"its {field} is" in note
    assert not torch.equal(ours["features"], theirs["features"])
    assert cached(data, KEYS, compute)[1].startswith("FID statistics of val read from")


def test_a_rebuilt_manifest_or_a_link_is_not_read(data, tmp_path):
    compute = Counted(len(KEYS))
    cached(data, KEYS, compute)
    manifest = data / "manifest.json"
    manifest.write_bytes(manifest.read_bytes() + b"\n")
    _, note = cached(data, KEYS, compute)
    assert compute.calls == 2 and "its manifest is" in note
    path = data / fid_stats.file_name("val", "center", len(KEYS))
    elsewhere = tmp_path / "elsewhere.stats"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    _, note = cached(data, KEYS, compute)
    assert compute.calls == 3 and "link" in note and not path.is_symlink()  # replaced by a regular file


def test_a_file_of_non_finite_numbers_with_a_good_crc_is_refused(data):
    def poisoned():
        feats = inception_like(len(KEYS), DIM)
        return {"mean": torch.full((DIM,), float("nan"), dtype=torch.float64), "cov": fid.statistics(feats)[1],
                "features": feats}

    cached(data, KEYS, poisoned)
    compute = Counted(len(KEYS))
    _, note = cached(data, KEYS, compute)
    assert compute.calls == 1 and "not finite" in note


def test_the_cache_file_name_comes_from_the_run_only():
    assert fid_stats.file_name("val", "center", 2048) == "fid-val-center-2048.stats"
    for bad in (("../val", "center", 10), ("val", "center/..", 10), ("val", "center", 1), ("val", "center", True)):
        with pytest.raises(ValueError):
            fid_stats.file_name(*bad)


# ----------------------------------------------------------------------------- --fid and --fid-weights

SETS = ("prior", "gmm", "reconstructions")


def changed_copy(folder: Path) -> Path:
    """A copy of the network's file with one byte changed: its size is right, its SHA-256 is not."""
    copy = folder / "default_1.pt"
    shutil.copyfile(NETWORK, copy)
    with open(copy, "r+b") as f:
        f.seek(fid.FILE_BYTES // 3)
        byte = f.read(1)
        f.seek(fid.FILE_BYTES // 3)
        f.write(bytes([byte[0] ^ 0x80]))
    return copy


class PooledColours(torch.nn.Module):
    """A stand-in for the network where the assertion is about the wiring: (N, 3, 299, 299) -> (N, 2048)
    non-negative features of pooled colours, fixed weights, thousands of images per second."""

    def __init__(self):
        super().__init__()
        self.project = torch.nn.Linear(3 * 4 * 4, fid.DIM)
        with torch.no_grad():
            self.project.weight.copy_(torch.randn(fid.DIM, 48, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return F.relu(self.project(F.adaptive_avg_pool2d(x, 4).flatten(1)))


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_fid_counts_default_to_cuda_only():
    assert fid_plan.images(None, "cuda") == fid_plan.CUDA_IMAGES
    assert fid_plan.images(None, "cpu") == 0
    assert fid_plan.images(0, "cuda") == 0 and fid_plan.images(8, "cpu") == 8


@pytest.mark.flag_effect("train.py", "--fid")
def test_the_cpu_default_leaves_fid_off(trained, shards):
    row = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert "swd_prior" in row and not any(k.startswith(("fid", "kid")) for k in row)
    assert not list(shards.glob("fid-*.stats"))


@needs_network
@pytest.mark.flag_effect("train.py", "--fid")
def test_train_with_fid_n_writes_fid_and_kid_into_the_last_row(tiny, tmp_path, monkeypatch, capsys):
    networks = []
    monkeypatch.setattr(fid, "load_network", lambda path=None, device="cpu": networks.append(path) or PooledColours())
    out = tmp_path / "run"
    # The resident cache: the reals' file names the loader that filled it (generate.py's test: a loader's own)
    assert train.main(train.parse_args(["--data-path", str(tiny), "--output-dir", str(out), "--batch-size", "8",
                                        "--workers", "1", "--epochs", "1", "--cache", "on", "--no-compile",
                                        "--fid", "4"])) == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    n = len(split_keys(tiny, "val"))  # 3: --fid 4 takes the whole split when it has fewer
    assert networks == [None] and n < 4 and last["fid_images"] == last["fid_real_images"] == n
    for name in SETS:
        assert last[f"fid_{name}"] > 0 and f"kid_{name}" in last and last[f"kid_std_{name}"] >= 0
    assert (tiny / fid_stats.file_name("val", "center", n)).is_file()  # the reals' statistics, beside the shards
    printed = capsys.readouterr().out
    assert "cached val:" in printed and "FID statistics of val computed" in printed


@needs_network
@pytest.mark.flag_effect("train.py", "--fid-weights")
def test_train_refuses_changed_fid_weights_in_one_line_before_anything(tiny, tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(fid.torch.jit, "load", lambda *a, **k: loads.append(a))
    out = tmp_path / "run"
    assert train.run(["--data-path", str(tiny), "--output-dir", str(out), "--fid", "4",
                      "--fid-weights", str(changed_copy(tmp_path))]) == 1
    line = one_line(capsys)
    assert "SHA-256" in line and fid.INSTALL in line and loads == [] and not out.exists()


@needs_network
@pytest.mark.flag_effect("generate.py", "--fid")
def test_generate_evaluate_reports_fid_and_kid_from_the_real_network(trained, shards, tmp_path, capsys):
    run, data = tmp_path / "run", copy_shards(shards, tmp_path / "shards")
    run.mkdir()
    for name in ("vae_celeba.pth", "vae_celeba.gmm.pt", "metrics.jsonl"):
        shutil.copyfile(trained / name, run / name)
    # 4 images per set: 16 through the network, a few seconds on 2 cores
    assert generate.run(["--weights", str(run / "vae_celeba.pth"), "--evaluate", "--data-path", str(data),
                         "--images", "4", "--fid", "4"]) == 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["kind"] == "evaluate" and row["fid_images"] == 4 and row["swd_images"] == 4
    for name in SETS:
        assert row[f"fid_{name}"] > 0 and f"kid_{name}" in row
    out = capsys.readouterr().out
    assert f"written to {data / fid_stats.file_name('val', 'center', 4)}" in out and "fid_prior" in out


@needs_network
@pytest.mark.flag_effect("generate.py", "--fid-weights")
def test_generate_refuses_changed_fid_weights_in_one_line_before_loading(trained, shards, tmp_path, monkeypatch,
                                                                          capsys):
    loads = []
    monkeypatch.setattr(fid.torch.jit, "load", lambda *a, **k: loads.append(a))
    assert generate.run(["--weights", str(trained / "vae_celeba.pth"), "--evaluate", "--data-path", str(shards),
                         "--fid", "4", "--fid-weights", str(changed_copy(tmp_path))]) == 1
    line = one_line(capsys)
    assert "SHA-256" in line and "refused unloaded" in line and loads == []


def test_fid_asked_for_without_the_package_is_one_line_and_the_cuda_default_goes_on(trained, shards, monkeypatch,
                                                                                     capsys):
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    assert generate.run(["--weights", str(trained / "vae_celeba.pth"), "--evaluate", "--data-path", str(shards),
                         "--fid", "4"]) == 1
    assert fid.INSTALL in one_line(capsys)
    assert fid_plan.network(None, "cpu", asked=False) is None  # the default on CUDA: a warning, no FID
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("warning: no FID or KID") and fid.INSTALL in warning
