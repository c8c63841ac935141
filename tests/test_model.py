import math

import pytest
import torch

from model import VariationalAutoEncoder, VAELoss, vae_loss
from model.loss import CLAMP_EPS


def test_shapes_and_parameter_count():
    model = VariationalAutoEncoder(z_dim=128)
    assert sum(p.numel() for p in model.parameters()) == 2_957_251
    x = torch.rand(5, 3, 64, 64)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 128)
    assert model.encoder(x).shape == (5, 256, 4, 4)
    x_hat, mu2, logvar2 = model(x)
    assert x_hat.shape == x.shape and torch.equal(mu, mu2) and torch.equal(logvar, logvar2)
    images = model.decode(torch.randn(16, 128))
    assert images.shape == (16, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = VariationalAutoEncoder()
    x = torch.rand(4, 3, 64, 64)
    mu, logvar = model.encode(x)
    model_cl = model.to(memory_format=torch.channels_last)
    mu_cl, logvar_cl = model_cl.encode(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(mu_cl, mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logvar_cl, logvar, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [100.0, -100.0])
def test_logvar_is_clamped(bias):
    model = VariationalAutoEncoder()
    with torch.no_grad():
        model.hid_2logvar.bias.fill_(bias)
    _, logvar = model.encode(torch.rand(3, 3, 64, 64))
    assert torch.all(logvar == math.copysign(4.0, bias))


def reference_loss(x_hat, x, mu, logvar, beta):
    """The documented reduction, in float64, written out term by term."""
    # The clamp bounds as fp32 stores them: 1 - 1e-6 rounds to 1 - 1.013e-6 there.
    lo, hi = (torch.tensor(b, dtype=torch.float32).item() for b in (CLAMP_EPS, 1 - CLAMP_EPS))
    x_hat, x = x_hat.double().clamp(lo, hi), x.double().clamp(lo, hi)
    mu, logvar = mu.double(), logvar.double()
    bce_per_pixel = -(x * torch.log(x_hat) + (1 - x) * torch.log(1 - x_hat))
    kl_per_image = -0.5 * (1 + logvar - mu**2 - torch.exp(logvar)).sum(dim=1)
    bce = bce_per_pixel.mean()
    return bce + beta * kl_per_image.mean(), bce, kl_per_image.mean(), bce_per_pixel.sum(dim=(1, 2, 3)).mean() + kl_per_image.mean()


def test_loss_matches_float64_reference_including_exact_zeros_and_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 64, 64, generator=g)
    x_hat = torch.rand(6, 3, 64, 64, generator=g)
    x[0, 0], x[1, 1] = 0.0, 1.0          # exact targets
    x_hat[0, 0], x_hat[2, 2] = 1.0, 0.0  # exact (and maximally wrong) predictions
    mu, logvar = torch.randn(6, 128, generator=g), torch.rand(6, 128, generator=g) * 8 - 4
    out = vae_loss(x_hat, x, mu, logvar, beta=0.001)
    expected = reference_loss(x_hat, x, mu, logvar, 0.001)
    assert all(torch.isfinite(t) for t in out)
    for got, want in zip(out, expected):
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_loss_runs_in_fp32_under_autocast():
    model = VariationalAutoEncoder()
    x = torch.rand(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, mu, logvar = model(x)
        out = vae_loss(x_hat, x, mu, logvar)
    assert x_hat.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.encoder[0].weight.grad is not None


def test_bits_per_dim():
    assert VAELoss.bits_per_dim(3 * 64 * 64 * math.log(2)) == pytest.approx(1.0)


@pytest.mark.parametrize("amp, channels_last", [("off", False), ("off", True), ("bf16", True)])
def test_train_step_updates_the_weights_and_returns_detached_stats(amp, channels_last):
    from model.step import TrainStep
    torch.manual_seed(0)
    model = VariationalAutoEncoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = TrainStep(model, optimizer, "cpu", amp=amp, channels_last=channels_last)
    before = [p.detach().clone() for p in model.parameters()]
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    out = step(images)
    assert all(not t.requires_grad and t.dtype == torch.float32 and torch.isfinite(t) for t in out)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="amp must be one of"):
        TrainStep(model, optimizer, "cpu", amp="fp8")


def test_the_optimizer_is_fused_adam_on_cuda_only():
    """One home for the optimizer: Adam at the given rate; fused on CUDA, where GradScaler hands it the scale
    and inf flag as tensors (`_step_supports_amp_scaling`) instead of reading the flag on the host."""
    from model.step import make_optimizer
    params = [torch.nn.Parameter(torch.zeros(3))]
    cpu, cuda = make_optimizer(params, 1e-3, "cpu"), make_optimizer(params, 2e-3, torch.device("cuda", 0))
    assert isinstance(cpu, torch.optim.Adam) and cpu.defaults["lr"] == 1e-3 and not cpu.defaults["fused"]
    assert cuda.defaults["fused"] is True and cuda.defaults["lr"] == 2e-3 and cuda._step_supports_amp_scaling


def test_a_checkpoint_keeps_this_machines_adam_kernel():
    """A checkpoint made with the unfused Adam (on the CPU) loads into the fused one (CUDA) and the reverse,
    each keeping its own kernel and stepping; the fused kernel also runs on the CPU, which stands in here."""
    from model.step import make_optimizer
    torch.manual_seed(0)
    model = VariationalAutoEncoder()
    x = torch.rand(2, 3, 64, 64)

    def step(optimizer):
        optimizer.zero_grad()
        model(x)[0].mean().backward()
        optimizer.step()

    unfused = make_optimizer(model.parameters(), 1e-3, "cpu")
    step(unfused)
    fused = make_optimizer(model.parameters(), 1e-3, "cuda")
    fused.load_state_dict(unfused.state_dict())
    assert all(g["fused"] for g in fused.param_groups)
    assert all(s["step"].dtype == torch.float32 and s["step"].item() == 1 for s in fused.state.values())
    step(fused)
    again = make_optimizer(model.parameters(), 1e-3, "cpu")
    again.load_state_dict(fused.state_dict())
    assert not any(g["fused"] for g in again.param_groups)
    step(again)
    assert all(s["step"].item() == 3 for s in again.state.values())
