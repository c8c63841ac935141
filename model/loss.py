"""The VAE objective, always computed in fp32.

Reduction: BCE is averaged over every pixel and channel, KL is summed over the latent dimensions
and averaged over the batch, and loss = BCE + beta * KL. Under this scale a per-pixel BCE of ~0.5
sits beside a KL of tens to hundreds of nats, so beta=1 lets KL dominate and the decoder collapses
to one average face; beta=0.001 keeps reconstructions sharp while still shaping the latent space.

The negative ELBO (BCE summed over the 3*64*64 pixels + KL, per image) is reported beside it in
nats and bits/dim, a figure that does not depend on beta. It compares runs of this project only:
BCE against continuous targets in [0, 1] is not the log-likelihood of 8-bit pixels (a grey pixel
reconstructed exactly still costs ln 2), so it is not the discretised bits/dim of published
models. PSNR (model/metrics.py) is the figure that compares across projects.
"""

import math
from typing import NamedTuple

import torch

BETA = 1e-3
CLAMP_EPS = 1e-6  # BCE takes log(x) and log(1-x): exact 0 or 1 would give -inf


class VAELoss(NamedTuple):
    loss: torch.Tensor      # what is optimised: bce + beta * kl
    bce: torch.Tensor       # mean BCE per pixel
    kl: torch.Tensor        # KL per image, summed over latent dims
    neg_elbo: torch.Tensor  # nats per image: summed BCE + KL

    @staticmethod
    def bits_per_dim(neg_elbo_nats: float, dims: int = 3 * 64 * 64) -> float:
        return neg_elbo_nats / (dims * math.log(2))


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(B, Z) KL(N(mu, exp(logvar)) || N(0, 1)) of each image and latent dimension, in nats, in fp32.

    vae_loss's KL is its sum over the dimensions, averaged over images; model/metrics.py counts the
    active dimensions from its mean over images."""
    with torch.autocast(device_type=mu.device.type, enabled=False):
        mu, logvar = mu.float(), logvar.float()
        return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def vae_loss(x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             beta: float = BETA) -> VAELoss:
    # Autocast off: log terms lose too much in bf16/fp16 (and CUDA autocast refuses F.binary_cross_entropy).
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_hat = x_hat.float().clamp(CLAMP_EPS, 1 - CLAMP_EPS)
        x = x.float().clamp(CLAMP_EPS, 1 - CLAMP_EPS)
        mu, logvar = mu.float(), logvar.float()
        batch, pixels = x.shape[0], x[0].numel()
        # BCE written out rather than F.binary_cross_entropy: that kernel rejects a NaN input with
        # an error (a device-side assert on CUDA, which kills the process) where this lets the NaN
        # reach the loss, so training can stop with a clear message.
        bce_sum = -(x * torch.log(x_hat) + (1 - x) * torch.log1p(-x_hat)).sum() / batch
        kl = kl_per_dim(mu, logvar).sum() / batch
        bce = bce_sum / pixels
        return VAELoss(bce + beta * kl, bce, kl, bce_sum + kl)
