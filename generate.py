"""Faces from trained weights: samples, reconstructions of your images, interpolations, attribute
edits, and how good the samples are.

    python generate.py                                         # 64 samples -> samples.png
    python generate.py --samples 16 --temperature 0.8 --seed 1
    python generate.py --sampler gmm                           # from the ex-post GMM beside the weights
    python generate.py --reconstruct photo.jpg more_photos/    # each image over its reconstruction
    python generate.py --interpolate a.jpg b.jpg --steps 10    # a row from a to b through z
    python generate.py --attribute Smiling --strength 1.5      # rows of faces from -1.5 to +1.5 along a vector
    python generate.py --fit-gmm output/old/vae_celeba.pth --data-path dataset/celeba/shards
    python generate.py --evaluate --data-path dataset/celeba/shards [--fid 64]

Needs only the weights file that train.py writes (OUTPUT_DIR/vae_celeba.pth); --sampler gmm and
--attribute also read the files train.py (or --fit-gmm) writes beside it, vae_celeba.gmm.pt and
vae_celeba.attributes.pt. Images go through the loaders' own decode, crop and resize
(pipeline.torch_loader.decode_resized), so a photo reaches the model exactly as the training faces
did; give --crop none for weights trained with --crop none. Reconstructions and interpolation ends
use the posterior mean, z = mu. A flag that belongs to another mode is refused, not ignored.
"""

import argparse
import sys
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from torchvision.utils import make_grid, save_image

from common import cli
from common.files import atomic_write, read_regular
from model import VariationalAutoEncoder, fid, figures, quality
from model.assess import assess, first_images
from pipeline import build_loader
from pipeline.attributes import AttributeFileError, shard_attributes
from pipeline.cache_file import decoder_of
from pipeline.geometry import CROPS
from pipeline.images import DEFAULT_QUALITY, TooManyPixels, stored_form
from pipeline.shards import DataError, load_manifest
from pipeline.torch_loader import decode_resized
from run import fid_plan
from run.checkpoint import CheckpointError, load_weights
from run.folder import METRICS
from run.record import MetricsFile

MAX_FILE_BYTES = 1 << 28  # of an image to reconstruct: over any camera's JPEG, short of memory trouble
MODES = ("samples", "reconstruct", "interpolate", "attribute", "fit_gmm", "evaluate")
DEFAULT_OUT = {"samples": "samples.png", "reconstruct": "reconstructions.png", "interpolate": "interpolation.png",
               "attribute": "attribute.png"}
# The flags each mode reads; one given with another mode is refused. --weights, --z-dim, --device: every mode.
MODE_FLAGS = {
    "samples": {"temperature", "seed", "sampler", "out"},
    "reconstruct": {"limit", "crop", "out"},
    "interpolate": {"steps", "crop", "out"},
    "attribute": {"strength", "steps", "rows", "temperature", "seed", "sampler", "out"},
    "fit_gmm": {"data_path", "crop", "seed"},
    "evaluate": {"data_path", "crop", "seed", "images", "fid", "fid_weights"},
}
STEPS = {"interpolate": figures.INTERPOLATION_STEPS, "attribute": quality.ATTRIBUTE_STEPS}


class GenerateError(RuntimeError):
    """Stops with a one-line message for the user rather than a traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The flags; parse_args adds the checks that involve several of them."""
    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--weights", type=Path, default=Path("output/vae_celeba.pth"),
                   help="a state_dict written by train.py (its default --output-dir is output/)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--samples", type=cli.positive_int, default=64, metavar="N",
                      help="decode N faces from --sampler's z (what runs when no other mode is given)")
    mode.add_argument("--reconstruct", nargs="+", type=Path, metavar="FILE|FOLDER",
                      help=f"image files, and folders whose {'/'.join(cli.IMAGE_SUFFIXES)} files are taken in name order; "
                           "each image over its reconstruction")
    mode.add_argument("--interpolate", nargs=2, type=Path, metavar=("A", "B"),
                      help="two image files: A, decodings along the straight line in z between their posterior "
                           "means, B")
    mode.add_argument("--attribute", metavar="NAME", help="rows of faces moved along the attribute's vector, "
                      "mean(z | NAME) - mean(z | not NAME) over the training split, from -S to +S (--strength)")
    mode.add_argument("--fit-gmm", nargs="?", const=None, type=Path, metavar="WEIGHTS",
                      help="fit the ex-post GMM (10 components, full covariance) to the posterior means of "
                           "--data-path's training split and write it beside WEIGHTS (default: --weights), with "
                           "the attribute vectors when the shards have attributes: for runs made before train.py "
                           "wrote them")
    mode.add_argument("--evaluate", action="store_true",
                      help="the SWD of prior samples, GMM samples (when the GMM is there) and reconstructions "
                           "against --data-path's validation images (and FID and KID: --fid), appended to "
                           "metrics.jsonl beside the weights")
    p.add_argument("--sampler", choices=("prior", "gmm"), default="prior",
                   help="--samples, --attribute: z from N(0, I), or from the ex-post GMM beside the weights")
    p.add_argument("--temperature", type=cli.nonnegative_float, default=1.0, metavar="T",
                   help="--samples, --attribute: scale of z's spread (of eps for prior, of each component's "
                        "deviation for gmm); below 1 gives more typical, blander faces")
    p.add_argument("--seed", type=cli.seed, default=0, help="z of --samples and --attribute, patches of --evaluate, "
                   "initialisation of --fit-gmm (train.py's generated_samples.png is --samples 64 with its --seed)")
    p.add_argument("--limit", type=cli.positive_int, default=64, help="--reconstruct: at most this many images")
    p.add_argument("--steps", type=cli.int_at_least(2), default=None,
                   help=f"--interpolate: decodings along the line, both ends included (None: "
                        f"{STEPS['interpolate']}); --attribute: faces per row (None: {STEPS['attribute']})")
    p.add_argument("--strength", type=cli.positive_float, default=quality.ATTRIBUTE_STRENGTH, metavar="S",
                   help="--attribute: each row runs from -S to +S times the attribute's vector")
    p.add_argument("--rows", type=cli.positive_int, default=8, help="--attribute: faces, one row each")
    p.add_argument("--data-path", default="dataset/celeba/shards", help="--fit-gmm, --evaluate: shards from "
                   "prep/shard.py")
    p.add_argument("--images", type=cli.int_at_least(2), default=quality.SWD_IMAGES,
                   help="--evaluate: at most this many validation images, and as many generated ones per set")
    fid_plan.add_flags(p, "--evaluate: ")
    p.add_argument("--out", type=cli.image_path, default=None,
                   help=f"the picture to write ({', '.join(cli.IMAGE_SUFFIXES)}); None: "
                        f"{', '.join(f'{v} for --{k}' for k, v in DEFAULT_OUT.items())}")
    p.add_argument("--z-dim", type=cli.positive_int, default=None, help="latent dimensions; must match the weights "
                   "(None: read from them)")
    p.add_argument("--crop", choices=CROPS, default="center", help="the crop the weights were trained with "
                   "(train.py --crop)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return p


def parse_args(argv=None):
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    given = cli.given_flags(p, argv)
    args.mode = next((m for m in MODES[1:] if m in given), "samples")
    cli.refuse_other_modes(p, given, args.mode, MODE_FLAGS)
    if args.mode == "fit_gmm":
        if args.fit_gmm is not None and "weights" in given and args.fit_gmm != args.weights:
            p.error("--fit-gmm WEIGHTS and --weights name different files; give one")
        args.weights = args.fit_gmm or args.weights
    if args.steps is None and args.mode in STEPS:
        args.steps = STEPS[args.mode]
    if args.out is None and args.mode in DEFAULT_OUT:
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
                            f"{cli.first_line(exn)}") from exn
    return model.to(device).eval()


def image_files(paths: list[Path], limit: int) -> list[Path]:
    """Files as given, folders expanded to their images in name order; at most `limit`."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in cli.IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise GenerateError(f"{path}: no {'/'.join(cli.IMAGE_SUFFIXES)} files in this folder")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise GenerateError(f"{path}: no such file or folder")
    return files[:limit]


def read_image(path: Path, crop: str) -> torch.Tensor:
    """An image file -> (3, 64, 64) uint8 as a training image would be: the bytes prep/shard.py would store
    (pipeline/images.py's `stored_form`: EXIF orientation applied, anything a decoder could read otherwise
    re-encoded), then the loaders' decode, crop and resize."""
    try:
        data = read_regular(path, MAX_FILE_BYTES, follow_links=True)
    except OSError as exn:
        raise GenerateError(f"{path}: cannot read it ({exn.strerror or exn})") from None
    try:
        data, _ = stored_form(data, DEFAULT_QUALITY, what=str(path))
        return torch.from_numpy(decode_resized(data, crop)).permute(2, 0, 1)
    except TooManyPixels as exn:
        raise GenerateError(str(exn)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exn:
        detail = "" if isinstance(exn, UnidentifiedImageError) else f": {exn}"  # that one names only a BytesIO
        raise GenerateError(f"{path} is not an image that decodes (JPEG, PNG or another format Pillow "
                            f"reads){detail}") from None


def read_images(paths: list[Path], crop: str, device) -> torch.Tensor:
    """(N, 3, 64, 64) floats in [0, 1] on `device`."""
    return torch.stack([read_image(p, crop) for p in paths]).to(device).float().div(255)


def sibling(args, suffix: str, made_by: str) -> Path:
    path = quality.weights_sibling(args.weights, suffix)
    if not path.is_file():
        raise GenerateError(f"no {path} beside the weights: {made_by}, or run generate.py --fit-gmm "
                            f"{args.weights} --data-path SHARDS")
    return path


def latents(args, n: int, z_dim: int) -> torch.Tensor:
    """n latents from --sampler with --seed and --temperature."""
    gmm = None
    if args.sampler == "gmm":
        gmm = quality.load_gmm(sibling(args, quality.GMM_SUFFIX, "train.py writes it after training"))
    return quality.draw_latents(n, z_dim, torch.Generator().manual_seed(args.seed), args.temperature, gmm)


def split_batches(args, split: str, device, keys: bool = False):
    """--data-path's split once, in stored order, as the loaders decode it (the torch loader)."""
    try:
        return build_loader("torch", args.data_path, split, 64, device, train=False, workers=1, crop=args.crop,
                            with_keys=keys)
    except DataError as exn:
        raise GenerateError(str(exn)) from None


def to_input(device):
    return lambda images: images.to(device).float().div(255)


def fit_gmm(model, args, device) -> list[Path]:
    """The GMM, and attribute vectors when the shards have attributes, written beside the weights."""
    attributes = shard_attributes(args.data_path, load_manifest(args.data_path))
    return assess(model, args.weights, seed=args.seed, batch_size=64, to_input=to_input(device),
                  train=split_batches(args, "train", device, keys=True), attributes=attributes)[1]


def evaluate(model, args, device) -> dict:
    """The SWD of each sampler and of reconstructions (and FID and KID: --fid, by default on CUDA) against
    the validation images, as a metrics.jsonl row."""
    n_fid = fid_plan.images(args.fid, device)
    network = fid_plan.network(args.fid_weights, device, asked=bool(args.fid)) if n_fid else None
    batches = split_batches(args, "val", device, keys=True)
    val, keys = first_images(batches, max(args.images, n_fid if network else 0), keys=True)
    fid_reals = None
    if network is not None:
        fid_reals, line = fid_plan.reals(network, val[:n_fid], keys[:n_fid], args.data_path, args.crop,
                                         decoder_of(batches)[1])
        print(line)
    found, _ = assess(model, args.weights, seed=args.seed, batch_size=64, to_input=to_input(device),
                      real=val[:args.images], fid_reals=fid_reals)
    return {"kind": "evaluate", "weights": args.weights.name, **found}


@torch.no_grad()
def main(args) -> list[Path]:
    device = torch.device(args.device)
    if args.mode == "evaluate":
        fid_plan.check(args)  # the FID network's file, when asked for, before any work
    model = load_model(args.weights, args.z_dim, device)
    if args.mode == "fit_gmm":
        return fit_gmm(model, args, device)
    if args.mode == "evaluate":
        row = evaluate(model, args, device)
        metrics = MetricsFile(args.weights.parent / METRICS)
        metrics.append(row)
        print(" | ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
        return [metrics.path]
    if args.mode == "reconstruct":
        x = read_images(image_files(args.reconstruct, args.limit), args.crop, device)
        grid = figures.reconstruction_grid(model, x, per_row=min(len(x), 8))
    elif args.mode == "interpolate":
        a, b = read_images(args.interpolate, args.crop, device).chunk(2)
        grid = figures.interpolation_grid(model, a, b, args.steps)
    elif args.mode == "attribute":
        vectors = quality.load_attribute_vectors(sibling(args, quality.ATTRIBUTES_SUFFIX,
                                                         "train.py writes it when the shards have attributes"))
        if args.attribute not in vectors["names"]:
            raise GenerateError(f"--attribute {args.attribute}: no such attribute in "
                                f"{quality.weights_sibling(args.weights, quality.ATTRIBUTES_SUFFIX)}; known: "
                                f"{', '.join(vectors['names']) or 'none'}")
        vector = vectors["vectors"][vectors["names"].index(args.attribute)]
        grid = quality.attribute_grid(model, latents(args, args.rows, model.z_dim).to(device), vector,
                                      args.strength, args.steps)
    else:
        z = latents(args, args.samples, model.z_dim)
        grid = make_grid(model.decode(z.to(device)).float(), nrow=quality.grid_side(args.samples))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, args.out)
    return [args.out]


def run(argv=None) -> int:
    """main() with bad input as one line on stderr and exit code 1."""
    args = parse_args(argv)
    try:
        written = main(args)
    except (GenerateError, quality.QualityError, AttributeFileError, DataError, fid.FidError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
