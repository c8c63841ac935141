"""What each flag of train.py, prep/shard.py and generate.py changes, shown at a value where a plausible
wrong implementation gives another answer (tests/test_flag_coverage.py requires a marked test per flag).

In process and small: train.py's flags through its own parse_args and build_loaders, or main() stopped
where the flag has been used; one short run for what only a run shows; generate.py on a small
untrained model; prep/shard.py on a few faces.
"""

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

import generate
import train
from conftest import split_keys
from model import BETA, VariationalAutoEncoder, vae_loss
from model.step import TrainStep, make_optimizer
from pipeline.cache import CachedLoader
from pipeline.dali_loader import DaliLoader
from pipeline.torch_loader import TorchLoader
from prep import shard
from test_model import reference_loss

CPU = torch.device("cpu")


def train_args(shards, out, *extra):
    return train.parse_args(["--data-path", str(shards), "--output-dir", str(out), "--workers", "0",
                             "--no-compile", "--cache", "off", *extra])


def loaders(shards, tmp_path, *extra, cached=()):
    """train.py's (train, val) loaders for these flags, yielding (images, keys)."""
    return train.build_loaders(train_args(shards, tmp_path / "out", *extra), CPU, 0, 1, cached, with_keys=True)


def by_key(loader, epoch=0):
    loader.set_epoch(epoch)
    return {k: image for images, keys in loader for k, image in zip(keys, images)}


def first_batch(loader):
    return next(iter(loader))


class Stop(Exception):
    """Ends train.main() where a test has seen what it needs."""


def main_until(monkeypatch, name, args):
    """Runs train.main(args) until it calls train.<name>, and returns that call's (args, kwargs)."""
    seen = {}

    def record(*a, **kw):
        seen["call"] = a, kw
        raise Stop
    monkeypatch.setattr(train, name, record)
    with pytest.raises(Stop):
        train.main(args)
    return seen["call"]


# ----------------------------------------------------------------------------- train.py: the loss


def kl_heavy_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, x_hat = torch.rand(4, 3, 64, 64, generator=g), torch.rand(4, 3, 64, 64, generator=g)
    mu, logvar = 2 * torch.randn(4, 16, generator=g), torch.rand(4, 16, generator=g) * 4 - 2
    return x_hat, x, mu, logvar


@pytest.mark.flag_effect("train.py", "--beta")
def test_beta_weighs_the_kl_in_the_loss():
    x_hat, x, mu, logvar = kl_heavy_batch()
    out = vae_loss(x_hat, x, mu, logvar, beta=0.5)
    want, bce, kl, _ = reference_loss(x_hat, x, mu, logvar, 0.5)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.bce.item() + 0.5 * out.kl.item(), rel=1e-6)
    # The default's loss is far from this one: a beta that did not reach the loss would show.
    assert abs((bce + BETA * kl) - want).item() > 1000 * 1e-5 * want.item()


@pytest.mark.flag_effect("train.py", "--beta")
def test_the_train_step_optimises_bce_plus_beta_kl():
    torch.manual_seed(0)
    model = VariationalAutoEncoder(z_dim=16)
    with torch.no_grad():  # a posterior far from the prior: the KL term is large
        model.hid_2mu.weight *= 50
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), CPU, channels_last=False, beta=0.5)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = step(images)
    assert out.kl.item() > 1
    assert out.loss.item() == pytest.approx(out.bce.item() + 0.5 * out.kl.item(), rel=1e-6)
    assert out.loss.item() > 2 * (out.bce.item() + BETA * out.kl.item())


@pytest.fixture(scope="module")
def short_run(shards, tmp_path_factory):
    """Two epochs of train.py with a non-default value of each flag it checks, and what it printed."""
    out = tmp_path_factory.mktemp("flags") / "run"
    args = train_args(shards, out, "--epochs", "2", "--batch-size", "16", "--beta", "0.5", "--z-dim", "16",
                      "--lr", "2e-3", "--seed", "5")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train.main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows, printed.getvalue()


@pytest.mark.flag_effect("train.py", "--beta")
def test_a_run_trains_and_evaluates_with_its_beta(short_run):
    _, rows, _ = short_run
    off_by = []  # how far each figure is from what the default beta would give
    for r, split in ((r, split) for r in rows for split in ("train", "val")):
        # Means over steps or images of bce + beta * kl: the relation holds for the means too.
        loss, bce, kl = (r[f"{split}_{k}"] for k in ("loss", "bce", "kl"))
        assert loss == pytest.approx(bce + 0.5 * kl, rel=2e-6)
        off_by.append(abs(loss - (bce + BETA * kl)) / loss)
    # At beta 0.5 the KL soon falls to almost nothing; the first epoch's still tells 0.5 from the default.
    assert max(off_by) > 100 * 2e-6


@pytest.mark.flag_effect("train.py", "--epochs")
@pytest.mark.flag_effect("train.py", "--z-dim")
@pytest.mark.flag_effect("train.py", "--lr")
@pytest.mark.flag_effect("train.py", "--batch-size")
def test_a_run_has_its_epochs_latent_size_learning_rate_and_batch(short_run, shards):
    out, rows, printed = short_run
    assert [r["epoch"] for r in rows] == [1, 2]
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2
    weights = torch.load(out / "vae_celeba.pth")
    assert weights["hid_2mu.weight"].shape[0] == weights["z_2hid.weight"].shape[1] == 16
    assert all(r["val_active_dims"] <= 16 for r in rows)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [2e-3] and all(r["lr"] == 2e-3 for r in rows)
    train_images = len(split_keys(shards, "train"))
    steps = train_images // 16
    assert f"{steps * 16} training images per epoch, {steps} steps of 16 x 1" in printed


@pytest.mark.flag_effect("train.py", "--lr")
def test_lr_is_the_size_of_adams_first_step():
    """Adam's first update is lr * |g| / (|g| + eps) per element: lr itself wherever the gradient is not tiny."""
    torch.manual_seed(0)
    model = VariationalAutoEncoder(z_dim=16)
    step = TrainStep(model, make_optimizer(model.parameters(), 2e-3, CPU), CPU, channels_last=False)
    before = [p.detach().clone() for p in model.parameters()]
    step(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    params = list(model.parameters())
    moved = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(params, before)])
    grad = torch.cat([p.grad.abs().flatten() for p in params])
    torch.testing.assert_close(moved, 2e-3 * grad / (grad + 1e-8), rtol=1e-3, atol=1e-8)  # Adam's eps is 1e-8
    assert (moved > 1.9e-3).float().mean() > 0.25


# ----------------------------------------------------------------------------- train.py: the data


@pytest.mark.flag_effect("train.py", "--data-path")
@pytest.mark.flag_effect("train.py", "--batch-size")
def test_the_loaders_read_data_path_in_batches_of_batch_size(shards, tmp_path):
    train_loader, val_loader = loaders(shards, tmp_path, "--batch-size", "24")
    batches = list(train_loader)
    assert [len(images) for images, _ in batches] == [24] * (len(split_keys(shards, "train")) // 24)
    assert set(k for _, keys in batches for k in keys) <= set(split_keys(shards, "train"))
    assert [k for _, keys in val_loader for k in keys] == split_keys(shards, "val")


@pytest.mark.flag_effect("train.py", "--loader")
def test_loader_picks_the_decoding_loader(shards, tmp_path):
    for name, kind in (("torch", TorchLoader), ("dali", DaliLoader)):
        train_loader, val_loader = loaders(shards, tmp_path, "--loader", name)
        assert isinstance(train_loader, kind) and isinstance(val_loader, kind)
    # Cached: the images are those its --loader decoded, and DALI's decoder rounds differently from the torch one's.
    cached = {name: first_batch(loaders(shards, tmp_path, "--loader", name, cached=("val",))[1])[0]
              for name in ("torch", "dali")}
    streamed = {name: first_batch(loaders(shards, tmp_path, "--loader", name)[1])[0] for name in ("torch", "dali")}
    assert all(torch.equal(cached[name], streamed[name]) for name in cached)
    assert not torch.equal(streamed["torch"], streamed["dali"])


@pytest.mark.flag_effect("train.py", "--crop")
def test_crop_is_the_region_the_loaders_resize(shards, tmp_path):
    from pipeline import build_loader
    images = {}
    for crop in ("center", "none"):
        got, keys = first_batch(loaders(shards, tmp_path, "--crop", crop)[1])
        want, want_keys = first_batch(build_loader("torch", shards, "val", 128, CPU, workers=0, crop=crop,
                                                   with_keys=True))
        assert keys == want_keys and torch.equal(got, want)
        images[crop] = got
    assert (images["center"].float() - images["none"].float()).abs().mean() > 5


@pytest.mark.flag_effect("train.py", "--flip")
def test_no_flip_trains_on_the_images_as_they_are_and_flip_mirrors_about_half(shards, tmp_path):
    from pipeline import build_loader
    plain = by_key(build_loader("torch", shards, "train", 16, CPU, train=False, workers=0, with_keys=True))
    assert all(not torch.equal(image, image.flip(-1)) for image in plain.values())  # a flip would show
    for flag, low, high in (("--no-flip", 0, 0), ("--flip", 0.25, 0.75)):
        train_loader, _ = loaders(shards, tmp_path, flag)
        for epoch in (0, 1):
            seen = by_key(train_loader, epoch)
            mirrored = sum(torch.equal(image, plain[k].flip(-1)) for k, image in seen.items())
            assert mirrored + sum(torch.equal(image, plain[k]) for k, image in seen.items()) == len(seen)
            assert low <= mirrored / len(seen) <= high, (flag, epoch, mirrored)


@pytest.mark.flag_effect("train.py", "--seed")
def test_seed_sets_the_data_order_and_the_first_weights(shards, tmp_path, monkeypatch):
    def order(seed):
        return [k for _, keys in loaders(shards, tmp_path, "--seed", seed)[0] for k in keys]
    assert order("1") == order("1") != order("2")

    def first_weights(seed):
        (params, *_), _ = main_until(monkeypatch, "make_optimizer", train_args(shards, tmp_path / seed, "--seed", seed))
        return torch.cat([p.detach().flatten() for p in params])
    assert torch.equal(first_weights("1"), first_weights("1"))
    assert not torch.equal(first_weights("1"), first_weights("2"))


@pytest.mark.flag_effect("train.py", "--workers")
def test_workers_change_how_fast_images_come_not_which(shards, tmp_path):
    """Evaluation batches, and a cached split's training batches, are the same for any worker count. The
    torch loader's streamed training epoch holds the same images, but not in the same order or with the
    same flips: each worker shuffles and flips its own run of samples."""
    runs = {}
    for workers in ("0", "2"):
        args = train_args(shards, tmp_path / "out", "--workers", workers)
        train_loader, val_loader = train.build_loaders(args, CPU, 0, 1, ("train",), with_keys=True)
        assert isinstance(train_loader, CachedLoader) and val_loader.loader.num_workers == int(workers)
        runs[workers] = list(val_loader), list(train_loader)
    (val0, train0), (val2, train2) = runs["0"], runs["2"]
    for a, b in ((val0, val2), (train0, train2)):
        assert len(a) == len(b) and all(ka == kb and torch.equal(ia, ib) for (ia, ka), (ib, kb) in zip(a, b))
    streamed = [[k for _, keys in loaders(shards, tmp_path, "--workers", workers)[0] for k in keys]
                for workers in ("0", "2")]
    assert sorted(streamed[0]) == sorted(streamed[1])  # the same images in an epoch


@pytest.mark.flag_effect("train.py", "--cache")
def test_cache_decides_which_splits_are_decoded_once(shards, tmp_path, monkeypatch):
    def cached(*extra):
        args = train_args(shards, tmp_path / "out", *extra)  # --cache off unless extra says otherwise
        (_, _, _, _, splits), _ = main_until(monkeypatch, "build_loaders", args)
        return list(splits), args.cache
    assert cached("--epochs", "3") == ([], "off")
    assert cached("--epochs", "3", "--cache", "on") == (["train", "val"], "on")
    assert cached("--epochs", "1", "--cache", "on") == (["train", "val"], "on")
    assert cached("--epochs", "3", "--cache", "auto") == (["train", "val"], "on")
    assert cached("--epochs", "1", "--cache", "auto") == ([], "off")  # one pass: filling would be a second
    monkeypatch.undo()
    train_loader, _ = loaders(shards, tmp_path, cached=("train",))
    assert isinstance(train_loader, CachedLoader)


# ----------------------------------------------------------------------------- train.py: how the step runs


def step_of(monkeypatch, shards, tmp_path, *extra):
    """(model, optimizer, device, TrainStep's keyword arguments) that train.main builds for these flags."""
    (model, optimizer, device), kw = main_until(monkeypatch, "TrainStep", train_args(shards, tmp_path / "out", *extra))
    return model, optimizer, device, kw


@pytest.mark.flag_effect("train.py", "--amp")
@pytest.mark.flag_effect("train.py", "--channels-last")
@pytest.mark.flag_effect("train.py", "--compile")
@pytest.mark.flag_effect("train.py", "--device")
def test_main_builds_the_step_the_flags_ask_for(monkeypatch, shards, tmp_path):
    model, optimizer, device, kw = step_of(monkeypatch, shards, tmp_path, "--amp", "off", "--device", "cpu")
    assert device == CPU and kw["amp"] == "off" and kw["channels_last"] is True and kw["compile"] is False
    assert model.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert next(model.parameters()).device == CPU
    model, _, _, kw = step_of(monkeypatch, shards, tmp_path, "--amp", "bf16", "--no-channels-last", "--compile",
                              "--beta", "0.5")
    assert (kw["amp"], kw["channels_last"], kw["compile"], kw["beta"]) == ("bf16", False, True, 0.5)
    assert not model.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert step_of(monkeypatch, shards, tmp_path, "--amp", "fp16")[3]["amp"] == "fp16"


def step_output(amp="off", channels_last=True, compile=False):
    torch.manual_seed(0)
    model = VariationalAutoEncoder(z_dim=16).to(memory_format=torch.channels_last if channels_last
                                                else torch.contiguous_format)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), CPU, amp=amp, channels_last=channels_last,
                     compile=compile)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same reparameterisation noise
    return step, step.forward_loss(images)


@pytest.mark.flag_effect("train.py", "--amp")
def test_amp_runs_the_model_in_low_precision_and_the_loss_in_fp32():
    _, fp32 = step_output("off")
    step, bf16 = step_output("bf16")
    with step.autocast():
        assert step.model(torch.rand(2, 3, 64, 64))[0].dtype == torch.bfloat16
    assert bf16.loss.dtype == torch.float32 and bf16.loss.item() != fp32.loss.item()
    assert bf16.loss.item() == pytest.approx(fp32.loss.item(), rel=0.02)
    assert step_output("fp16")[0].scaler.is_enabled() and not step.scaler.is_enabled()


@pytest.mark.flag_effect("train.py", "--channels-last")
def test_channels_last_changes_the_memory_layout_not_the_loss():
    step, nhwc = step_output(channels_last=True)
    plain_step, nchw = step_output(channels_last=False)
    images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    assert step.to_input(images).is_contiguous(memory_format=torch.channels_last)
    assert not plain_step.to_input(images).is_contiguous(memory_format=torch.channels_last)
    assert nhwc.loss.item() == pytest.approx(nchw.loss.item(), rel=1e-5)


@pytest.mark.flag_effect("train.py", "--compile")
def test_compile_wraps_the_forward_and_loss():
    step, _ = step_output()
    assert step.forward_loss == step._forward_loss
    compiled = TrainStep(step.model, step.optimizer, CPU, compile=True)
    assert compiled.forward_loss != compiled._forward_loss
    assert getattr(compiled.forward_loss, "_torchdynamo_orig_callable", None) == compiled._forward_loss


# ----------------------------------------------------------------------------- generate.py


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """An untrained z_dim=16 model whose faces change visibly with z, saved as train.py saves weights."""
    torch.manual_seed(0)
    model = VariationalAutoEncoder(z_dim=16)
    with torch.no_grad():
        model.z_2hid.weight *= 30
    path = tmp_path_factory.mktemp("weights") / "small.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def as_png(grid, path):
    save_image(grid, path)
    return pixels(path)


@pytest.mark.flag_effect("generate.py", "--temperature")
@pytest.mark.flag_effect("generate.py", "--seed")
@pytest.mark.flag_effect("generate.py", "--samples")
@pytest.mark.flag_effect("generate.py", "--weights")
def test_temperature_scales_the_noise_drawn_from_the_seed(small_weights, tmp_path):
    path, model = small_weights
    out = tmp_path / "t.png"
    assert generate.run(["--weights", str(path), "--samples", "4", "--temperature", "0.5", "--seed", "3",
                         "--out", str(out)]) == 0

    def expected(temperature, seed):
        eps = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return as_png(make_grid(model.decode(temperature * eps), nrow=2), tmp_path / f"{temperature}-{seed}.png")
    got = pixels(out)
    assert got.shape == (2 * 66 + 2, 2 * 66 + 2, 3)
    assert np.array_equal(got, expected(0.5, 3))
    # What a temperature squared, or another seed, would have drawn is visibly another picture.
    for temperature, seed in ((0.25, 3), (1.0, 3), (0.5, 4)):
        assert np.abs(expected(temperature, seed).astype(int) - got).mean() > 2, (temperature, seed)


@pytest.mark.flag_effect("generate.py", "--crop")
def test_generate_crops_as_asked(small_weights, faces_dir, tmp_path):
    path, _ = small_weights
    faces = {}
    for crop in ("center", "none"):
        out = tmp_path / f"{crop}.png"
        assert generate.run(["--weights", str(path), "--reconstruct", str(faces_dir / "000001.jpg"), "--crop", crop,
                             "--out", str(out)]) == 0
        faces[crop] = pixels(out)[2:66, 2:66]
        assert np.array_equal(faces[crop], generate.read_image(faces_dir / "000001.jpg", crop).permute(1, 2, 0).numpy())
    assert np.abs(faces["center"].astype(int) - faces["none"]).mean() > 5


@pytest.mark.flag_effect("generate.py", "--device")
def test_generate_runs_the_model_on_the_device_asked_for(small_weights, tmp_path, monkeypatch):
    path, _ = small_weights
    asked = []

    def load_model(weights, z_dim, device):
        asked.append(device)
        raise Stop
    monkeypatch.setattr(generate, "load_model", load_model)
    with pytest.raises(Stop):
        generate.main(generate.parse_args(["--weights", str(path), "--device", "meta"]))
    assert asked == [torch.device("meta")]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.flag_effect("generate.py", "--device")
def test_generate_on_cuda_draws_the_faces_it_draws_on_the_cpu(small_weights, tmp_path):
    path, _ = small_weights
    for device in ("cpu", "cuda"):
        assert generate.run(["--weights", str(path), "--samples", "4", "--device", device,
                             "--out", str(tmp_path / f"{device}.png")]) == 0
    assert np.abs(pixels(tmp_path / "cpu.png").astype(int) - pixels(tmp_path / "cuda.png")).max() <= 2


# ----------------------------------------------------------------------------- prep/shard.py


@pytest.fixture(scope="module")
def few_faces(faces_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("few") / "img_align_celeba"
    data.mkdir()
    for f in sorted(faces_dir.glob("*.jpg"))[:40]:
        shutil.copy2(f, data / f.name)
    return data


def shard_run(data, out, *extra):
    assert shard.main(["--data-path", str(data), "--output-dir", str(out), "--quiet", "--shard-size", "8",
                       *map(str, extra)]) == 0
    return json.loads((out / "manifest.json").read_text())


def stored(out, manifest):
    """split -> keys in stored order."""
    return {split: split_keys(out, split) for split in manifest["splits"]}


@pytest.mark.flag_effect("prep/shard.py", "--seed")
@pytest.mark.flag_effect("prep/shard.py", "--workers")
def test_shard_seed_reorders_within_splits_and_workers_change_nothing(few_faces, tmp_path):
    one = shard_run(few_faces, tmp_path / "one", "--workers", 1)
    two = shard_run(few_faces, tmp_path / "two", "--workers", 2)
    reseeded = shard_run(few_faces, tmp_path / "seed1", "--workers", 2, "--seed", 1)
    assert one["splits"] == two["splits"]  # names, counts, sizes and SHA-256 of every shard
    a, b = stored(tmp_path / "two", two), stored(tmp_path / "seed1", reseeded)
    assert {s: sorted(k) for s, k in a.items()} == {s: sorted(k) for s, k in b.items()}  # a key's split is its own
    assert a["train"] != b["train"]


@pytest.mark.flag_effect("prep/shard.py", "--seed")
def test_shard_seed_draws_other_synthetic_faces(tmp_path):
    for seed in (0, 1):
        assert shard.main(["--synthetic", "2", "--seed", str(seed), "--data-path",
                           str(tmp_path / str(seed) / "img_align_celeba"),
                           "--workers", "1", "--quiet"]) == 0
    faces = [(tmp_path / str(seed) / "img_align_celeba" / "000001.jpg").read_bytes() for seed in (0, 1)]
    assert faces[0] != faces[1]


@pytest.mark.flag_effect("prep/shard.py", "--quality")
def test_quality_is_the_jpeg_quality_of_reencoded_images(faces_dir, tmp_path):
    data = tmp_path / "img_align_celeba"
    data.mkdir()
    with Image.open(faces_dir / "000001.jpg") as im:
        im.save(data / "000001.jpg", "PNG")  # a PNG under a .jpg name: re-encoded
    blobs = {}
    for quality in (50, 95):
        out = tmp_path / f"q{quality}"
        manifest = shard_run(data, out, "--quality", quality, "--workers", 1)
        assert [r["file"] for r in manifest["reencoded"]] == ["000001.jpg"]
        (split,) = [s for s in manifest["splits"] if manifest["splits"][s]["num_samples"]]
        with open(out / manifest["splits"][split]["shards"][0]["idx"]) as f:
            _, offset, size, _ = f.read().splitlines()[1].split()
        blobs[quality] = (out / manifest["splits"][split]["shards"][0]["tar"]).read_bytes()[int(offset):][:int(size)]
        want = io.BytesIO()
        with Image.open(data / "000001.jpg") as im:
            im.convert("RGB").save(want, "JPEG", quality=quality)
        assert blobs[quality] == want.getvalue()
    assert len(blobs[50]) < len(blobs[95])
