"""FID and KID for train.py's end of training and generate.py --evaluate: the flags, how many images,
the network, and the reals' features read from beside the shards (the mechanisms are model/fid.py's
and pipeline/fid_stats.py's).

    fid_plan.add_flags(parser)                                     # --fid N, --fid-weights PATH
    fid_plan.check(args)                                           # before any work: FidError, one line
    n = fid_plan.images(args.fid, device)                          # 0: off
    network = fid_plan.network(args.fid_weights, device, asked=bool(args.fid))
    reals, line = fid_plan.reals(network, images, keys, data_path, crop, decoder)

--fid N compares N generated images of each set with the first N validation images (N is the split's
size when it has fewer). Without it: on CUDA, the whole split up to CUDA_IMAGES; on the CPU, off, since
the network runs at 3 to 10 images/s on 2 cores (benchmarks/RESULTS.md). The network's file is checked
(size and SHA-256, model/fid.py) before any work when --fid N or --fid-weights is given; the default on
CUDA without the packaged file says so in one line and goes on without FID.
"""

import argparse
import sys
from pathlib import Path

import torch

from common import cli
from model import fid
from pipeline import fid_stats

CUDA_IMAGES = 20_000  # the default N on CUDA, capped by the validation split (CelebA's has 19,867)
CPU_SUGGESTION = 64  # --help's example for the CPU: 4 sets of 64 images, 1-2 min on 2 cores


def fid_count(text: str) -> int:
    """An argparse `type=` for --fid: 0 (off) or at least 2 images (a covariance needs two)."""
    value = cli.count(text)
    if value == 1:
        raise argparse.ArgumentTypeError("must be 0 (off) or at least 2 images, not 1")
    return value


def add_flags(p: argparse.ArgumentParser, mode: str = "") -> None:
    """--fid and --fid-weights; `mode` prefixes their help (generate.py's "--evaluate: ")."""
    p.add_argument("--fid", type=fid_count, default=None, metavar="N",
                   help=f"{mode}FID and KID of N prior samples, N GMM samples and the reconstructions of the first N "
                        f"validation images against those images (fid_*, kid_*, fid_images in metrics.jsonl); 0: off. "
                        f"None: on CUDA the whole validation split up to {CUDA_IMAGES:,}, on the CPU off (the network "
                        f"runs at 3-10 images/s on 2 cores: --fid {CPU_SUGGESTION} takes 1-2 min, 500 5-15 min). Needs "
                        f"the FID Inception network, never downloaded: {fid.INSTALL}")
    p.add_argument("--fid-weights", type=Path, default=None, metavar="PATH",
                   help=f"{mode}the FID Inception network's file ({fid.FILE_NAME}, SHA-256 {fid.SHA256[:12]}...) "
                        "from PATH instead of the installed package; a file with another hash is refused")


def check(args) -> None:
    """Before any work, when --fid N (N > 0) or --fid-weights is given: the network's file is there and its
    size and SHA-256 are the network's (nothing is loaded); else FidError, one line."""
    if args.fid or args.fid_weights is not None:
        fid.read_checked(fid.weights_file(args.fid_weights))


def images(requested: int | None, device) -> int:
    """N, the images of each set: --fid as given, else CUDA_IMAGES on CUDA and 0 (off) elsewhere."""
    if requested is not None:
        return requested
    return CUDA_IMAGES if torch.device(device).type == "cuda" else 0


def network(weights: Path | None, device, asked: bool):
    """The FID network on `device`. A file that cannot be used raises FidError when FID was `asked` for
    (--fid N given); otherwise (the CUDA default) one line says why FID is skipped, and None comes back."""
    try:
        return fid.load_network(weights, device=device)
    except fid.FidError as exn:
        if asked:
            raise
        print(f"warning: no FID or KID: {exn}", file=sys.stderr)
        return None


def reals(network, images: torch.Tensor, keys: list[str], data_path, crop: str, decoder: str,
          split: str = "val") -> tuple[fid.Reals | None, str]:
    """fid.Reals of the uint8 `images` of `split` (whose `keys`, in order, name them in the shards): their
    features and statistics read from beside the shards when that file matches, else computed and
    written there (pipeline/fid_stats.py). None, and why, with fewer than 2 images."""
    if len(images) < 2:
        return None, f"no FID or KID: the {split} split has {len(images)} image(s), fewer than 2"

    def compute() -> dict:
        features = fid.features(network, images, progress=True).cpu()
        mean, cov = fid.statistics(features)
        return {"mean": mean, "cov": cov, "features": features}

    stats, line = fid_stats.cached(data_path, split, keys, crop, fid.IDENTITY, decoder, compute)
    return fid.Reals(network, images, stats["features"], (stats["mean"], stats["cov"])), line
