"""Faces from trained weights: samples, reconstructions of your images, interpolations.

    python generate.py                                         # 64 samples -> samples.png
    python generate.py --samples 16 --temperature 0.8 --seed 1
    python generate.py --reconstruct photo.jpg more_photos/    # each image over its reconstruction
    python generate.py --interpolate a.jpg b.jpg --steps 10    # a row from a to b through z

Needs only the weights file that train.py writes (OUTPUT_DIR/vae_celeba.pth). Images go through
the loaders' own decode, crop and resize (pipeline.torch_loader.decode_resized), so a photo reaches
the model exactly as the training faces did; give --crop none for weights trained with --crop none.
Reconstructions and interpolation ends use the posterior mean, z = mu.
"""

import argparse
import sys
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from torchvision.utils import save_image

from model import VariationalAutoEncoder
from model import figures
from model.checkpoint import CheckpointError, load_weights
from pipeline.geometry import CROPS
from pipeline.torch_loader import decode_resized

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what a folder given to --reconstruct contributes
DEFAULT_OUT = {"samples": "samples.png", "reconstruct": "reconstructions.png", "interpolate": "interpolation.png"}


class GenerateError(RuntimeError):
    """Stops with a one-line message for the user rather than a traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default and keeps the module docstring's layout."""


def build_parser() -> argparse.ArgumentParser:
    """The flags; parse_args adds the checks that involve several of them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--weights", type=Path, default=Path("output/vae_celeba.pth"),
                   help="a state_dict written by train.py (its default --output-dir is output/)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--samples", type=int, default=64, metavar="N",
                      help="decode N faces from z = T * eps, eps ~ N(0, I) (what runs when no other mode is given)")
    mode.add_argument("--reconstruct", nargs="+", type=Path, metavar="FILE|FOLDER",
                      help="image files, and folders whose .jpg/.jpeg/.png files are taken in name order; "
                           "each image over its reconstruction")
    mode.add_argument("--interpolate", nargs=2, type=Path, metavar=("A", "B"),
                      help="two image files: A, decodings along the straight line in z between their posterior "
                           "means, B")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="--samples: scale of z's standard deviation; below 1 gives more typical, blander faces")
    p.add_argument("--seed", type=int, default=0, help="--samples: seed of z (train.py's generated_samples.png is "
                   "--samples 64 with its --seed)")
    p.add_argument("--limit", type=int, default=64, help="--reconstruct: at most this many images")
    p.add_argument("--steps", type=int, default=figures.INTERPOLATION_STEPS,
                   help="--interpolate: decodings along the line, both ends included")
    p.add_argument("--out", type=Path, default=None,
                   help=f"the PNG to write; None: {', '.join(f'{v} for --{k}' for k, v in DEFAULT_OUT.items())}")
    p.add_argument("--z-dim", type=int, default=None, help="latent dimensions; must match the weights (None: read "
                   "from them)")
    p.add_argument("--crop", choices=CROPS, default="center", help="the crop the weights were trained with "
                   "(train.py --crop)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.mode = "reconstruct" if args.reconstruct else "interpolate" if args.interpolate else "samples"
    if args.samples < 1 or args.limit < 1 or args.steps < 2 or args.temperature < 0:
        p.error("--samples and --limit must be at least 1, --steps at least 2 and --temperature at least 0")
    if args.out is None:
        args.out = Path(DEFAULT_OUT[args.mode])
    return args


def load_model(path: Path, z_dim: int | None, device) -> VariationalAutoEncoder:
    if not path.is_file():
        raise GenerateError(f"no weights at {path}: train first (train.py writes OUTPUT_DIR/vae_celeba.pth) "
                            f"or pass --weights")
    try:
        state = load_weights(path)  # digest checked, then weights_only: nothing in the file runs
    except CheckpointError as exn:
        raise GenerateError(str(exn)) from None
    if not isinstance(state, dict) or "hid_2mu.weight" not in state:
        raise GenerateError(f"{path} does not hold VariationalAutoEncoder weights (a state_dict like train.py's "
                            f"vae_celeba.pth)")
    found = state["hid_2mu.weight"].shape[0]
    if z_dim is not None and z_dim != found:
        raise GenerateError(f"--z-dim {z_dim} does not match {path}, whose weights have z_dim {found}: "
                            f"pass --z-dim {found} or leave it out")
    model = VariationalAutoEncoder(z_dim=found)
    try:
        model.load_state_dict(state)
    except RuntimeError as exn:
        raise GenerateError(f"{path} does not fit VariationalAutoEncoder(z_dim={found}): "
                            f"{str(exn).splitlines()[0]}") from exn
    return model.to(device).eval()


def image_files(paths: list[Path], limit: int) -> list[Path]:
    """Files as given, folders expanded to their images in name order; at most `limit`."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise GenerateError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} files in this folder")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise GenerateError(f"{path}: no such file or folder")
    return files[:limit]


def read_image(path: Path, crop: str) -> torch.Tensor:
    """An image file -> (3, 64, 64) uint8, through the loaders' decode, crop and resize."""
    try:
        data = path.read_bytes()
    except OSError as exn:
        raise GenerateError(f"{path}: cannot read it ({exn.strerror or exn})") from exn
    try:
        return torch.from_numpy(decode_resized(data, crop)).permute(2, 0, 1)
    except (OSError, ValueError, SyntaxError) as exn:
        detail = "" if isinstance(exn, UnidentifiedImageError) else f": {exn}"  # that one names only a BytesIO
        raise GenerateError(f"{path} is not an image that decodes (JPEG, PNG or another format Pillow "
                            f"reads){detail}") from exn


def read_images(paths: list[Path], crop: str, device) -> torch.Tensor:
    """(N, 3, 64, 64) floats in [0, 1] on `device`."""
    return torch.stack([read_image(p, crop) for p in paths]).to(device).float().div(255)


@torch.no_grad()
def main(args) -> Path:
    device = torch.device(args.device)
    model = load_model(args.weights, args.z_dim, device)
    if args.mode == "reconstruct":
        x = read_images(image_files(args.reconstruct, args.limit), args.crop, device)
        grid = figures.reconstruction_grid(model, x, per_row=min(len(x), 8))
    elif args.mode == "interpolate":
        a, b = read_images(args.interpolate, args.crop, device).chunk(2)
        grid = figures.interpolation_grid(model, a, b, args.steps)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        grid = figures.sample_grid(model, args.samples, model.z_dim, device, args.temperature, generator)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, args.out)
    return args.out


def run(argv=None) -> int:
    """main() with bad input as one line on stderr and exit code 1."""
    args = parse_args(argv)
    try:
        out = main(args)
    except GenerateError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
