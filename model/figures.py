"""Pictures of what the model does, shared by train.py and generate.py.

Grids of faces are torchvision's make_grid (2 px black padding, so each 64x64 face takes 66 px);
the training curves are drawn with matplotlib on a bare Figure, which renders with Agg and needs no
display and no pyplot state. Callers choose the device and any autocast; grids come back as fp32
(3, H, W) tensors in [0, 1], ready for save_image or TensorBoard.
"""

import math

import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid, save_image

from common.files import atomic_write
from model.metrics import ACTIVE_KL_NATS

INTERPOLATION_STEPS = 8  # decodings per line in z, both ends included
CURVES_INCHES, CURVES_DPI = (10, 7), 100  # curves.png is 1000 x 700 px


@torch.no_grad()
def reconstruct(model, x: torch.Tensor) -> torch.Tensor:
    """Reconstructions from the posterior mean: no sampling noise, the model's best guess."""
    return model.decode(model.encode(x)[0]).float()


def paired_rows(top: torch.Tensor, bottom: torch.Tensor, per_row: int) -> torch.Tensor:
    """Rows of `per_row` images from `top`, each above the matching row of `bottom`."""
    blank = top.new_zeros(top.shape[1:])
    rows = []
    for start in range(0, len(top), per_row):
        for images in (top[start:start + per_row], bottom[start:start + per_row]):
            rows += [*images.float(), *[blank] * (per_row - len(images))]
    return make_grid(torch.stack(rows), nrow=per_row)


def reconstruction_grid(model, x: torch.Tensor, per_row: int | None = None) -> torch.Tensor:
    """Faces over their reconstructions; one pair of rows unless `per_row` is given."""
    return paired_rows(x, reconstruct(model, x), per_row or len(x))


@torch.no_grad()
def interpolate(model, a: torch.Tensor, b: torch.Tensor, steps: int = INTERPOLATION_STEPS) -> torch.Tensor:
    """(P, steps, 3, 64, 64) decodings at evenly spaced points of the straight line in z from the
    posterior mean of each face in `a` to that of the matching face in `b`, ends included."""
    mu_a, mu_b = model.encode(torch.cat([a, b]))[0].float().chunk(2)
    t = torch.linspace(0, 1, steps, device=mu_a.device).view(1, steps, 1)
    z = mu_a[:, None] + t * (mu_b - mu_a)[:, None]
    images = model.decode(z.flatten(0, 1)).float()
    return images.view(len(a), steps, *images.shape[1:])


def interpolation_grid(model, a: torch.Tensor, b: torch.Tensor, steps: int = INTERPOLATION_STEPS) -> torch.Tensor:
    """One row per pair: face A, the decodings along the line from A to B, face B."""
    line = interpolate(model, a, b, steps)
    rows = torch.cat([a.float()[:, None], line, b.float()[:, None]], dim=1)
    return make_grid(rows.flatten(0, 1), nrow=steps + 2)


@torch.no_grad()
def sample(model, n: int, z_dim: int, device, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """n faces decoded from z = temperature * eps, eps ~ N(0, I). eps is drawn on the CPU, so a seed
    gives the same faces on any device."""
    z = temperature * torch.randn(n, z_dim, generator=generator)
    return model.decode(z.to(device)).float()


def sample_grid(model, n: int, z_dim: int, device, temperature: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    return make_grid(sample(model, n, z_dim, device, temperature, generator), nrow=math.ceil(math.sqrt(n)))


CURVES = (  # panel title, y label, (label, metrics.jsonl key) per line
    ("loss (optimised: BCE per pixel + beta KL)", "loss", (("train", "train_loss"), ("val", "val_loss"))),
    ("negative ELBO, BCE-based (this project only)", "bits/dim",
     (("train", "train_bits_per_dim"), ("val", "val_bits_per_dim"))),
    ("reconstruction PSNR from the posterior mean", "dB", (("val", "val_psnr"),)),
    (f"active latent dimensions (KL > {ACTIVE_KL_NATS} nats)", "dimensions", (("val", "val_active_dims"),)),
)


def save_curves(rows: list[dict], path) -> None:
    """curves.png: loss, bits/dim, PSNR and active dimensions against epoch, from metrics.jsonl rows."""
    fig = Figure(figsize=CURVES_INCHES, dpi=CURVES_DPI, layout="constrained")
    epochs = [r["epoch"] for r in rows]
    for ax, (title, unit, lines) in zip(fig.subplots(2, 2).flat, CURVES):
        for label, key in lines:
            ax.plot(epochs, [r.get(key, math.nan) for r in rows], marker="o", markersize=3, label=label)
        ax.set(title=title, xlabel="epoch", ylabel=unit)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=CURVES_DPI))


def save_png(grid: torch.Tensor, path) -> None:
    """A grid as a PNG, written atomically: a picture under its name is always whole."""
    atomic_write(path, lambda f: save_image(grid, f, format="png"))


# ----------------------------------------------------------------------------- train.py's pictures
# `step` is the TrainStep: its to_input and autocast make the model's input and precision.


@torch.no_grad()
def reconstructions(model, preview, step) -> torch.Tensor:
    """Faces over their reconstructions from the posterior mean, as a grid on the device: launched on the
    training thread, so it sees this epoch's weights, and read by whoever saves it."""
    model.eval()
    with step.autocast():
        grid = reconstruction_grid(model, step.to_input(preview))
    model.train()
    return grid


@torch.no_grad()
def save_samples(model, z_dim: int, seed: int, device, path) -> torch.Tensor:
    """64 faces decoded from z ~ N(0, I), the same z for the same seed; returns the grid."""
    model.eval()
    grid = sample_grid(model, 64, z_dim, device, generator=torch.Generator().manual_seed(seed))
    save_png(grid, path)
    return grid


@torch.no_grad()
def save_interpolations(model, preview, step, path) -> torch.Tensor | None:
    """A row per pair of preview faces: the pair's ends and the decodings along the line in z between
    their posterior means. None when there are fewer than two faces."""
    pairs = len(preview) // 2
    if pairs == 0:
        return None
    model.eval()
    x = step.to_input(preview[:2 * pairs])
    with step.autocast():
        grid = interpolation_grid(model, x[0::2], x[1::2])
    save_png(grid, path)
    return grid
