"""Quality figures that compare across projects, beside the loss that is optimised.

- MSE and PSNR per image, between a face and its reconstruction from the posterior mean
  (z = mu, no sampling noise), on [0, 1] pixels: PSNR = 10 log10(1 / MSE) dB. Averaged per image,
  so one badly reconstructed face costs as much as it would alone.
- KL per latent dimension, KL(q(z_d | x) || N(0, 1)) in nats. A dimension whose KL, averaged over
  images, stays below ACTIVE_KL_NATS carries almost no information about the image (its posterior
  is the prior): counting the others is the usual check for posterior collapse.

All of it is computed in fp32 with autocast off, whatever precision the model ran in.
"""

import torch

from model.loss import kl_per_dim  # noqa: F401  (the KL of each latent dimension: one formula, the loss's)

ACTIVE_KL_NATS = 0.01  # a latent dimension is active when its mean KL exceeds this
MSE_FLOOR = 1e-10  # a perfect reconstruction gives PSNR 100 dB rather than infinity


def mse_per_image(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, ...) images in [0, 1] -> (B,) mean squared error of each image."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return (x_hat.float() - x.float()).pow(2).flatten(1).mean(1)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of pixels in [0, 1], from per-image MSE."""
    return -10 * torch.log10(mse.clamp_min(MSE_FLOOR))


def active_dims(mean_kl_per_dim: torch.Tensor, threshold: float = ACTIVE_KL_NATS) -> int:
    """How many latent dimensions carry information: mean KL per dimension above `threshold` nats."""
    return int((mean_kl_per_dim > threshold).sum())
