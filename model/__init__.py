"""The convolutional VAE and its loss. `from model import VariationalAutoEncoder` is the public entry point."""

from model.loss import BETA, CLAMP_EPS, VAELoss, vae_loss
from model.vae import VariationalAutoEncoder

__all__ = ["VariationalAutoEncoder", "vae_loss", "VAELoss", "BETA", "CLAMP_EPS"]
