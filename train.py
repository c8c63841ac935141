"""Train the convolutional VAE on CelebA shards.

    python train.py --data-path dataset/celeba/shards              # one GPU or the CPU
    torchrun --nproc_per_node 4 train.py --data-path ...            # several GPUs, same flags

Reads top to bottom: config, checkpoints, one epoch of training, evaluation and pictures, then
main(), the epoch loop. Writes into --output-dir: reconstructions_epoch{n}.png and curves.png
(each epoch), generated_samples.png and interpolations.png (after training), vae_celeba.pth (a plain
CPU state_dict that `VariationalAutoEncoder(z_dim=128).load_state_dict(torch.load(...))` takes),
checkpoint.pt and checkpoint.prev.pt (resumable: the newest and the one before, rotated after each
epoch), metrics.jsonl (one line per epoch) and, with --tensorboard, TensorBoard event files in tb/.
It refuses to start in a folder that holds another run unless told to --resume it or to --overwrite it.
"""

import argparse
import json
import math
import os
import random
import shutil
import re
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from model import BETA, VariationalAutoEncoder, VAELoss, vae_loss
from model import figures, metrics, quality
from model.checkpoint import (CheckpointError, load_checkpoint, previous, restore_checkpoint, save_checkpoint,
                              save_weights, setting_changes, settings_of)
from model.step import TrainStep, make_optimizer, resolve_amp, resolve_compile
from pipeline import CROPS, LOADERS, DataError, build_loader, cli, default_workers, split_size
from pipeline.cache import CACHE_MODES, MEMORY_FRACTION, plan as plan_cache
from pipeline.attributes import shard_attributes
from pipeline.files import atomic_write
from pipeline.shards import load_manifest, split_shards

LOG_EVERY = 25  # steps between host syncs: reading the loss forces the GPU to catch up
CHECKPOINT, WEIGHTS, METRICS = "checkpoint.pt", "vae_celeba.pth", "metrics.jsonl"  # in --output-dir

# ----------------------------------------------------------------------------- config


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default and keeps the module docstring's layout."""


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-path", default="dataset/celeba/shards",
                   help="folder with manifest.json and shards written by prep/shard.py")
    p.add_argument("--loader", choices=LOADERS, default="torch",
                   help="torch: webdataset + DataLoader; dali: NVIDIA DALI pipeline (pip install nvidia-dali-cuda130)")
    p.add_argument("--cache", choices=CACHE_MODES, default="auto",
                   help="decode the train and val images once, with --loader, into one tensor in GPU memory (CUDA) "
                   "or RAM, and serve every epoch from it. auto: when the train split fits in "
                   f"{MEMORY_FRACTION * 100:.0f}%% of the free GPU memory or available RAM (val too when both "
                   "fit) and more than one epoch remains; a resumed run keeps the choice it started with. on: "
                   "always, an error if it does not fit. off: decode every epoch")
    p.add_argument("--epochs", type=cli.positive_int, default=40, help="total epochs, counting resumed ones")
    p.add_argument("-b", "--batch-size", type=cli.positive_int, default=128, help="images per step and per GPU")
    p.add_argument("--lr", type=cli.positive_float, default=3e-4, help="Adam learning rate")
    p.add_argument("--beta", type=cli.nonnegative_float, default=BETA, help="KL weight; BCE is a per-pixel mean and KL a per-image "
                   "sum, so 1.0 collapses to one average face")
    p.add_argument("--z-dim", type=cli.positive_int, default=128, help="latent dimensions")
    p.add_argument("-j", "--workers", type=cli.count, default=default_workers(),
                   help="loader processes (torch) or threads (dali); the default is min(8, CPU cores - 1), at least 1")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (CUDA when present); "
                   "under torchrun, CUDA is cuda:LOCAL_RANK for each process")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="mixed precision: auto is "
                   "bf16 on CUDA and on CPUs with bf16 units (avx512_bf16 or AMX), off on other CPUs, where bf16 is "
                   "emulated and slower; fp16 uses a GradScaler")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format, faster convolutions on GPUs")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step; None: on for CUDA and for bf16 on a CPU (with a C++ compiler), "
                   "off for fp32 on a CPU, where it gained too little (benchmarks/RESULTS.md)")
    p.add_argument("--crop", choices=CROPS, default="center", help="center: the usual 148x148 CelebA-64 crop; "
                   "none: squash the whole 178x218 frame like the original seed code")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips of training images")
    p.add_argument("--output-dir", default="output", help="where images, weights and logs go")
    previous_run = p.add_mutually_exclusive_group()
    previous_run.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                              help="continue from a checkpoint (given without a path: OUTPUT_DIR/checkpoint.pt, "
                                   "or checkpoint.prev.pt when that one is damaged)")
    previous_run.add_argument("--overwrite", action="store_true",
                              help="start over in an --output-dir that holds a previous run, deleting its outputs")
    p.add_argument("--resume-force", action="store_true",
                   help="--resume even when settings that change the result (--batch-size, --lr, --beta, --crop, "
                        "--flip, --seed, --loader, world size) differ from the checkpoint's")
    p.add_argument("--seed", type=cli.seed, default=0, help="seed for weights, data order, flips and sampling")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads per process; None: torch's default "
                   "(OMP_NUM_THREADS, else every core), and under torchrun with several processes on a machine "
                   "its cores divided among them, where torchrun's own OMP_NUM_THREADS=1 counts as unset")
    p.add_argument("--dist-timeout", type=cli.positive_float, default=300, help="under torchrun: seconds a rank waits for the "
                   "others in a collective (a gradient all-reduce, a metric sum) before the job stops with an error")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs to OUTPUT_DIR/tb: "
                   f"training scalars every {LOG_EVERY} steps, validation figures and reconstructions each epoch "
                   "(pip install tensorboard)")
    args = p.parse_args(argv)
    if args.resume == "":
        args.resume = str(Path(args.output_dir) / CHECKPOINT)
    if args.resume_force and args.resume is None:
        p.error("--resume-force goes with --resume")
    return args


class TrainingError(RuntimeError):
    """Stops training with a message for the user rather than a traceback."""


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(requested: int | None, local_world_size: int, env=os.environ) -> int | None:
    """Threads for this process's CPU ops, or None to keep torch's default (OMP_NUM_THREADS, else every core).

    torchrun sets OMP_NUM_THREADS=1 for every process when it starts several on a machine and the
    variable was unset, which leaves all but a few cores idle when training on the CPU. Its 1 cannot
    be told from a user's, so with several local processes OMP_NUM_THREADS=1 counts as unset and the
    cores are divided among the processes; --threads 1 forces one thread."""
    if requested:
        return requested
    if local_world_size > 1 and env.get("OMP_NUM_THREADS", "1") == "1":
        return max(1, usable_cores() // local_world_size)
    return None


def setup_device(args):
    """(device, rank, world_size): several processes under torchrun, one GPU each; else one process."""
    threads = cpu_threads(args.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads:
        torch.set_num_threads(threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
        # Every collective gives up after --dist-timeout: a rank that died or hangs ends the job, not a wait.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.dist_timeout))
        rank, world_size = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    else:
        rank, world_size = 0, 1
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device refuses a device without an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, rank, world_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce(stats: torch.Tensor) -> torch.Tensor:
    """Sums `stats` over the ranks (in place) when training on several."""
    if dist.is_initialized():
        dist.all_reduce(stats)
    return stats


# ----------------------------------------------------------------------------- checkpoints


def resume_state(args, world_size: int, master: bool):
    """(checkpoint state, its path) that --resume names, checked against this run's settings; None when
    the run it belongs to is already complete, which changes nothing."""
    state, source, note = load_checkpoint(Path(args.resume))
    if note and master:
        print(note, file=sys.stderr)
    done = state["epoch"]
    if done >= args.epochs and (Path(args.output_dir) / WEIGHTS).is_file():
        if master:
            print(f"{source} has finished epoch {done} and --epochs is {args.epochs}: the run is already complete; "
                  f"nothing changed. Raise --epochs to train further")
        return None
    changes = setting_changes(state, settings_of(vars(args), world_size))
    if "z_dim" in changes:
        raise CheckpointError(f"--resume: {changes['z_dim']}: the weights have another shape, which even "
                              f"--resume-force cannot change; resume with --z-dim {state['args']['z_dim']}")
    if changes and not args.resume_force:
        raise CheckpointError("\n".join([f"--resume: {source} was trained with other settings, which change the "
                                         "result:", *(f"  {line}" for line in changes.values()),
                                         "use the checkpoint's settings, or add --resume-force to carry on "
                                         "with these"]))
    if changes and master:
        print("\n".join(f"--resume-force: {line}" for line in changes.values()), file=sys.stderr)
    return state, source


# ----------------------------------------------------------------------------- the output folder

RUN_FILES = (CHECKPOINT, previous(Path(CHECKPOINT)).name, WEIGHTS, METRICS)  # the marks of a previous run
OUTPUTS = (*RUN_FILES, *(f"{name}.tmp" for name in RUN_FILES), f"{CHECKPOINT}.damaged", "generated_samples.png",
           "reconstructions_epoch*.png", "curves.png", "interpolations.png", "tb", *quality.outputs(WEIGHTS))


def check_output_dir(args) -> None:
    """Before anything is read or written: the folder can be written into, and holds no run that this
    one would overwrite or mix with."""
    out_dir = Path(args.output_dir)
    problem = cli.unwritable(out_dir)
    if problem:
        raise TrainingError(f"--output-dir {out_dir}: {problem}; choose another folder")
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not found or args.overwrite:
        return
    if not args.resume:
        raise TrainingError(f"{out_dir} holds a previous run ({', '.join(found)}): add --resume to continue it, "
                            f"--overwrite to start over and delete it, or choose another --output-dir")
    if Path(args.resume).resolve().parent != out_dir.resolve():
        raise TrainingError(f"{out_dir} holds another run ({', '.join(found)}) than the one --resume {args.resume} "
                            f"continues; choose another --output-dir")


def prepare_output_dir(out_dir: Path, overwrite: bool, resumed_epoch: int, resumed_from: Path | None) -> None:
    """Right before the first epoch, once every flag and path has been checked: creates the folder,
    deletes a previous run's outputs (--overwrite), and on --resume drops the metrics of the epochs
    that will be trained again and sets a damaged checkpoint aside."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for pattern in OUTPUTS:
            for path in out_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()  # tb/ is a folder
    if resumed_from is not None and resumed_from.name == previous(Path(CHECKPOINT)).name:
        damaged = resumed_from.with_name(CHECKPOINT)
        if damaged.exists():  # else the next save would keep it as the previous checkpoint
            os.replace(damaged, damaged.with_name(f"{CHECKPOINT}.damaged"))
    metrics_file = out_dir / METRICS
    if resumed_from is not None and metrics_file.exists():
        kept = []
        for line in metrics_file.read_text().splitlines():
            try:
                if json.loads(line)["epoch"] <= resumed_epoch:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash or a full disk
                pass
        tmp = metrics_file.with_name(metrics_file.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, metrics_file)


def write_failure(exn: OSError, out_dir: Path, last_good: tuple[Path, int] | None) -> TrainingError:
    """A failed write (full disk, permissions) as one line that says what survived and how to go on."""
    what = f"cannot write {exn.filename or out_dir} ({exn.strerror or exn})"
    fix = "free some space (or fix the permissions)"
    if last_good:
        return TrainingError(f"{what}; the last good checkpoint, {last_good[0]} (epoch {last_good[1]}), is "
                             f"untouched: {fix}, then run the same command with --resume")
    again = "with --overwrite" if any((out_dir / name).exists() for name in RUN_FILES) else "again"
    return TrainingError(f"{what}; no checkpoint was saved yet: {fix}, then run the same command {again}")


# ----------------------------------------------------------------------------- one epoch


def train_one_epoch(train_step, loader, epoch: int, args, world_size: int, out_dir: Path, show: bool,
                    log=None) -> dict:
    """Trains over one epoch of `loader`; returns the mean train VAELoss fields and the wall time.
    `log(global_step, means)` receives the VAELoss fields averaged over the steps since its last call."""
    device = train_step.device
    stats = torch.zeros(4, device=device)  # loss, bce, kl, neg_elbo, summed over steps
    logged, logged_steps = torch.zeros_like(stats), 0
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show, dynamic_ncols=True)
    started = time.perf_counter()
    try:  # closed however the epoch ends, so that an error is printed on a line of its own
        for step, images in enumerate(loader):
            stats += torch.stack(train_step(images))
            bar.update()
            if (step + 1) % LOG_EVERY == 0 or step + 1 == len(loader):
                mean = (stats / (step + 1)).tolist()
                if not all(map(math.isfinite, mean)):
                    raise TrainingError(
                        f"the loss became {mean[0]} in epoch {epoch + 1} near step {step + 1}; stopped without "
                        f"saving. The last good checkpoint is {out_dir / CHECKPOINT}: try a lower --lr, "
                        f"or --amp off if mixed precision is on, and --resume")
                seconds = time.perf_counter() - started
                bar.set_postfix(loss=f"{mean[0]:.4f}",
                                img_s=f"{(step + 1) * args.batch_size * world_size / seconds:.0f}")
                if log is not None:
                    window = ((stats - logged) / (step + 1 - logged_steps)).tolist()
                    log(epoch * len(loader) + step + 1, dict(zip(VAELoss._fields, window)))
                    logged, logged_steps = stats.clone(), step + 1
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    train = dict(zip(VAELoss._fields, (all_reduce(stats) / (len(loader) * world_size)).tolist()))
    return {**train, "seconds": seconds, "images_per_s": len(loader) * args.batch_size * world_size / seconds}


# ----------------------------------------------------------------------------- evaluation and pictures


@torch.no_grad()
def evaluate(model, loader, train_step, beta: float) -> dict:
    """Means per image over the whole split, every rank's share included: the VAELoss fields (with a
    sampled z, as in training), MSE and PSNR of the reconstruction from the posterior mean (model.metrics),
    and the KL of each latent dimension, summarised as the count of active dimensions."""
    device = train_step.device
    z_dim = model.z_dim
    model.eval()
    # Sums over images, one tensor so one all_reduce: count, loss, bce, kl, neg_elbo, mse, psnr, KL per dim.
    stats = torch.zeros(7 + z_dim, device=device)
    for images in loader:
        x = train_step.to_input(images)
        with train_step.autocast():
            mu, logvar = model.encode(x)
            # The sampled z gives the loss; the posterior mean gives the reconstruction quality. One decode.
            x_hat, x_mean = model.decode(torch.cat([model.reparameterize(mu, logvar), mu])).chunk(2)
        out = vae_loss(x_hat, x, mu, logvar, beta)
        mse = metrics.mse_per_image(x_mean, x)
        stats += torch.cat([torch.stack([torch.ones((), device=device), *out]) * len(x),
                            torch.stack([mse.sum(), metrics.psnr(mse).sum()]),
                            metrics.kl_per_dim(mu, logvar).sum(0)])
    model.train()
    stats = all_reduce(stats) / stats[0]
    mean_kl_per_dim = stats[7:].cpu()
    means = stats[1:7].tolist()
    return {**dict(zip(VAELoss._fields, means[:4])), "mse": means[4], "psnr": means[5],
            "active_dims": metrics.active_dims(mean_kl_per_dim),
            "kl_dim_median": mean_kl_per_dim.median().item(), "kl_dim_max": mean_kl_per_dim.max().item()}


@torch.no_grad()
def save_reconstructions(model, preview, train_step, path: Path) -> torch.Tensor:
    """Faces over their reconstructions from the posterior mean; returns the grid."""
    model.eval()
    with train_step.autocast():
        grid = figures.reconstruction_grid(model, train_step.to_input(preview))
    model.train()
    save_image(grid, path)
    return grid


@torch.no_grad()
def save_samples(model, z_dim: int, seed: int, device, path: Path) -> torch.Tensor:
    """64 faces decoded from z ~ N(0, I), the same z for the same seed; returns the grid."""
    model.eval()
    grid = figures.sample_grid(model, 64, z_dim, device, generator=torch.Generator().manual_seed(seed))
    save_image(grid, path)
    return grid


@torch.no_grad()
def save_interpolations(model, preview, train_step, path: Path) -> torch.Tensor | None:
    """A row per pair of preview faces: the pair's ends and the decodings along the line in z between
    their posterior means. None when there are fewer than two faces."""
    pairs = len(preview) // 2
    if pairs == 0:
        return None
    model.eval()
    x = train_step.to_input(preview[:2 * pairs])
    with train_step.autocast():
        grid = figures.interpolation_grid(model, x[0::2], x[1::2])
    save_image(grid, path)
    return grid


def tensorboard_writer():
    """torch's SummaryWriter class; a TrainingError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exn:
        raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard "
                            "(or pip install -e '.[tensorboard]')") from exn
    return SummaryWriter


def read_history(path: Path, epochs: int) -> list[dict]:
    """The metrics.jsonl rows of epochs 1..`epochs`, the last written of each: what a resumed run's
    curves continue from."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("epoch", 0) <= epochs and "kind" not in row:  # "kind": generate.py --evaluate's rows
                    rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


@torch.no_grad()
def finish_quality(model, train_loader, val_loader, preview, train_step, args, out_dir: Path) -> list[str]:
    """After training, on rank 0, in one pass over each split (from the resident cache when there is one):
    the ex-post GMM of the training split's posterior means beside the weights and its 64 faces
    (generated_samples_gmm.png, the prior grid's seed); the SWD of prior samples, GMM samples and
    reconstructions against the validation images; active units by covariance and by KL; with
    attributes in the shards, their vectors beside the weights and attributes.png. Adds its figures to
    the last epoch's metrics.jsonl row. Returns the names of the files written."""
    started = time.perf_counter()
    device, weights = train_step.device, out_dir / WEIGHTS
    missing = quality.missing_packages()
    if missing:  # a machine set up by hand without them still keeps its weights
        print(f"note: no GMM, SWD or attribute vectors: pip install {' '.join(missing)}", file=sys.stderr)
        return []

    def every_image(loader, split):  # the whole split once, in stored order, with keys
        if hasattr(loader, "cache"):
            from pipeline.cache import CachedLoader
            return CachedLoader(loader.cache, args.batch_size, train=False, with_keys=True)
        return build_loader(args.loader, args.data_path, split, args.batch_size, device, train=False,
                            workers=args.workers, crop=args.crop, with_keys=True)

    encode = dict(to_input=train_step.to_input, autocast=train_step.autocast, keys=True)
    train_mu, _, train_keys = quality.encode_batches(model, every_image(train_loader, "train"), **encode)
    real = []
    for images, _ in every_image(val_loader, "val"):
        real.append(images.cpu().contiguous())
        if sum(map(len, real)) >= quality.SWD_IMAGES:
            break
    real = torch.cat(real)[:quality.SWD_IMAGES]
    val_mu, val_logvar = quality.encode_batches(model, real.split(args.batch_size), train_step.to_input,
                                                train_step.autocast)
    gmm = quality.fit_gmm(train_mu, seed=args.seed)
    quality.save_tensors(quality.weights_sibling(weights, quality.GMM_SUFFIX), gmm)
    gmm = quality.load_gmm(quality.weights_sibling(weights, quality.GMM_SUFFIX))

    def decode(z):
        with train_step.autocast():
            return torch.cat([model.decode(c.to(device)).float().cpu() for c in z.split(args.batch_size)])

    grid_z = quality.draw_latents(64, args.z_dim, torch.Generator().manual_seed(args.seed), gmm=gmm)
    save_image(make_grid(decode(grid_z), nrow=8), out_dir / quality.GMM_SAMPLES)
    n = len(real)
    fakes = {"prior": quality.draw_latents(n, args.z_dim, torch.Generator().manual_seed(args.seed)),
             "gmm": quality.draw_latents(n, args.z_dim, torch.Generator().manual_seed(args.seed), gmm=gmm),
             "reconstructions": val_mu}
    distances = quality.swd(real, {k: quality.to_uint8(decode(z)) for k, z in fakes.items()}, seed=args.seed)
    record = {**{f"swd_{k}": sum(v) / len(v) for k, v in distances.items()},
              "swd_levels": distances, "swd_images": n, "swd_real": "val", "swd_seed": args.seed,
              "gmm_components": len(gmm["weights"]), "gmm_codes": gmm["codes"], "gmm_converged": gmm["converged"],
              "val_active_units_cov": quality.active_units(val_mu),
              "val_active_dims_kl": quality.active_dims_kl(val_mu, val_logvar), "active_images": n}
    written = [quality.weights_sibling(weights, quality.GMM_SUFFIX).name, quality.GMM_SAMPLES]
    try:
        known = shard_attributes(args.data_path, load_manifest(args.data_path))
    except quality.AttributeFileError as exn:  # the weights matter more than the attribute pictures
        print(f"warning: no attribute vectors: {exn}", file=sys.stderr)
        known = None
    if known is not None:
        names, table = known
        rows = [i for i, key in enumerate(train_keys) if key in table]
        values = torch.tensor([table[train_keys[i]] for i in rows], dtype=torch.int8).view(len(rows), len(names))
        vectors = quality.attribute_vectors(train_mu[rows], values, names)
        quality.save_tensors(quality.weights_sibling(weights, quality.ATTRIBUTES_SUFFIX), vectors)
        if len(vectors["names"]):
            start = quality.encode_batches(model, [preview[:1]], train_step.to_input, train_step.autocast)[0]
            with train_step.autocast():
                walks = [quality.attribute_walk(model, start.to(device), v.to(device)) for v in vectors["vectors"]]
            save_image(make_grid(torch.cat(walks).flatten(0, 1).float(), nrow=quality.ATTRIBUTE_STEPS),
                       out_dir / quality.ATTRIBUTE_GRID)
            written.append(quality.ATTRIBUTE_GRID)
        written.append(quality.weights_sibling(weights, quality.ATTRIBUTES_SUFFIX).name)
        record["attribute_names"] = vectors["names"]
    record["quality_seconds"] = time.perf_counter() - started
    lines = (out_dir / METRICS).read_text().splitlines()  # the last epoch's row gains these fields
    lines[-1] = json.dumps({**json.loads(lines[-1]), **record})
    atomic_write(out_dir / METRICS, "".join(line + "\n" for line in lines).encode())
    model.train()
    return written


# ----------------------------------------------------------------------------- main


def build_loaders(args, device, rank: int, world_size: int, cached=(), **options):
    """This rank's train and val loaders, served from the resident cache for the splits in `cached`;
    `options` go to build_loader (the tests ask for keys)."""
    master = rank == 0

    def loader(split):
        name, extra = ("cache", dict(source=args.loader, progress=master)) if split in cached else (args.loader, {})
        made = build_loader(name, args.data_path, split, args.batch_size, device, rank=rank,
                            world_size=world_size, workers=args.workers, seed=args.seed, crop=args.crop,
                            flip=args.flip if split == "train" else False, **extra, **options)
        if master and split in cached:
            n, seconds = len(made.cache), made.cache.seconds
            print(f"cached {split}: {n:,} images in {seconds:.1f} s, {n / seconds:,.0f} images/s")
        return made

    return loader("train"), loader("val")


def main(args):
    device, rank, world_size = setup_device(args)
    ddp, master = world_size > 1, rank == 0
    amp, amp_why = resolve_amp(args.amp, device)
    use_compile, compile_why = resolve_compile(args.compile, device, amp)
    out_dir = Path(args.output_dir)
    check_output_dir(args)  # creates nothing: a run that stops on a bad flag or path leaves no trace
    summary_writer = tensorboard_writer() if args.tensorboard else None
    resumed = resume_state(args, world_size, master) if args.resume else None
    if args.resume and resumed is None:
        if ddp:
            dist.destroy_process_group()
        return 0
    seed_everything(args.seed)
    threads = [torch.get_num_threads()] * world_size
    if ddp:
        dist.all_gather_object(threads, threads[rank])
    if master:  # the first line of a run: what runs where, and why where it was chosen for the user
        uses = f"CPU threads {threads[0]}"
        if ddp:
            each = f"{threads[0]} per process" if len(set(threads)) == 1 else f"{threads} by rank"
            uses = f"{world_size} processes ({dist.get_backend()}), CPU threads {each}"
        print(f"device {device} | amp {amp} ({amp_why}) | compile {'on' if use_compile else 'off'} ({compile_why}) | "
              f"channels_last {'on' if args.channels_last else 'off'} | {uses}")

    # ------------------------------------------------------------------------- data
    done, resumed_cache = (resumed[0]["epoch"], resumed[0]["args"].get("cache")) if resumed else (0, None)
    sizes = {split: split_size(args.data_path, split) for split in ("train", "val")}
    cached, why = plan_cache(args.cache, sizes, device, args.epochs - done, resumed_cache, args.loader)
    args.cache = "on" if "train" in cached else "off"  # saved in the checkpoint: a resume keeps the data order
    if master:
        print(why)

    train_loader, val_loader = build_loaders(args, device, rank, world_size, cached)
    if len(train_loader) == 0:
        images = sum(s.num_samples for s in split_shards(args.data_path, "train")) // world_size
        raise TrainingError(f"{args.data_path}: the train split has {images} images"
                            f"{' per process' if ddp else ''}, fewer than one batch of {args.batch_size}; "
                            f"lower --batch-size to at most {images}, or add images")
    preview = next(iter(val_loader))[:16]  # the same faces every epoch, so reconstructions compare

    # ------------------------------------------------------------------------- model
    raw_model = VariationalAutoEncoder(z_dim=args.z_dim).to(
        device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    model = DistributedDataParallel(raw_model) if ddp else raw_model
    optimizer = make_optimizer(raw_model.parameters(), args.lr, device)
    train_step = TrainStep(model, optimizer, device, amp=amp, channels_last=args.channels_last,
                           compile=use_compile, beta=args.beta)

    start_epoch, resumed_from = 0, None
    if resumed:
        state, resumed_from = resumed
        start_epoch = restore_checkpoint(state, raw_model, optimizer, train_step.scaler, device, args.lr)
        del state, resumed  # the tensors are in the model and optimizer now
        if master:
            print(f"resumed from {resumed_from} after epoch {start_epoch}")
    if master:
        print(f"{args.loader} loader: {train_loader.num_samples * world_size} training images per epoch, "
              f"{len(train_loader)} steps of {args.batch_size} x {world_size}")

    # ------------------------------------------------------------------------- the loop
    if master:
        prepare_output_dir(out_dir, args.overwrite, start_epoch, resumed_from)
    last_good = (resumed_from, start_epoch) if resumed_from else None
    writer = summary_writer(str(out_dir / "tb")) if summary_writer and master else None

    def log_step(step, means):
        for k, v in means.items():
            writer.add_scalar(f"train_step/{k}", v, step)
    # Curves and wall time continue across --resume from the rows already written.
    history = read_history(out_dir / METRICS, start_epoch) if master and start_epoch else []
    started = time.perf_counter() - (history[-1].get("wall_s", 0.0) if history else 0.0)
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            train_loader.set_epoch(epoch)
            train = train_one_epoch(train_step, train_loader, epoch, args, world_size, out_dir, show=master,
                                    log=log_step if writer is not None else None)
            val = evaluate(raw_model, val_loader, train_step, args.beta)
            if master:
                record = {"epoch": epoch + 1,
                          **{f"train_{k}": train[k] for k in VAELoss._fields},
                          **{f"val_{k}": v for k, v in val.items()},
                          "train_bits_per_dim": VAELoss.bits_per_dim(train["neg_elbo"]),
                          "val_bits_per_dim": VAELoss.bits_per_dim(val["neg_elbo"]),
                          "lr": optimizer.param_groups[0]["lr"],
                          "images_per_s": train["images_per_s"], "seconds": train["seconds"],
                          "wall_s": time.perf_counter() - started}
                history.append(record)
                # The checkpoint last: an epoch it holds has its pictures and its metrics line (a resume
                # drops the lines of epochs past the checkpoint).
                try:
                    grid = save_reconstructions(raw_model, preview, train_step,
                                                out_dir / f"reconstructions_epoch{epoch + 1}.png")
                    with open(out_dir / METRICS, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    figures.save_curves(history, out_dir / "curves.png")
                    save_checkpoint(out_dir / CHECKPOINT, raw_model, optimizer, train_step.scaler, epoch + 1, args,
                                    device, world_size)
                except OSError as exn:
                    raise write_failure(exn, out_dir, last_good) from None
                last_good = (out_dir / CHECKPOINT, epoch + 1)
                if writer is not None:
                    for k, v in record.items():
                        if k != "epoch":
                            writer.add_scalar(f"epoch/{k}", v, epoch + 1)
                    writer.add_image("reconstructions", grid, epoch + 1)
                    writer.flush()
                print(f"epoch {epoch + 1}: train loss {train['loss']:.4f} | val loss {val['loss']:.4f}, "
                      f"{record['val_bits_per_dim']:.3f} bits/dim, PSNR {val['psnr']:.2f} dB, "
                      f"{val['active_dims']}/{args.z_dim} active dims | {record['images_per_s']:.0f} img/s")
    except KeyboardInterrupt:
        if master:
            print(f"\ninterrupted in epoch {epoch + 1}; {out_dir / CHECKPOINT} holds the last whole epoch. "
                  f"Continue with the same command and --resume", file=sys.stderr)
        if writer is not None:
            writer.close()
        return 130

    if master:
        try:  # the weights last: they mark a finished run
            samples = save_samples(raw_model, args.z_dim, args.seed, device, out_dir / "generated_samples.png")
            lines = save_interpolations(raw_model, preview, train_step, out_dir / "interpolations.png")
            quality_files = finish_quality(raw_model, train_loader, val_loader, preview, train_step, args, out_dir)
            save_weights(out_dir / WEIGHTS, raw_model)
        except OSError as exn:
            raise write_failure(exn, out_dir, last_good) from None
        if writer is not None:
            writer.add_image("generated_samples", samples, args.epochs)
            if lines is not None:
                writer.add_image("interpolations", lines, args.epochs)
            writer.close()
        written = [WEIGHTS, "generated_samples.png"] + (["interpolations.png"] if lines is not None else []) \
            + quality_files
        print(f"wrote {', '.join(str(out_dir / name) for name in written)}")
    if ddp:
        dist.destroy_process_group()
    return 0


def lost_contact(exn: Exception) -> str | None:
    """Why a collective failed, in one line, when it failed because another rank died or stopped answering."""
    if not dist.is_initialized() or not (isinstance(exn, dist.DistError) or "gloo/transport" in str(exn)):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", str(exn).strip().splitlines()[0])  # gloo's "[source.cc:line] "
    return first.split(". ")[0]


def run(argv=None) -> int:
    """main() on parsed flags, with data, checkpoint and training errors as one line on stderr and exit code 1."""
    args = parse_args(argv)
    try:
        return main(args)
    except (DataError, TrainingError, CheckpointError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    except RuntimeError as exn:
        reason = lost_contact(exn)
        if reason is None:
            raise
        # The rank that failed prints its own error; this one only says why it stopped too.
        print(f"error: rank {dist.get_rank()} lost the other ranks ({reason}): another rank stopped with an error, "
              f"or stopped answering for --dist-timeout seconds", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the epochs, which main() handles itself
        saved = Path(args.output_dir) / CHECKPOINT
        print(f"\ninterrupted; {saved} holds the last whole epoch: continue with the same command and --resume"
              if saved.exists() else "\ninterrupted before an epoch was saved: run the same command again",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
