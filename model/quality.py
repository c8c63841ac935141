"""How good the faces are, and better ones: the mechanisms train.py's end of training and generate.py share.

- Ex-post density sampling (Ghosh et al. 2020, "From variational to deterministic autoencoders"):
  a 10-component, full-covariance Gaussian mixture (scikit-learn's GaussianMixture) fitted to the
  posterior means of the training split after training; decoding its samples instead of N(0, I)
  draws avoids the holes between the aggregate posterior and the prior. Saved beside the weights as
  plain tensors, so it loads with `torch.load(..., weights_only=True)`.
- The sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018, the ProGAN
  paper's SWD), a sample-quality figure that needs no pretrained network. The directions are POT's,
  and the distance along them is POT's `ot.sliced_wasserstein_distance` for equal-size sets, computed
  by sorting (sliced_w1; a test holds it to POT's own).
- Attribute vectors (White 2016, "Sampling Generative Networks"): mean(z | attribute) - mean(z | not)
  over the training split's posterior means, from CelebA's list_attr_celeba.txt format.
- Active units (Burda et al. 2016): latent dimensions whose posterior mean varies across images,
  Cov_x(E[z | x]) > 0.01, beside the KL-based count of model/metrics.py.

Everything here raises QualityError, one line for the user, for a file that is not what it should be.
"""

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ot.sliced import get_random_projections
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture
from torchvision.utils import make_grid

from common.files import atomic_write
from model.metrics import ACTIVE_KL_NATS, kl_per_dim

GMM_COMPONENTS = 10  # as the RAE paper
GMM_SUFFIX, ATTRIBUTES_SUFFIX = ".gmm.pt", ".attributes.pt"  # beside the weights: vae_celeba.gmm.pt, ...
GMM_SAMPLES, ATTRIBUTE_GRID = "generated_samples_gmm.png", "attributes.png"  # train.py's pictures


def outputs(weights_name: str) -> tuple[str, ...]:
    """The files train.py's end of training adds beside weights named `weights_name`."""
    stem = Path(weights_name).stem
    return (stem + GMM_SUFFIX, stem + ATTRIBUTES_SUFFIX, GMM_SAMPLES, ATTRIBUTE_GRID)

ACTIVE_UNIT_COV = 0.01  # Burda et al. 2016: a unit is active when Cov_x(E[z|x]) exceeds this
# Karras et al. 2018 took 128 patches per image; 32 cost the end of training 2.8x less SWD time for the same
# spread over seeds of the prior samples' figure (benchmarks/RESULTS.md, 2026-12-06)
SWD_PATCH, SWD_PATCHES_PER_IMAGE, SWD_MIN_RESOLUTION = 7, 32, 16
SWD_PROJECTIONS = 512  # Karras et al.: 4 repeats of 128 directions
SWD_IMAGES = 2048  # images per set at most (Karras et al. used 16,384; the demo's val split has ~500)
SWD_SCALE = 1e3  # reported x 10^3, as in the paper
ATTRIBUTE_STEPS, ATTRIBUTE_STRENGTH = 7, 1.0  # columns from -S to +S (0 in the middle); S in vector lengths


class QualityError(RuntimeError):
    """A file or request that cannot be used, as one line for the user."""


def weights_sibling(weights: Path, suffix: str) -> Path:
    """The file beside `weights` that holds its GMM or attribute vectors: vae_celeba.pth -> vae_celeba.gmm.pt."""
    weights = Path(weights)
    return weights.with_name(weights.stem + suffix)


def save_tensors(path: Path, tensors: dict) -> Path:
    """A dict of tensors (and plain numbers and strings) written atomically, loadable with weights_only=True."""
    return atomic_write(path, lambda f: torch.save(tensors, f))


def load_tensors(path: Path, required: dict[str, int]) -> dict:
    """torch.load(weights_only=True) of a file save_tensors wrote; `required` maps each tensor key to its
    number of dimensions. Anything else is refused in one line, and nothing in the file runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise QualityError(f"no {path}") from None
    except Exception as exn:  # any file can be handed in; torch.load fails on each in its own way
        raise QualityError(f"{path} is not a file of plain tensors that torch.load reads safely "
                           f"({type(exn).__name__})") from None
    if not isinstance(state, dict):
        raise QualityError(f"{path} does not hold a dict of tensors")
    for key, dims in required.items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or value.dim() != dims or not value.is_floating_point() \
                or not torch.isfinite(value).all():
            raise QualityError(f"{path}: '{key}' is missing or not a finite {dims}-d float tensor")
    return state


# ----------------------------------------------------------------------------- posterior means


@torch.no_grad()
def encode_batches(model, batches, to_input, autocast=contextlib.nullcontext, keys: bool = False):
    """(mu, logvar) as fp32 CPU tensors over every batch of uint8 images (with `keys`: batches are
    (images, keys) and their keys come back third). `to_input` turns a uint8 batch into the model's input."""
    model.eval()
    mus, logvars, names = [], [], []
    for batch in batches:
        images, batch_keys = batch if keys else (batch, None)
        with autocast():
            mu, logvar = model.encode(to_input(images))
        mus.append(mu.float().cpu())
        logvars.append(logvar.float().cpu())
        names += batch_keys or []
    mu, logvar = torch.cat(mus), torch.cat(logvars)
    return (mu, logvar, names) if keys else (mu, logvar)


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_COV) -> int:
    """Burda et al. 2016: latent dimensions whose posterior mean varies across images, Var_x(mu) > threshold."""
    return int((mu.double().var(0) > threshold).sum()) if len(mu) > 1 else 0


def active_dims_kl(mu: torch.Tensor, logvar: torch.Tensor, threshold: float = ACTIVE_KL_NATS) -> int:
    """The KL-based count of model/metrics.py on these images: mean KL per dimension above `threshold` nats."""
    return int((kl_per_dim(mu, logvar).mean(0) > threshold).sum())


# ----------------------------------------------------------------------------- ex-post GMM


def fit_gmm(codes: torch.Tensor, components: int = GMM_COMPONENTS, seed: int = 0) -> dict:
    """A full-covariance Gaussian mixture fitted to `codes` (N, Z) by scikit-learn, as plain tensors.

    Fewer components when there are fewer codes than GMM_COMPONENTS; scikit-learn's reg_covar (1e-6)
    keeps each covariance positive definite."""
    if len(codes) < 2:
        raise QualityError(f"a Gaussian mixture needs at least 2 codes, not {len(codes)}")
    k = min(components, len(codes))
    gm = GaussianMixture(n_components=k, covariance_type="full", random_state=seed).fit(codes.double().numpy())
    return {"weights": torch.from_numpy(gm.weights_), "means": torch.from_numpy(gm.means_),
            "covariances": torch.from_numpy(gm.covariances_), "converged": bool(gm.converged_),
            "iterations": int(gm.n_iter_), "codes": len(codes), "seed": seed}


def load_gmm(path: Path) -> dict:
    """A GMM written by save_tensors(fit_gmm(...)), checked: shapes agree, weights sum to 1, covariances
    positive definite."""
    gmm = load_tensors(path, {"weights": 1, "means": 2, "covariances": 3})
    k, z = gmm["means"].shape
    if gmm["weights"].shape != (k,) or gmm["covariances"].shape != (k, z, z) \
            or (gmm["weights"] < 0).any() or abs(float(gmm["weights"].sum()) - 1) > 1e-6:
        raise QualityError(f"{path}: the mixture's weights, means and covariances do not fit together")
    chol, info = torch.linalg.cholesky_ex(gmm["covariances"].double())
    if (info != 0).any():
        raise QualityError(f"{path}: a covariance is not positive definite")
    gmm["cholesky"] = chol
    return gmm



def draw_latents(n: int, z_dim: int, generator: torch.Generator | None = None, temperature: float = 1.0,
                 gmm: dict | None = None) -> torch.Tensor:
    """(n, z_dim) fp32 CPU latents: temperature * eps, eps ~ N(0, I), with no GMM (the same z as
    figures.sample for the same generator); otherwise a component k ~ weights, then
    mu_k + temperature * L_k eps with L_k the Cholesky factor of its covariance."""
    if gmm is None:
        return temperature * torch.randn(n, z_dim, generator=generator)
    means = gmm["means"].double()
    if means.shape[1] != z_dim:
        raise QualityError(f"the mixture has {means.shape[1]} dimensions, the weights' z_dim is {z_dim}")
    chol = gmm.get("cholesky")
    chol = torch.linalg.cholesky(gmm["covariances"].double()) if chol is None else chol
    k = torch.multinomial(gmm["weights"].double(), n, replacement=True, generator=generator)
    eps = torch.randn(n, z_dim, generator=generator, dtype=torch.float64)
    return (means[k] + temperature * torch.einsum("nij,nj->ni", chol[k], eps)).float()


# ----------------------------------------------------------------------------- SWD


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """OpenCV's pyrDown/pyrUp filter: the 5-tap binomial [1 4 6 4 1] / 16 in each direction, reflected edges."""
    k1 = torch.tensor([1, 4, 6, 4, 1], dtype=x.dtype, device=x.device) / 16
    kernel = (torch.outer(k1, k1) * gain).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, :, ::2, ::2]


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    up = x.new_zeros(x.shape[0], x.shape[1], 2 * x.shape[2], 2 * x.shape[3])
    up[:, :, ::2, ::2] = x
    return _blur(up, gain=4.0)


def laplacian_pyramid(x: torch.Tensor, min_resolution: int = SWD_MIN_RESOLUTION) -> list[torch.Tensor]:
    """Karras et al.'s pyramid of float images (N, C, H, W): band-pass levels from the finest, then the
    low-pass image at `min_resolution`."""
    levels = [x]
    while levels[-1].shape[-1] > min_resolution:
        low = pyr_down(levels[-1])
        levels[-1] = levels[-1] - pyr_up(low)
        levels.append(low)
    return levels


def patch_descriptors(level: torch.Tensor, generator: torch.Generator, per_image: int = SWD_PATCHES_PER_IMAGE,
                      size: int = SWD_PATCH) -> torch.Tensor:
    """(N * per_image, C, size, size) patches at random places of each image of one pyramid level."""
    n, c, h, w = level.shape
    ys = torch.randint(0, h - size + 1, (n, per_image), generator=generator)
    xs = torch.randint(0, w - size + 1, (n, per_image), generator=generator)
    offsets = torch.arange(size)
    rows = (ys[..., None] + offsets)[..., :, None].expand(n, per_image, size, size)
    cols = (xs[..., None] + offsets)[..., None, :].expand(n, per_image, size, size)
    images = torch.arange(n)[:, None, None, None].expand_as(rows)
    return level.permute(0, 2, 3, 1)[images, rows, cols].permute(0, 1, 4, 2, 3).reshape(-1, c, size, size)


def sorted_projections(descriptors: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """(P, N): each direction's projections of the (N, D) descriptors, sorted. numpy's sort, which ran
    faster than torch's CPU sort on these rows (benchmarks/RESULTS.md has the figures)."""
    return torch.from_numpy(np.sort((projections.T @ descriptors.T).cpu().numpy(), axis=1))


def sliced_w1(real_sorted: torch.Tensor, fake: torch.Tensor, projections: torch.Tensor) -> float:
    """The sliced W1 distance of POT's `ot.sliced_wasserstein_distance(real, fake, projections=..., p=1)` for
    two sets of the same size with equal weights, from `real`'s projections already sorted ((P, N), one
    row per direction): W1 along a direction is then the mean |difference| of the sorted projections.
    tests/test_quality.py checks it against POT's. POT's general, weighted 1-d solver was measured much
    slower on these descriptor counts (benchmarks/RESULTS.md has the figures)."""
    fake_sorted = sorted_projections(fake, projections)
    if fake_sorted.shape != real_sorted.shape:
        raise ValueError(f"sliced_w1 compares sets of one size, not {real_sorted.shape[1]} and {fake_sorted.shape[1]}")
    return float((real_sorted - fake_sorted).abs().mean())


def swd(real: torch.Tensor, fakes: dict[str, torch.Tensor], seed: int = 0) -> dict[str, list[float]]:
    """Sliced Wasserstein distance x 10^3 of each set in `fakes` to `real`, at each Laplacian-pyramid
    level, finest first. Images (N, 3, H, W), uint8 or floats in [0, 1]; every set as many as `real`.

    As Karras et al. 2018: random 7x7 patches per image and level (SWD_PATCHES_PER_IMAGE), each a 147-d descriptor,
    512 random directions (POT's get_random_projections), W1 along each. Two changes, so that the figure
    means what it says: every set's patches sit at the same places (a set against itself gives exactly
    0), and every descriptor is normalised by the per-channel mean and deviation of the `real` set's
    descriptors at that level (Karras et al. normalised each set by its own, which hides shifts in colour
    or contrast). The same seed draws the same patches and directions, so runs compare."""
    def levels(x):
        return laplacian_pyramid(x.float() / 255 if x.dtype == torch.uint8 else x.float())

    fake_levels = {name: levels(x) for name, x in fakes.items()}
    out = {name: [] for name in fakes}
    for i, a in enumerate(levels(real)):
        da = patch_descriptors(a, torch.Generator().manual_seed(seed * 1000 + i))
        mean, std = da.mean(dim=(0, 2, 3), keepdim=True), da.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
        projections = torch.as_tensor(get_random_projections(da[0].numel(), SWD_PROJECTIONS, seed=seed * 1000 + i),
                                      dtype=torch.float32)
        real_sorted = sorted_projections(((da - mean) / std).flatten(1), projections)
        for name, fl in fake_levels.items():
            db = patch_descriptors(fl[i], torch.Generator().manual_seed(seed * 1000 + i))
            out[name].append(sliced_w1(real_sorted, ((db - mean) / std).flatten(1), projections) * SWD_SCALE)
    return out


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] to uint8 as save_image rounds them: what a saved PNG would hold, with no file between."""
    return x.float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- attributes


def attribute_vectors(codes: torch.Tensor, values: torch.Tensor, names: list[str]) -> dict:
    """mean(z | attribute) - mean(z | not) for each attribute with images on both sides; `values` (N, A)
    of +-1 in the rows' order of `codes` (N, Z)."""
    positive = values > 0
    counts = positive.sum(0)
    keep = [i for i in range(len(names)) if 0 < counts[i] < len(codes)]
    vectors = torch.stack([codes[positive[:, i]].mean(0) - codes[~positive[:, i]].mean(0) for i in keep]) \
        if keep else codes.new_zeros(0, codes.shape[1])
    return {"names": [names[i] for i in keep], "vectors": vectors.float(),
            "positives": counts[keep].float(), "images": len(codes)}


def load_attribute_vectors(path: Path) -> dict:
    state = load_tensors(path, {"vectors": 2})
    names = state.get("names")
    if not isinstance(names, list) or len(names) != len(state["vectors"]) or not all(isinstance(n, str) for n in names):
        raise QualityError(f"{path}: its attribute names do not match its vectors")
    return state


@torch.no_grad()
def attribute_walk(model, z: torch.Tensor, vector: torch.Tensor, strength: float = ATTRIBUTE_STRENGTH,
                   steps: int = ATTRIBUTE_STEPS) -> torch.Tensor:
    """(R, steps, 3, 64, 64) decodings of each row of `z` moved along `vector` by t, t from -strength to
    +strength."""
    t = torch.linspace(-strength, strength, steps, device=z.device).view(1, steps, 1)
    moved = z[:, None] + t * vector.to(z)[None, None]
    images = model.decode(moved.flatten(0, 1)).float()
    return images.view(len(z), steps, *images.shape[1:])


def attribute_grid(model, z: torch.Tensor, vector: torch.Tensor, strength: float = ATTRIBUTE_STRENGTH,
                   steps: int = ATTRIBUTE_STEPS) -> torch.Tensor:
    """One row per face of `z`, from -strength to +strength along `vector`, by make_grid's default padding."""
    return make_grid(attribute_walk(model, z, vector, strength, steps).flatten(0, 1), nrow=steps)


def probe_ends(images: torch.Tensor, values: torch.Tensor, ends: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """A logistic probe on 16x16 pixels, trained on real `images` (uint8 (N, 3, 64, 64)) with labels
    `values` (+-1), rating decoded `ends` ((R, 2, 3, 64, 64) floats: the -S and +S ends of each row):
    (mean probability of the attribute at the - end, at the + end)."""
    def features(x):
        return F.avg_pool2d(x.float() / (255 if x.dtype == torch.uint8 else 1), 4).flatten(1).numpy()

    probe = LogisticRegression(max_iter=2000, C=0.1, random_state=seed).fit(features(images), (values > 0).numpy())
    p = probe.predict_proba(features(ends.flatten(0, 1)))[:, 1].reshape(len(ends), 2)
    return float(p[:, 0].mean()), float(p[:, 1].mean())


def grid_side(n: int) -> int:
    return math.ceil(math.sqrt(n))
