"""Convolutional VAE for 3x64x64 faces.

Layer names (`encoder`, `hid_2mu`, `hid_2logvar`, `z_2hid`, `decoder`) are part of the saved
`vae_celeba.pth` format: renaming one breaks every checkpoint users already have.
"""

import torch
from torch import nn

LOGVAR_MIN, LOGVAR_MAX = -4.0, 4.0  # keeps sigma in [0.14, 7.4]: KL cannot explode


class VariationalAutoEncoder(nn.Module):
    def __init__(self, z_dim: int = 128):
        super().__init__()
        self.z_dim = z_dim
        # 64 -> 32 -> 16 -> 8 -> 4: each stride-2 conv halves the side.
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(128, 256, 4, 2, 1), nn.ReLU(),
        )
        self.hid_2mu = nn.Linear(256 * 4 * 4, z_dim)
        self.hid_2logvar = nn.Linear(256 * 4 * 4, z_dim)
        self.z_2hid = nn.Linear(z_dim, 256 * 4 * 4)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(32, 3, 4, 2, 1), nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        logvar = self.hid_2logvar(h).clamp(LOGVAR_MIN, LOGVAR_MAX)
        return self.hid_2mu(h), logvar

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.z_2hid(z).view(-1, 256, 4, 4)
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar
