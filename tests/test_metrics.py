"""The quality figures (model/metrics.py), train.evaluate's averaging of them, and model/figures.py's lines in z."""

import json
import math

import pytest
import torch

import train
from model import VariationalAutoEncoder, vae_loss
from model import figures, metrics
from model.step import TrainStep
from run.record import MetricsFile


def fixed_pair(seed=0, batch=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 64, 64, generator=g)
    x_hat = (x + 0.1 * torch.randn(batch, 3, 64, 64, generator=g) * torch.arange(1, batch + 1).view(-1, 1, 1, 1))
    return x_hat.clamp(0, 1), x


def test_mse_and_psnr_match_a_float64_computation():
    x_hat, x = fixed_pair()
    mse64 = ((x_hat.double() - x.double()) ** 2).mean(dim=(1, 2, 3))
    psnr64 = torch.tensor([10 * math.log10(1 / m) for m in mse64.tolist()], dtype=torch.float64)
    mse = metrics.mse_per_image(x_hat, x)
    assert mse.shape == (5,) and mse.dtype == torch.float32
    torch.testing.assert_close(mse.double(), mse64, rtol=1e-5, atol=0)
    torch.testing.assert_close(metrics.psnr(mse).double(), psnr64, rtol=0, atol=1e-4)
    # Images with more noise score lower: the figure is per image, not of the batch as a whole.
    assert torch.all(metrics.psnr(mse).diff() < 0)


def test_mse_is_computed_in_fp32_from_bf16_inputs():
    x_hat, x = fixed_pair(1)
    low = metrics.mse_per_image(x_hat.bfloat16(), x.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, metrics.mse_per_image(x_hat.bfloat16().float(), x.bfloat16().float()))


def test_a_perfect_reconstruction_has_a_finite_psnr():
    x = torch.rand(2, 3, 64, 64)
    assert metrics.psnr(metrics.mse_per_image(x, x)).tolist() == [100.0, 100.0]


def test_kl_per_dim_matches_the_closed_form_and_sums_to_the_loss_kl():
    g = torch.Generator().manual_seed(2)
    mu, logvar = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g).clamp(-4, 4)
    m, lv = mu.double(), logvar.double()
    expected = 0.5 * (m**2 + lv.exp() - 1 - lv)
    kl = metrics.kl_per_dim(mu, logvar)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)
    x = torch.rand(6, 3, 64, 64, generator=g)
    assert kl.sum(1).mean().item() == pytest.approx(vae_loss(x, x, mu, logvar).kl.item(), rel=1e-5)


def test_active_dims_counts_dimensions_above_the_threshold():
    mean_kl = torch.tensor([0.0, 0.009, 0.0101, 0.5, 3.0, 0.01])
    assert metrics.active_dims(mean_kl) == 3
    # The prior itself as posterior: every dimension inactive.
    assert metrics.active_dims(metrics.kl_per_dim(torch.zeros(4, 8), torch.zeros(4, 8)).mean(0)) == 0


def test_evaluate_averages_per_image_over_uneven_batches():
    torch.manual_seed(0)
    model = VariationalAutoEncoder(z_dim=32)
    with torch.no_grad():  # half the dimensions far from the prior, so the active count is not trivially 0
        model.hid_2mu.weight[:16] *= 100
    step = TrainStep(model, torch.optim.Adam(model.parameters()), "cpu", channels_last=False)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g) for n in (5, 2, 3)]
    result = train.evaluate(model, batches, step, beta=1e-3)
    assert model.training  # evaluate puts the model back in training mode

    with torch.no_grad():
        x = torch.cat(batches).float() / 255
        mu, logvar = model.encode(x)
        mse = ((model.decode(mu).double() - x.double()) ** 2).mean(dim=(1, 2, 3))
        mean_kl = metrics.kl_per_dim(mu, logvar).double().mean(0)
    assert result["mse"] == pytest.approx(mse.mean().item(), rel=1e-5)
    assert result["psnr"] == pytest.approx((-10 * torch.log10(mse)).mean().item(), abs=1e-4)
    assert result["kl"] == pytest.approx(mean_kl.sum().item(), rel=1e-4)
    assert result["active_dims"] == int((mean_kl > 0.01).sum())
    assert result["kl_dim_max"] == pytest.approx(mean_kl.max().item(), rel=1e-5)
    assert 0 < result["active_dims"] < 32


def test_evaluate_averages_psnr_per_image_when_the_errors_differ_widely():
    """Grey faces, which an untrained decoder's near-0.5 output almost matches, beside black-and-white noise:
    the mean of per-image PSNRs is tens of dB away from the PSNR of a batch's mean MSE."""
    torch.manual_seed(0)
    model = VariationalAutoEncoder(z_dim=16)
    step = TrainStep(model, torch.optim.Adam(model.parameters()), "cpu", channels_last=False)
    g = torch.Generator().manual_seed(4)
    grey = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    noise = [torch.randint(0, 2, (3, 64, 64), dtype=torch.uint8, generator=g) * 255 for _ in range(3)]
    batches = [torch.stack([grey, noise[0], grey, grey]), torch.stack([noise[1], grey]), torch.stack([noise[2]])]
    result = train.evaluate(model, batches, step, beta=1e-3)

    with torch.no_grad():
        mse = [((model.decode(model.encode(b.float() / 255)[0]).double() - b.double() / 255) ** 2).mean(dim=(1, 2, 3))
               for b in batches]
    per_image = torch.cat([-10 * torch.log10(m) for m in mse])
    assert per_image.max() - per_image.min() > 20  # dB: the errors differ widely
    assert result["psnr"] == pytest.approx(per_image.mean().item(), abs=1e-3)
    batch_mean = sum(len(m) * -10 * math.log10(m.mean().item()) for m in mse) / len(per_image)
    assert abs(batch_mean - per_image.mean().item()) > 1


def test_interpolation_runs_on_the_straight_line_between_posterior_means():
    torch.manual_seed(0)
    model = VariationalAutoEncoder(z_dim=16).eval()
    a, b = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    line = figures.interpolate(model, a, b, steps=5)
    assert line.shape == (3, 5, 3, 64, 64)
    with torch.no_grad():
        mu_a, mu_b = model.encode(a)[0], model.encode(b)[0]
        for i, t in enumerate(torch.linspace(0, 1, 5).tolist()):
            torch.testing.assert_close(line[:, i], model.decode(mu_a + t * (mu_b - mu_a)), rtol=1e-4, atol=1e-5)
    grid = figures.interpolation_grid(model, a, b, steps=5)
    assert grid.shape == (3, 3 * 66 + 2, 7 * 66 + 2)  # rows: A, 5 decodings, B
    torch.testing.assert_close(grid[:, 2:66, 2:66], a[0])
    torch.testing.assert_close(grid[:, 2:66, 6 * 66 + 2:7 * 66], b[0])


def test_metrics_jsonl_keeps_other_rows_and_drops_the_epochs_a_resume_trains_again(tmp_path):
    """generate.py --evaluate's rows have no epoch: a resumed run keeps them and drops the rows of the
    epochs past its checkpoint (and a damaged line)."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}, {"kind": "evaluate", "swd_prior": 9.0},
            {"epoch": 3, "loss": 0.25}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"epoch": 4, "lo')
    kept = MetricsFile(path, epochs=2)
    assert kept.epochs == rows[:2] and kept.rows == rows[:3]
    kept.append({"epoch": 3, "loss": 0.3})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [*rows[:3], {"epoch": 3, "loss": 0.3}]
    assert MetricsFile(path).epochs == [*rows[:2], {"epoch": 3, "loss": 0.3}]
