"""Train the convolutional VAE on CelebA shards.

    python train.py --data-path dataset/celeba/shards              # one GPU or the CPU
    torchrun --nproc_per_node 4 train.py --data-path ...            # several GPUs, same flags

Reads top to bottom: config, checkpoints, one epoch of training, evaluation and pictures, then
main(), the epoch loop. Writes into --output-dir: reconstructions_epoch{n}.png and curves.png
(each epoch), generated_samples.png and interpolations.png (after training), vae_celeba.pth (a plain
CPU state_dict that `VariationalAutoEncoder(z_dim=128).load_state_dict(torch.load(...))` takes),
checkpoint.pt (resumable, rewritten atomically after each epoch), metrics.jsonl (one line per
epoch) and, with --tensorboard, TensorBoard event files in tb/.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import save_image
from tqdm import tqdm

from model import BETA, VariationalAutoEncoder, VAELoss, vae_loss
from model import figures, metrics
from model.step import TrainStep
from pipeline import CROPS, LOADERS, DataError, build_loader

LOG_EVERY = 25  # steps between host syncs: reading the loss forces the GPU to catch up

# ----------------------------------------------------------------------------- config


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default and keeps the module docstring's layout."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-path", default="dataset/celeba/shards",
                   help="folder with manifest.json and shards written by prep/shard.py")
    p.add_argument("--loader", choices=LOADERS, default="torch",
                   help="torch: webdataset + DataLoader; dali: NVIDIA DALI pipeline (pip install nvidia-dali-cuda130)")
    p.add_argument("--epochs", type=int, default=40, help="total epochs, counting resumed ones")
    p.add_argument("-b", "--batch-size", type=int, default=128, help="images per step and per GPU")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    p.add_argument("--beta", type=float, default=BETA, help="KL weight; BCE is a per-pixel mean and KL a per-image "
                   "sum, so 1.0 collapses to one average face")
    p.add_argument("--z-dim", type=int, default=128, help="latent dimensions")
    p.add_argument("-j", "--workers", type=int, default=None, help="loader processes (torch) or threads (dali); "
                   "None: min(8, CPU cores - 1), at least 1")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (CUDA when present)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="mixed precision: auto is "
                   "bf16 on CUDA and off on CPU, where bf16 is much slower; fp16 uses a GradScaler")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format, faster convolutions on GPUs")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step; None: on for CUDA, off on CPU where it does not help")
    p.add_argument("--crop", choices=CROPS, default="center", help="center: the usual 148x148 CelebA-64 crop; "
                   "none: squash the whole 178x218 frame like the original seed code")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips of training images")
    p.add_argument("--output-dir", default="output", help="where images, weights and logs go")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint (given without a path: OUTPUT_DIR/checkpoint.pt)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order, flips and sampling")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs to OUTPUT_DIR/tb: "
                   f"training scalars every {LOG_EVERY} steps, validation figures and reconstructions each epoch "
                   "(pip install tensorboard)")
    args = p.parse_args(argv)
    if args.workers is None:
        args.workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    if args.resume == "":
        args.resume = str(Path(args.output_dir) / "checkpoint.pt")
    return args


class TrainingError(RuntimeError):
    """Stops training with a message for the user rather than a traceback."""


def setup_device(args):
    """(device, rank, world_size): several processes under torchrun, one GPU each; else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu")
    else:
        rank, world_size = 0, 1
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, rank, world_size


def resolve_amp(amp: str, device: torch.device) -> str:
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"


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


def save_checkpoint(path: Path, model, optimizer, scaler, epoch: int, args, device) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "epoch": epoch, "args": vars(args),
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a half checkpoint


def load_checkpoint(path: Path, model, optimizer, scaler, device) -> int:
    """Restores everything save_checkpoint wrote; returns the number of finished epochs."""
    if not Path(path).is_file():
        raise TrainingError(f"--resume: no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    random.setstate(ckpt["rng"]["python"])
    np.random.set_state(ckpt["rng"]["numpy"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["epoch"]


def save_weights(path: Path, model) -> None:
    """The plain CPU state_dict that the seed README's snippet loads."""
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


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
    for step, images in enumerate(loader):
        stats += torch.stack(train_step(images))
        bar.update()
        if (step + 1) % LOG_EVERY == 0 or step + 1 == len(loader):
            mean = (stats / (step + 1)).tolist()
            if not all(map(math.isfinite, mean)):
                bar.close()
                raise TrainingError(
                    f"the loss became {mean[0]} in epoch {epoch + 1} near step {step + 1}; stopped without "
                    f"saving. The last good checkpoint is {out_dir / 'checkpoint.pt'}: try a lower --lr, "
                    f"or --amp off if mixed precision is on, and --resume")
            seconds = time.perf_counter() - started
            bar.set_postfix(loss=f"{mean[0]:.4f}", img_s=f"{(step + 1) * args.batch_size * world_size / seconds:.0f}")
            if log is not None:
                window = ((stats - logged) / (step + 1 - logged_steps)).tolist()
                log(epoch * len(loader) + step + 1, dict(zip(VAELoss._fields, window)))
                logged, logged_steps = stats.clone(), step + 1
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


def open_tensorboard(log_dir: Path, master: bool):
    """A SummaryWriter on the master rank (None elsewhere); a TrainingError when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exn:
        raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard "
                            "(or pip install -e '.[tensorboard]')") from exn
    return SummaryWriter(str(log_dir)) if master else None


def read_history(path: Path, epochs: int) -> list[dict]:
    """The metrics.jsonl rows of epochs 1..`epochs`, the last written of each: what a resumed run's
    curves continue from."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("epoch", 0) <= epochs:
                    rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


# ----------------------------------------------------------------------------- main


def main(args):
    device, rank, world_size = setup_device(args)
    ddp, master = world_size > 1, rank == 0
    amp = resolve_amp(args.amp, device)
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)

    # ------------------------------------------------------------------------- data
    def loader(split):
        return build_loader(args.loader, args.data_path, split, args.batch_size, device, rank=rank,
                            world_size=world_size, workers=args.workers, seed=args.seed, crop=args.crop,
                            flip=args.flip if split == "train" else False)

    train_loader, val_loader = loader("train"), loader("val")
    if len(train_loader) == 0:
        raise TrainingError(f"{args.data_path}: the train split has {train_loader.num_samples} images per rank, "
                            f"fewer than one batch of {args.batch_size}; lower --batch-size or add images")
    preview = next(iter(val_loader))[:16]  # the same faces every epoch, so reconstructions compare

    # ------------------------------------------------------------------------- model
    raw_model = VariationalAutoEncoder(z_dim=args.z_dim).to(
        device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    model = DistributedDataParallel(raw_model) if ddp else raw_model
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=args.lr)
    train_step = TrainStep(model, optimizer, device, amp=amp, channels_last=args.channels_last,
                           compile=use_compile, beta=args.beta)

    start_epoch = 0
    if args.resume:
        start_epoch = load_checkpoint(Path(args.resume), raw_model, optimizer, train_step.scaler, device)
        if master:
            print(f"resumed from {args.resume} after epoch {start_epoch}")
    if master:
        print(f"{args.loader} loader: {train_loader.num_samples * world_size} training images per epoch, "
              f"{len(train_loader)} steps of {args.batch_size} x {world_size} | device {device}, amp {amp}, "
              f"compile {'on' if use_compile else 'off'}, channels_last {'on' if args.channels_last else 'off'}")

    # ------------------------------------------------------------------------- the loop
    writer = open_tensorboard(out_dir / "tb", master) if args.tensorboard else None
    log_step = None
    if writer is not None:
        def log_step(step, means):
            for k, v in means.items():
                writer.add_scalar(f"train_step/{k}", v, step)
    # Curves and wall time continue across --resume from the rows already written.
    history = read_history(out_dir / "metrics.jsonl", start_epoch) if master and start_epoch else []
    started = time.perf_counter() - (history[-1].get("wall_s", 0.0) if history else 0.0)
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            train_loader.set_epoch(epoch)
            train = train_one_epoch(train_step, train_loader, epoch, args, world_size, out_dir, show=master,
                                    log=log_step)
            val = evaluate(raw_model, val_loader, train_step, args.beta)
            if master:
                grid = save_reconstructions(raw_model, preview, train_step,
                                            out_dir / f"reconstructions_epoch{epoch + 1}.png")
                save_checkpoint(out_dir / "checkpoint.pt", raw_model, optimizer, train_step.scaler, epoch + 1, args,
                                device)
                record = {"epoch": epoch + 1,
                          **{f"train_{k}": train[k] for k in VAELoss._fields},
                          **{f"val_{k}": v for k, v in val.items()},
                          "train_bits_per_dim": VAELoss.bits_per_dim(train["neg_elbo"]),
                          "val_bits_per_dim": VAELoss.bits_per_dim(val["neg_elbo"]),
                          "lr": optimizer.param_groups[0]["lr"],
                          "images_per_s": train["images_per_s"], "seconds": train["seconds"],
                          "wall_s": time.perf_counter() - started}
                history.append(record)
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                figures.save_curves(history, out_dir / "curves.png")
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
            print(f"\ninterrupted in epoch {epoch + 1}; {out_dir / 'checkpoint.pt'} holds the last whole epoch. "
                  f"Continue with the same command and --resume", file=sys.stderr)
        if writer is not None:
            writer.close()
        return 130

    if master:
        samples = save_samples(raw_model, args.z_dim, args.seed, device, out_dir / "generated_samples.png")
        lines = save_interpolations(raw_model, preview, train_step, out_dir / "interpolations.png")
        save_weights(out_dir / "vae_celeba.pth", raw_model)
        if writer is not None:
            writer.add_image("generated_samples", samples, args.epochs)
            if lines is not None:
                writer.add_image("interpolations", lines, args.epochs)
            writer.close()
        written = ["vae_celeba.pth", "generated_samples.png"] + (["interpolations.png"] if lines is not None else [])
        print(f"wrote {', '.join(str(out_dir / name) for name in written)}")
    if ddp:
        dist.destroy_process_group()
    return 0


def run(argv=None) -> int:
    """main() on parsed flags, with data and training errors as one line on stderr and exit code 1."""
    try:
        return main(parse_args(argv))
    except (DataError, TrainingError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
