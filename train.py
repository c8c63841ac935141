"""Train the convolutional VAE on CelebA shards.

    python train.py --data-path dataset/celeba/shards              # one GPU or the CPU
    torchrun --nproc_per_node 4 train.py --data-path ...            # several GPUs, same flags

The experiment, top to bottom: the flags, one epoch of training (train_one_epoch), the evaluation,
the data, and main(): the setup of the model and its step, then the epoch loop, which hands each
epoch to the run's record. One epoch reads in four files: this one, model/step.py (the step),
pipeline/cache.py (the data resident in memory) and run/record.py (what the epoch leaves behind).

The run around it (output folder, record, checkpoints, recovery) lives in run/. It writes into
--output-dir: reconstructions_epoch{n}.png and curves.png (every --figures-every epochs and after the
last, drawn on a background thread), generated_samples.png and interpolations.png (after training),
vae_celeba.pth (a plain CPU state_dict for `VariationalAutoEncoder().load_state_dict(torch.load(...))`), checkpoint.pt and
checkpoint.prev.pt (resumable: the newest and the one before, rotated after each epoch, or every
--checkpoint-every epochs), metrics.jsonl (one line per epoch: the metrics and the training thread's
seconds in each part of the epoch), run.json (the settings and the files the run wrote) and, with
--tensorboard, TensorBoard event files in tb/. It refuses to start in a folder that holds another run
unless told to --resume it or to --overwrite it, and in a folder where files it did not write hold its
output names.
"""

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import cli
from model import BETA, VariationalAutoEncoder, VAELoss, figures, metrics, vae_loss
from model.fid import FidError
from model.step import TrainStep, choose_step, make_optimizer, resolve_amp, resolve_compile
from pipeline import CROPS, DALI_INSTALL, LOADERS, DataError, build_loader, default_workers, split_size
from pipeline.cache import CACHE_MODES, MEMORY_FRACTION, plan as plan_cache
from pipeline.cache_file import DISK_RESERVE, FILE_MODES
from pipeline.geometry import CROP_SIDE
from pipeline.shards import data_identity, split_shards
from run import fid_plan
from run.checkpoint import SETTINGS, CheckpointError, all_rng_states, previous, restore_checkpoint, resume_checkpoint
from run.folder import (CHECKPOINT, CURVES, MARKER, RECONSTRUCTIONS, TB, WEIGHTS, RunDirError, check_output_dir,
                        prepare_output_dir)
from run.launch import all_reduce, describe_setup, setup_device
from run.record import Record, saved_args, tensorboard_writer
from run.recovery import Diverged, TrainingError, diverged, interrupted, lost_contact

LOG_EVERY = 25  # steps between host syncs: reading the loss forces the GPU to catch up
EVAL_BATCH = 1024  # images per evaluation batch served from the resident cache: fewer, larger launches

# ----------------------------------------------------------------------------- config


def build_parser() -> argparse.ArgumentParser:
    """The flags; parse_args adds the checks that involve several of them."""
    p = cli.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--data-path", default="dataset/celeba/shards",
                   help="folder with manifest.json and shards written by prep/shard.py")
    p.add_argument("--loader", choices=LOADERS, default="torch",
                   help=f"torch: webdataset + DataLoader; dali: NVIDIA DALI pipeline ({DALI_INSTALL})")
    p.add_argument("--cache", choices=CACHE_MODES, default="auto",
                   help="decode the train and val images once, with --loader, into one tensor in GPU memory (CUDA) "
                   "or RAM, and serve every epoch from it. auto: when the train split fits in "
                   f"{MEMORY_FRACTION * 100:.0f}%% of the free GPU memory or available RAM (val too when both "
                   "fit) and more than one epoch remains; a resumed run keeps the choice it started with. on: "
                   "always, an error if it does not fit. off: decode every epoch. The first fill also writes the "
                   "decoded split beside the shards (DATA_PATH/decoded-SPLIT-LOADER-DEVICE-CROP.u8, 12 kB per image) "
                   "and later runs load it instead of decoding; see --cache-file")
    p.add_argument("--cache-file", choices=FILE_MODES, default="auto",
                   help="the decoded split on disk. auto: load DATA_PATH/decoded-*.u8 when it matches the manifest, "
                   "loader, crop and pixel version and its checksum holds (else decode again and replace it), and "
                   f"write it after decoding when the folder is writable and keeps {DISK_RESERVE / 1e9:.0f} GB free. "
                   "off: neither read nor "
                   "write it. Delete the files (rm DATA_PATH/decoded-*.u8) to free the space; they are made again")
    p.add_argument("--epochs", type=cli.positive_int, default=40, help="total epochs, counting resumed ones")
    p.add_argument("-b", "--batch-size", type=cli.positive_int, default=128, help="images per step and per GPU")
    p.add_argument("--lr", type=cli.positive_float, default=3e-4, help="Adam learning rate")
    p.add_argument("--beta", type=cli.nonnegative_float, default=BETA, help="KL weight; BCE is a per-pixel mean and KL a per-image "
                   "sum, so 1.0 collapses to one average face")
    p.add_argument("--z-dim", type=cli.positive_int, default=128, help="latent dimensions")
    p.add_argument("-j", "--workers", type=cli.count, default=default_workers(),
                   help=f"loader processes (torch) or threads (dali); the default is {cli.workers_rule()}")
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
    p.add_argument("--crop", choices=CROPS, default="center", help=f"center: the usual {CROP_SIDE}x{CROP_SIDE} CelebA-64 crop; "
                   "none: squash the whole 178x218 frame like the original seed code")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips of training images")
    p.add_argument("--output-dir", default="output", help="where images, weights and logs go")
    previous_run = p.add_mutually_exclusive_group()
    previous_run.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                              help=f"continue from a checkpoint (given without a path: OUTPUT_DIR/{CHECKPOINT}, "
                                   f"or {previous(Path(CHECKPOINT)).name} when that one is damaged)")
    previous_run.add_argument("--overwrite", action="store_true",
                              help="start over in an --output-dir that holds a previous run, deleting the files its "
                                   f"{MARKER} lists (never files train.py did not write)")
    p.add_argument("--resume-force", action="store_true",
                   help="--resume even when settings that change the result (" +
                        ", ".join(flag for key, flag in SETTINGS.items() if key != "z_dim") +
                        "; --amp and --compile as resolved on this machine) differ from the checkpoint's; "
                        "never for --z-dim, which sets the weights' shape")
    p.add_argument("--checkpoint-every", type=cli.positive_int, default=1, metavar="N",
                   help=f"write {CHECKPOINT} after every Nth epoch, and always after the last; a crash or Ctrl-C "
                        "then loses up to N-1 epochs")
    p.add_argument("--seed", type=cli.seed, default=0, help="seed for weights, data order, flips and sampling")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads per process; None: torch's default "
                   "(OMP_NUM_THREADS, else every core), and under torchrun with several processes on a machine "
                   "its cores divided among them, where torchrun's own OMP_NUM_THREADS=1 counts as unset")
    p.add_argument("--dist-timeout", type=cli.positive_float, default=300, help="under torchrun: seconds a rank waits for the "
                   "others in a collective (a gradient all-reduce, a metric sum) before the job stops with an error")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                   help="run each training step as one CUDA graph replay (batch gather, flips, forward, loss, backward, "
                   "fused Adam): needs CUDA, the train split in the resident cache (--cache) and one process. auto is "
                   "off until a GPU run has compared the graphed step's weights with the ordinary step's (a graph "
                   "replays fixed memory and can go wrong silently); on: graph when it can, else say why in one line "
                   "and run the same step uncaptured. The graph holds --lr as captured: a learning-rate schedule "
                   "is not supported with it on")
    p.add_argument("--figures-every", type=cli.positive_int, default=1, help=f"draw {RECONSTRUCTIONS.format(epoch='N')} and "
                   f"{CURVES} every N epochs (and always after the last), on a background thread")
    p.add_argument("--tensorboard", action="store_true", help=f"also write TensorBoard logs to OUTPUT_DIR/{TB}: "
                   f"training scalars every {LOG_EVERY} steps, validation figures and reconstructions each epoch "
                   "(pip install tensorboard)")
    fid_plan.add_flags(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.given = cli.given_flags(p, argv)  # the flags as given: what the printed next-step commands start from
    if args.resume == "":
        args.resume = str(Path(args.output_dir) / CHECKPOINT)
    if args.resume_force and args.resume is None:
        p.error("--resume-force goes with --resume")
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- one epoch


def train_one_epoch(train_step, loader, epoch: int, args, world_size: int, show: bool, log=None) -> dict:
    """Trains over one epoch of `loader` with `train_step` (a TrainStep, or a StaticStep that gathers its
    batches itself); returns the mean train VAELoss fields and the wall time. `log(global_step, means)`
    receives the VAELoss fields averaged over the steps since its last call."""
    device = train_step.device
    logged, logged_steps = 0, 0
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show, dynamic_ncols=True)
    started = time.perf_counter()
    try:  # closed however the epoch ends, so that an error is printed on a line of its own
        # stats: loss, bce, kl, neg_elbo, summed over the steps so far on the device
        for step, stats in enumerate(train_step.epoch(loader, epoch)):
            bar.update()
            if (step + 1) % LOG_EVERY == 0 or step + 1 == len(loader):
                mean = (stats / (step + 1)).tolist()
                if not all(map(math.isfinite, mean)):
                    raise Diverged(f"the loss became {mean[0]} in epoch {epoch + 1} near step {step + 1}; stopped "
                                   f"without saving this epoch")
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


# ----------------------------------------------------------------------------- evaluation


def evaluation_sums(model, train_step, beta: float, compile: bool = False):
    """images -> one batch's sums over images (count, the VAELoss fields, MSE, PSNR, KL per latent dim),
    compiled with a dynamic batch size when `compile`, so the split's last, shorter batch compiles nothing
    more (a batch of exactly one image, which torch specialises, compiles once more)."""
    def sums(images):
        x = train_step.to_input(images)
        with train_step.autocast():
            mu, logvar = model.encode(x)
            # The sampled z gives the loss; the posterior mean gives the reconstruction quality. One decode.
            x_hat, x_mean = model.decode(torch.cat([model.reparameterize(mu, logvar), mu])).chunk(2)
        out = vae_loss(x_hat, x, mu, logvar, beta)
        mse = metrics.mse_per_image(x_mean, x)
        return torch.cat([torch.stack([torch.ones((), device=x.device), *out]) * x.shape[0],
                          torch.stack([mse.sum(), metrics.psnr(mse).sum()]),
                          metrics.kl_per_dim(mu, logvar).sum(0)])
    return torch.compile(sums, dynamic=True) if compile else sums


@torch.no_grad()
def evaluate(model, loader, train_step, beta: float, sums=None) -> dict:
    """Means per image over the whole split, every rank's share included: the VAELoss fields (with a
    sampled z, as in training), MSE and PSNR of the reconstruction from the posterior mean (model.metrics),
    and the KL of each latent dimension, summarised as the count of active dimensions. Nothing reads the
    device until the end. `sums`: evaluation_sums' function, kept across epochs so that a compiled one
    compiles once."""
    device = train_step.device
    sums = sums or evaluation_sums(model, train_step, beta)
    model.eval()
    # Sums over images, one tensor so one all_reduce: count, loss, bce, kl, neg_elbo, mse, psnr, KL per dim.
    stats = torch.zeros(7 + model.z_dim, device=device)
    for images in loader:
        stats += sums(images)
    model.train()
    stats = all_reduce(stats) / stats[0]
    mean_kl_per_dim = stats[7:].cpu()
    means = stats[1:7].tolist()
    return {**dict(zip(VAELoss._fields, means[:4])), "mse": means[4], "psnr": means[5],
            "active_dims": metrics.active_dims(mean_kl_per_dim),
            "kl_dim_median": mean_kl_per_dim.median().item(), "kl_dim_max": mean_kl_per_dim.max().item()}


# ----------------------------------------------------------------------------- setup


def build_loaders(args, device, rank: int, world_size: int, cached=(), **options):
    """This rank's train and val loaders, served from the resident cache for the splits in `cached`;
    `options` go to build_loader (the tests ask for keys). A cached val split comes in batches of
    EVAL_BATCH (at least --batch-size): evaluation's batches need no decoding there, only memory."""
    master = rank == 0

    def loader(split):
        name, extra = (("cache", dict(source=args.loader, progress=master, cache_file=args.cache_file))
                       if split in cached else (args.loader, {}))
        batch_size = max(args.batch_size, EVAL_BATCH) if split != "train" and split in cached else args.batch_size
        made = build_loader(name, args.data_path, split, batch_size, device, rank=rank,
                            world_size=world_size, workers=args.workers, seed=args.seed, crop=args.crop,
                            flip=args.flip if split == "train" else False, **extra, **options)
        if master and split in cached:
            n, seconds, how = len(made.cache), made.cache.seconds, made.cache.source
            how = f"decoded by the {args.loader} loader" if how == "decoded" else how
            note = f"; {made.cache.file_note}" if made.cache.file_note else ""
            print(f"cached {split}: {n:,} images in {seconds:.2f} s ({how}), {n / seconds:,.0f} images/s{note}")
        return made

    return loader("train"), loader("val")


def build_data(args, device, rank: int, world_size: int, resumed):
    """(train loader, val loader, the preview faces, the splits in the resident cache): the cache plan, said on
    rank 0, and this rank's loaders; a TrainingError when the train split holds less than one batch."""
    done, resumed_cache = (resumed.state["epoch"], resumed.state["args"].get("cache")) if resumed else (0, None)
    sizes = {split: split_size(args.data_path, split) for split in ("train", "val")}
    cached, why = plan_cache(args.cache, sizes, device, args.epochs - done, resumed_cache, args.loader)
    args.cache = "on" if "train" in cached else "off"  # saved in the checkpoint: a resume keeps the data order
    if rank == 0:
        print(why)
    train_loader, val_loader = build_loaders(args, device, rank, world_size, cached)
    if len(train_loader) == 0:
        images = sum(s.num_samples for s in split_shards(args.data_path, "train")) // world_size
        raise TrainingError(f"{args.data_path}: the train split has {images} images"
                            f"{' per process' if world_size > 1 else ''}, fewer than one batch of {args.batch_size}; "
                            f"lower --batch-size to at most {images}, or add images")
    preview = next(iter(val_loader))[:16]  # the same faces every epoch, so reconstructions compare
    if rank == 0:
        print(f"{args.loader} loader: {train_loader.num_samples * world_size} training images per epoch, "
              f"{len(train_loader)} steps of {args.batch_size} x {world_size}")
    return train_loader, val_loader, preview, cached


# ----------------------------------------------------------------------------- main


def main(args):
    device, rank, world_size = setup_device(args)
    master = rank == 0
    amp, amp_why = resolve_amp(args.amp, device)
    use_compile, compile_why = resolve_compile(args.compile, device, amp)
    args.amp, args.compile = amp, use_compile  # saved and checked on --resume as resolved, not as "auto"
    fid_plan.check(args)  # the FID network's file, when asked for, before any work
    marker = check_output_dir(args)  # creates nothing: a run that stops on a bad flag or path leaves no trace
    summary_writer = tensorboard_writer() if args.tensorboard else None
    resumed = resume_checkpoint(args, world_size, master, Path(args.output_dir) / WEIGHTS) if args.resume else None
    if args.resume and resumed is None:  # a finished run: nothing to do
        if world_size > 1:
            dist.destroy_process_group()
        return 0
    if not args.resume:  # resume_checkpoint has set and compared a resumed run's
        args.data = data_identity(args.data_path)  # which shards these are: saved with the run, checked by --resume
    seed_everything(args.seed)
    describe_setup(args, device, rank, world_size, amp_why, compile_why)
    train_loader, val_loader, preview, cached = build_data(args, device, rank, world_size, resumed)

    raw_model = VariationalAutoEncoder(z_dim=args.z_dim).to(
        device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    model = DistributedDataParallel(raw_model) if world_size > 1 else raw_model
    optimizer = make_optimizer(raw_model.parameters(), args.lr, device)
    train_step = TrainStep(model, optimizer, device, amp=args.amp, channels_last=args.channels_last,
                           compile=args.compile, beta=args.beta)
    eval_sums = evaluation_sums(raw_model, train_step, args.beta, compile=args.compile)
    # The weights above are the same on every rank; the reparameterisation noise is each rank's own.
    torch.manual_seed(args.seed + rank)
    start_epoch, resumed_at = 0, None  # resumed_at: what a run stopped before its first checkpoint continues
    if resumed:
        start_epoch = restore_checkpoint(resumed.state, raw_model, optimizer, train_step.scaler, device, args.lr,
                                         rank, args.seed)
        resumed_at = resumed.source, start_epoch
        if master:
            print(f"resumed from {resumed.source} after epoch {start_epoch}")
    # --cuda-graph, after the checkpoint is restored: a graph holds the addresses of the weights and Adam's state
    step, line = choose_step(args.cuda_graph, train_step, train_loader.resident() if "train" in cached else None,
                             world_size > 1, report=print if master else lambda line: None)
    if master and line:
        print(line)
    record = None
    if master:
        fills = {split: loader.cache for split, loader in (("train", train_loader), ("val", val_loader))
                 if split in cached}
        first_row = {"fill_s": {split: cache.seconds for split, cache in fills.items()},
                     "fill_source": {split: cache.source for split, cache in fills.items()},
                     **({"compile_s": step.compile_seconds} if step.compile_seconds is not None else {})}
        folder = prepare_output_dir(args, saved_args(args), marker, resumed.damaged if resumed else None)
        record = Record(args, folder, raw_model, optimizer, train_step.scaler, start_epoch, resumed_at, first_row,
                        summary_writer)
    del resumed  # the tensors are in the model and optimizer now

    epoch = start_epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            train_loader.set_epoch(epoch)
            train = train_one_epoch(step, train_loader, epoch, args, world_size, show=master,
                                    log=record.log if record else None)
            clock = time.perf_counter()
            val = evaluate(raw_model, val_loader, train_step, args.beta, eval_sums)
            eval_s = time.perf_counter() - clock
            due = (epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == args.epochs
            rng = all_rng_states(device, world_size) if due else None
            if master:
                record.check()  # the previous epoch's pictures, drawn meanwhile
                clock = time.perf_counter()
                draw = (epoch + 1) % args.figures_every == 0 or epoch + 1 == args.epochs
                grid = figures.reconstructions(raw_model, preview, train_step) if draw else None
                record.record(epoch, train, val, eval_s, grid, time.perf_counter() - clock, rng)
    except BaseException as exn:
        if record is not None:
            record.close()  # the checkpoint being written and the pictures of the epochs done are finished first
        kept = record.last_good() if record is not None else resumed_at
        if isinstance(exn, KeyboardInterrupt):
            if master:
                print(interrupted(args, epoch, kept), file=sys.stderr)
            return 130
        if isinstance(exn, Diverged):
            raise diverged(exn, args, kept) from None
        raise
    if record is not None:
        try:
            record.finish(preview, train_step, {"train": train_loader, "val": val_loader}, cached)
        finally:
            record.close()
    if world_size > 1:
        dist.destroy_process_group()
    return 0


def run(argv=None) -> int:
    """main() on parsed flags, with data, checkpoint and training errors as one line on stderr and exit code 1."""
    args = parse_args(argv)
    try:
        return main(args)
    except (DataError, TrainingError, CheckpointError, RunDirError, FidError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    except RuntimeError as exn:
        line = lost_contact(exn)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the epochs, which main() handles itself
        print(interrupted(args), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
