"""Train the convolutional VAE on CelebA shards.

    python train.py --data-path dataset/celeba/shards              # one GPU or the CPU
    torchrun --nproc_per_node 4 train.py --data-path ...            # several GPUs, same flags

Reads top to bottom: config, checkpoints, the output folder, each epoch's record and the end of
training, one epoch of training, evaluation and pictures, the run's setup, then main(), the epoch loop.

Writes into --output-dir (the names are pipeline/run_dir.py's): reconstructions_epoch{n}.png and
curves.png (every --figures-every epochs and after the last, drawn on a background thread),
generated_samples.png and interpolations.png (after training), vae_celeba.pth (a plain
CPU state_dict that `VariationalAutoEncoder(z_dim=128).load_state_dict(torch.load(...))` takes),
checkpoint.pt and checkpoint.prev.pt (resumable: the newest and the one before, rotated after each
epoch, or every --checkpoint-every epochs), metrics.jsonl (one line per epoch: the metrics and the
training thread's seconds in each part of the epoch), run.json (the settings and the files the run
wrote) and, with --tensorboard, TensorBoard event files in tb/. It refuses to start in a folder that
holds another run unless told to --resume it or to --overwrite it, and in a folder where files it did
not write hold its output names.
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import random
import re
import shlex
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import make_grid
from tqdm import tqdm

from model import BETA, VariationalAutoEncoder, VAELoss, vae_loss
from model import figures, metrics, quality
from model.checkpoint import (SETTINGS, CheckpointError, CheckpointWriter, checkpoint_state, load_checkpoint, previous,
                              restore_checkpoint, rng_state, save_weights, setting_changes, settings_of)
from model.step import StaticStep, TrainStep, make_optimizer, resolve_amp, resolve_compile
from pipeline import CROPS, DALI_INSTALL, LOADERS, DataError, build_loader, cli, default_workers, split_size
from pipeline import run_dir
from pipeline.cache import CACHE_MODES, MEMORY_FRACTION, plan as plan_cache
from pipeline.attributes import shard_attributes
from pipeline.cache_file import DISK_RESERVE, FILE_MODES
from pipeline.files import atomic_write
from pipeline.geometry import CROP_SIDE
from pipeline.run_dir import (CHECKPOINT, CURVES, EPOCH_PICTURE, INTERPOLATIONS, METRICS, RECONSTRUCTIONS, SAMPLES,
                              WEIGHTS, RunDir, RunDirError)
from pipeline.shards import load_manifest, split_shards

LOG_EVERY = 25  # steps between host syncs: reading the loss forces the GPU to catch up
EVAL_BATCH = 1024  # images per evaluation batch served from the resident cache: fewer, larger launches
# metrics.jsonl's fields that time the run rather than describe the training (compile_s, fill_s and
# fill_source only in a run's first line, quality_seconds only in its last): a resumed run's lines equal an
# uninterrupted run's but for these.
TIMINGS = ("seconds", "images_per_s", "wall_s", "eval_s", "figures_s", "checkpoint_s", "compile_s", "fill_s",
           "fill_source", "quality_seconds")

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
                                   f"{run_dir.MARKER} lists (never files train.py did not write)")
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
    p.add_argument("--tensorboard", action="store_true", help=f"also write TensorBoard logs to OUTPUT_DIR/{run_dir.TB}: "
                   f"training scalars every {LOG_EVERY} steps, validation figures and reconstructions each epoch "
                   "(pip install tensorboard)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the printed next-step commands start from
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
    """The checkpoint that --resume names (a model.checkpoint.Loaded), checked against this run's
    settings; None when the run it belongs to is already complete, which changes nothing."""
    loaded = load_checkpoint(Path(args.resume))
    state, source, note = loaded.state, loaded.source, loaded.note
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
    return loaded


def saved_args(args) -> dict:
    """The settings as plain values (what a checkpoint and run.json may hold), the command line aside."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k != "argv"}, default=str))


def all_rng_states(device, world_size: int) -> list[dict]:
    """Every rank's random state, in rank order, on every rank (a collective: all ranks call it)."""
    mine = rng_state(device)
    if world_size == 1:
        return [mine]
    states = [None] * world_size
    dist.all_gather_object(states, mine)
    return states


def checkpoint_due(epoch: int, args) -> bool:
    """Whether the epoch just finished (0-based `epoch`) is saved: every --checkpoint-every, and the last."""
    return (epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == args.epochs


# ----------------------------------------------------------------------------- the output folder

DAMAGED = f"{CHECKPOINT}.damaged"
RUN_OUTPUTS = (CHECKPOINT, previous(Path(CHECKPOINT)).name, METRICS, CURVES, WEIGHTS, SAMPLES, INTERPOLATIONS,
               *quality.outputs(WEIGHTS))  # listed in run.json when a run starts; EPOCH_PICTURE's as written


def is_output(name: str) -> bool:
    """Whether train.py writes a file of this name into --output-dir (run.json and tb/ apart)."""
    return name in RUN_OUTPUTS or name == DAMAGED or bool(EPOCH_PICTURE.match(name))


def check_output_dir(args) -> dict | None:
    """Before anything is read or written: the folder can be written into, no other train.py uses it,
    no file that this project did not write holds one of its output names, and it holds no run that
    this one would overwrite or mix with. Returns the marker of the run it holds (None when none)."""
    out_dir = Path(args.output_dir)
    problem = cli.unwritable(out_dir)
    if problem:
        raise TrainingError(f"--output-dir {out_dir}: {problem}; choose another folder")
    run_dir.check_not_locked(out_dir)
    marker = run_dir.read_marker(out_dir, is_output)
    foreign = run_dir.foreign_outputs(out_dir, marker, is_output, args.tensorboard)
    if foreign:
        raise TrainingError(f"{out_dir} holds {', '.join(foreign)}, which no {run_dir.MARKER} there lists as written "
                            f"by train.py (another program's files, or an older train.py's): train.py neither "
                            f"replaces nor deletes them, even with --overwrite; move them away, or choose another "
                            f"--output-dir")
    if marker is None or args.overwrite:
        return marker
    found = [name for name in sorted(marker["files"]) if (out_dir / name).exists()] or [run_dir.MARKER]
    if not args.resume:
        raise TrainingError(f"{out_dir} holds a previous run ({', '.join(found)}): add --resume to continue it, "
                            f"--overwrite to start over and delete it, or choose another --output-dir")
    own = [name for name in (CHECKPOINT, previous(Path(CHECKPOINT)).name) if (out_dir / name).exists()]
    if Path(args.resume).resolve().parent != out_dir.resolve() and own:
        raise TrainingError(f"{out_dir} holds another run ({', '.join(found)}) than the one --resume {args.resume} "
                            f"continues; choose another --output-dir")
    return marker


def prepare_output_dir(args, marker: dict | None, resumed_epoch: int, damaged: Path | None) -> RunDir:
    """Right before the first epoch, once every flag and path has been checked: creates and locks the
    folder, marks it as this run's, deletes what the previous run's marker lists (--overwrite), and on
    --resume drops the metrics of the epochs that will be trained again and sets aside the newest
    checkpoint when loading found it damaged (only inside --output-dir)."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = RunDir(out_dir)
    if run_dir.read_marker(out_dir, is_output) != marker:
        raise TrainingError(f"{out_dir / run_dir.MARKER} changed while this run was starting (another train.py?); "
                            f"run the same command again")
    folder.start(saved_args(args), marker)
    if args.overwrite:
        folder.remove_outputs()
    folder.claim(*RUN_OUTPUTS)
    if damaged is not None and damaged.name == CHECKPOINT and damaged.parent.resolve() == out_dir.resolve():
        folder.claim(DAMAGED)
        os.replace(damaged, out_dir / DAMAGED)  # else the next save would keep it as the previous checkpoint
    if args.resume and (out_dir / METRICS).is_file():
        write_metrics(out_dir / METRICS, read_history(out_dir / METRICS, resumed_epoch))
    return folder


def write_metrics(path: Path, rows: list[dict]) -> None:
    """metrics.jsonl rewritten whole, atomically: a crash or a full disk leaves the old file, never a
    line cut short (a few kB per epoch; an append would need its readers to skip a torn last line)."""
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def open_tensorboard(summary_writer, folder: RunDir):
    """A SummaryWriter on OUTPUT_DIR/tb, its event file listed in run.json (and tb/ when it made it)."""
    tb = folder.folder / run_dir.TB
    made = not tb.exists()
    folder.claim_tb(made, [])  # before the folder exists: a crash right after leaves it listed
    before = set(os.listdir(tb)) if not made else set()
    writer = summary_writer(str(tb))
    folder.claim_tb(made, [name for name in os.listdir(tb) if name not in before and run_dir.TB_EVENTS.match(name)])
    return writer


def rerun(args, resume_from: Path | None = None, start_over: bool = False, extra: tuple = ()) -> str:
    """The command to run next, quoted for a shell: this run's command line continuing from
    `resume_from` (--resume), or starting again (with --overwrite when `start_over`), with `extra` flags
    replacing those of the same names."""
    drop = {"--overwrite": 0, "--resume-force": 0, "--resume": "?",
            **{flag: 1 for flag in extra if flag.startswith("--") and flag != "--resume-force"}}
    tokens, flags, i = list(args.argv), [], 0
    while i < len(tokens):
        name = tokens[i].split("=", 1)[0]
        if name in drop and "=" not in tokens[i]:
            takes = drop[name]
            i += 1 + (1 if takes == 1 or (takes == "?" and i + 1 < len(tokens) and
                                          not tokens[i + 1].startswith("-")) else 0)
            continue
        if name not in drop:
            flags.append(tokens[i])
        i += 1
    if resume_from is not None:
        inside = Path(resume_from).resolve().parent == Path(args.output_dir).resolve()
        flags += ["--resume"] if inside else ["--resume", str(resume_from)]
    elif start_over:
        flags.append("--overwrite")
    flags += [str(x) for x in extra]
    if dist.is_initialized():
        return f"the same torchrun launch of train.py {shlex.join(flags)}"
    return shlex.join(["python", "train.py", *flags])


def next_step(args, last_good: tuple[Path, int] | None, start_over: bool, extra: tuple = ()) -> str:
    """What is kept and the exact command to go on with: the one message for every way a run stops."""
    if last_good:
        return f"{last_good[0]} holds epoch {last_good[1]}: continue with `{rerun(args, last_good[0], extra=extra)}`"
    return f"no checkpoint was saved, so there is nothing to resume: start again with " \
           f"`{rerun(args, start_over=start_over, extra=extra)}`"


def write_failure(exn: OSError, args, last_good: tuple[Path, int] | None) -> TrainingError:
    """A failed write (full disk, permissions) as one line that says what survived and how to go on."""
    what = f"cannot write {exn.filename or args.output_dir} ({exn.strerror or exn})"
    fix = "free some space (or fix the permissions)"
    if last_good:
        return TrainingError(f"{what}; the last good checkpoint, {last_good[0]} (epoch {last_good[1]}), is "
                             f"untouched: {fix}, then run `{rerun(args, last_good[0])}`")
    return TrainingError(f"{what}; no checkpoint was saved yet: {fix}, then run `{rerun(args, start_over=True)}`")


class Diverged(TrainingError):
    """The loss stopped being finite; main() adds what is kept and what to run."""


# ----------------------------------------------------------------------------- each epoch's record, the end


@dataclasses.dataclass
class RunState:
    """What start_run() sets up and the epoch loop, its writes and the end of training read: the model and
    its step, the loaders, where the run resumed from, and (rank 0 only; None on the others) the output
    folder, the checkpoint writer, TensorBoard's writer, the picture drawer and the metrics so far."""
    args: argparse.Namespace
    device: torch.device
    rank: int
    world_size: int
    raw_model: VariationalAutoEncoder
    optimizer: torch.optim.Optimizer
    train_step: TrainStep
    stepper: object  # what trains: train_step, or a StaticStep around it (--cuda-graph)
    eval_sums: object
    train_loader: object
    val_loader: object
    preview: torch.Tensor  # the same faces every epoch, so reconstructions compare
    start_epoch: int = 0
    resumed_from: Path | None = None
    first_row: dict = dataclasses.field(default_factory=dict)  # fields of the first metrics line this run writes
    folder: RunDir | None = None
    checkpoints: CheckpointWriter | None = None
    writer: object = None
    drawer: object = None  # a Drawer
    history: list = dataclasses.field(default_factory=list)
    started: float = 0.0  # perf_counter at the run's start, less the wall time of the epochs resumed from
    checkpoint_s: float = 0.0  # the training thread's time in the last checkpoint, which the next row reports

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def out_dir(self) -> Path:
        return Path(self.args.output_dir)

    def last_good(self) -> tuple[Path, int] | None:
        return last_good(self.checkpoints, self.out_dir, self.resumed_from, self.start_epoch)

    def log_step(self):
        """train_one_epoch's `log`: training scalars to TensorBoard, or None without it."""
        if self.writer is None:
            return None

        def log(step, means):
            for k, v in means.items():
                self.writer.add_scalar(f"train_step/{k}", v, step)
        return log


def last_good(checkpoints: CheckpointWriter | None, out_dir: Path, resumed_from: Path | None,
              start_epoch: int) -> tuple[Path, int] | None:
    """(checkpoint, epoch) of the newest whole checkpoint on disk, once writes have ended."""
    if checkpoints is not None:
        checkpoints.wait()
        if checkpoints.saved is not None:
            return out_dir / CHECKPOINT, checkpoints.saved
    return (resumed_from, start_epoch) if resumed_from else None


def epoch_pictures(run: RunState, epoch: int) -> tuple[torch.Tensor | None, float]:
    """This epoch's reconstruction grid, launched on the training thread (None on epochs that draw nothing:
    every --figures-every, and the last), and the seconds it took."""
    clock = time.perf_counter()
    draw = (epoch + 1) % run.args.figures_every == 0 or epoch + 1 == run.args.epochs
    grid = reconstructions(run.raw_model, run.preview, run.train_step) if draw else None
    return grid, time.perf_counter() - clock


def epoch_record(run: RunState, epoch: int, train: dict, val: dict, eval_s: float, figures_s: float) -> dict:
    """The epoch's metrics.jsonl line: the train and val figures, the learning rate and the timings."""
    return {"epoch": epoch + 1,
            **{f"train_{k}": train[k] for k in VAELoss._fields},
            **{f"val_{k}": v for k, v in val.items()},
            "train_bits_per_dim": VAELoss.bits_per_dim(train["neg_elbo"]),
            "val_bits_per_dim": VAELoss.bits_per_dim(val["neg_elbo"]),
            "lr": run.optimizer.param_groups[0]["lr"],
            "images_per_s": train["images_per_s"], "seconds": train["seconds"],
            "eval_s": eval_s, "figures_s": figures_s, "checkpoint_s": run.checkpoint_s,
            **(run.first_row if epoch == run.start_epoch else {}),
            "wall_s": time.perf_counter() - run.started}


def write_epoch(run: RunState, epoch: int, record: dict, grid: torch.Tensor | None, rng: list | None) -> None:
    """The epoch's writes, in this order: metrics.jsonl, its pictures (drawn in the background; the last
    epoch's awaited), the checkpoint (when `rng`, every rank's random state, says one is due), TensorBoard.

    The checkpoint last: an epoch it holds has its metrics line (a resume drops the lines of epochs past
    the checkpoint). It is copied here and written by a thread."""
    args, out_dir = run.args, run.out_dir
    run.history.append(record)
    try:
        run.checkpoints.raise_failure()  # the previous epoch's write, if it failed
        write_metrics(out_dir / METRICS, run.history)
        if grid is not None:
            picture = RECONSTRUCTIONS.format(epoch=epoch + 1)
            run.folder.claim(picture)
            run.drawer.submit(draw_epoch, grid, list(run.history), out_dir / picture, out_dir / CURVES,
                              run.writer, epoch + 1)
        if epoch + 1 == args.epochs:
            run.drawer.check(wait=True)  # the last pictures before the run's last checkpoint
        clock = time.perf_counter()
        if rng is not None:
            run.checkpoints.save(checkpoint_state(run.raw_model, run.optimizer, run.train_step.scaler, epoch + 1,
                                                  saved_args(args), run.world_size, rng))
        run.checkpoint_s = time.perf_counter() - clock
    except OSError as exn:
        raise write_failure(exn, args, run.last_good()) from None
    if run.writer is not None:
        for k, v in record.items():
            if k != "epoch" and not isinstance(v, dict):
                run.writer.add_scalar(f"epoch/{k}", v, epoch + 1)
        run.writer.flush()


def print_epoch(record: dict, z_dim: int) -> None:
    print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} | val loss {record['val_loss']:.4f}, "
          f"{record['val_bits_per_dim']:.3f} bits/dim, PSNR {record['val_psnr']:.2f} dB, "
          f"{record['val_active_dims']}/{z_dim} active dims | {record['images_per_s']:.0f} img/s")


def interrupted(run: RunState, epoch: int) -> int:
    """Ctrl-C during the epochs: the pictures of the epochs done finished, the checkpoint being written
    whole, what to run next on stderr; 130."""
    if run.master:
        run.drawer.close(check=False)  # the pictures of the epochs done are finished, not cut short
        print(f"\ninterrupted in epoch {epoch + 1}; {next_step(run.args, run.last_good(), start_over=True)}",
              file=sys.stderr)
    if run.writer is not None:
        run.writer.close()
    if run.folder is not None:
        run.folder.close()
    return 130


def diverged(run: RunState, exn: Diverged) -> TrainingError:
    """A loss that stopped being finite, as the error that says what is kept and how to go on."""
    lower = ("--lr", f"{run.args.lr / 10:g}")
    kept = run.last_good()
    if run.folder is not None:
        run.folder.close()
    return TrainingError(f"{exn}. {next_step(run.args, kept, True, ('--resume-force', *lower) if kept else lower)} "
                         f"(a tenth of the learning rate; or --amp off where mixed precision is on)")


def finish_run(run: RunState) -> None:
    """After the last epoch, on rank 0: the samples, the interpolations, the quality figures, and the
    weights last, which mark a finished run; then the list of what was written."""
    if not run.master:
        return
    args, out_dir, model = run.args, run.out_dir, run.raw_model
    run.drawer.close()  # its last error, if any, stops the run before the weights mark it finished
    try:  # the weights last: they mark a finished run
        run.checkpoints.raise_failure()
        samples = save_samples(model, args.z_dim, args.seed, run.device, out_dir / SAMPLES)
        lines = save_interpolations(model, run.preview, run.train_step, out_dir / INTERPOLATIONS)
        quality_files = finish_quality(model, run.train_loader, run.val_loader, run.preview, run.train_step, args,
                                       out_dir, run.history)
        save_weights(out_dir / WEIGHTS, model)
    except OSError as exn:
        run.folder.close()
        raise write_failure(exn, args, run.last_good()) from None
    if run.writer is not None:
        run.writer.add_image("generated_samples", samples, args.epochs)
        if lines is not None:
            run.writer.add_image("interpolations", lines, args.epochs)
        run.writer.close()
    written = [WEIGHTS, SAMPLES] + ([INTERPOLATIONS] if lines is not None else []) + quality_files
    print(f"wrote {', '.join(str(out_dir / name) for name in written)}")
    run.folder.close()


# ----------------------------------------------------------------------------- one epoch


def choose_step(mode: str, train_step: TrainStep, train_loader, cached: bool, ddp: bool, report):
    """--cuda-graph made concrete: the StaticStep to train with (captured or not), or None for the ordinary
    loader-fed step; and a line saying what runs and why (None when nothing needs saying)."""
    if mode != "on":
        return None, None
    device = train_step.device
    if not cached:
        return None, ("--cuda-graph on: the train split streams from its loader, and the graph gathers its batches "
                      "from the resident cache (--cache on); the ordinary step runs")
    if device.type != "cuda":
        return StaticStep(train_step, train_loader, capture=False), (
            f"--cuda-graph on: the device is {device.type}, which has no CUDA graphs; the same static-buffer step "
            "runs uncaptured")
    if ddp:
        # PyTorch's CUDA notes ask three things of DDP in a graph: NCCL's async error handling off (the
        # watchdog that --dist-timeout relies on to end a hung job), DDP built on the capture's side stream,
        # and 11 eager DDP steps before the capture. The first costs a guarantee, so it is not done.
        return StaticStep(train_step, train_loader, capture=False), (
            "--cuda-graph on: not under torchrun, where a graph needs NCCL's async error handling off (the "
            "--dist-timeout watchdog); the same static-buffer step runs uncaptured")
    step = StaticStep(train_step, train_loader, capture=True, report=report)
    return step, f"cuda graph: {step.why}" if step.graphed else None


def train_one_epoch(train_step, loader, epoch: int, args, world_size: int, out_dir: Path, show: bool,
                    log=None) -> dict:
    """Trains over one epoch of `loader`; returns the mean train VAELoss fields and the wall time.
    `train_step` is a TrainStep fed by `loader`, or a StaticStep that gathers its batches itself.
    `log(global_step, means)` receives the VAELoss fields averaged over the steps since its last call."""
    device = train_step.device
    static = isinstance(train_step, StaticStep)
    if static:
        train_step.set_epoch(epoch)
        stats = train_step.sums  # loss, bce, kl, neg_elbo, summed over steps on the device by the step itself
    else:
        stats = torch.zeros(4, device=device)
    logged, logged_steps = torch.zeros_like(stats), 0
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show, dynamic_ncols=True)
    started = time.perf_counter()
    try:  # closed however the epoch ends, so that an error is printed on a line of its own
        for step, images in enumerate(range(len(loader)) if static else loader):
            if static:
                train_step()
            else:
                stats += torch.stack(train_step(images))
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


# ----------------------------------------------------------------------------- evaluation and pictures


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


@torch.no_grad()
def reconstructions(model, preview, train_step) -> torch.Tensor:
    """Faces over their reconstructions from the posterior mean, as a grid on the device: launched on the
    training thread, so it sees this epoch's weights, and read by whoever saves it."""
    model.eval()
    with train_step.autocast():
        grid = figures.reconstruction_grid(model, train_step.to_input(preview))
    model.train()
    return grid


class Drawer:
    """Draws pictures and curves on one background thread, so that the training thread only launches the
    reconstruction's forward pass. Jobs run in order; a job's error is raised on the training thread, as
    one line, by the next `check()` (each epoch's end) or by `close()`, which waits for every job.

    An epoch's pictures are drawn while the next epoch trains, so its checkpoint is saved before they are
    written: a picture that fails to write is missing from a run that resumes after it (curves.png is
    drawn again at the next epoch). The last epoch's pictures are awaited before its checkpoint, so a run
    that fails there resumes into that epoch and draws them."""

    def __init__(self, args, last_good):
        """`last_good()` gives the checkpoint a failure's message points to (write_failure)."""
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="figures")
        self.jobs, self.args, self.last_good = [], args, last_good

    def submit(self, fn, *args) -> None:
        self.jobs.append(self.pool.submit(fn, *args))

    def check(self, wait: bool = False) -> None:
        """Raises the first error of the jobs done so far (all of them, with `wait`) as a TrainingError."""
        if wait:
            concurrent.futures.wait(self.jobs)
        done = [job for job in self.jobs if job.done()]
        self.jobs = [job for job in self.jobs if not job.done()]
        for job in done:
            exn = job.exception()
            if isinstance(exn, OSError):
                raise write_failure(exn, self.args, self.last_good()) from None
            if exn is not None:
                raise TrainingError(f"drawing the pictures failed: {type(exn).__name__}: {exn}") from None

    def close(self, check: bool = True) -> None:
        """Waits for the jobs; then, with `check`, raises the first error."""
        self.pool.shutdown(wait=True)
        if check:
            self.check()


def draw_epoch(grid, history: list[dict], path: Path, curves: Path, writer, epoch: int) -> None:
    """The background job of an epoch: its reconstructions (and TensorBoard's copy) and the curves so far."""
    figures.save_png(grid, path)
    figures.save_curves(history, curves)
    if writer is not None:
        writer.add_image("reconstructions", grid, epoch)


@torch.no_grad()
def save_samples(model, z_dim: int, seed: int, device, path: Path) -> torch.Tensor:
    """64 faces decoded from z ~ N(0, I), the same z for the same seed; returns the grid."""
    model.eval()
    grid = figures.sample_grid(model, 64, z_dim, device, generator=torch.Generator().manual_seed(seed))
    figures.save_png(grid, path)
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
    figures.save_png(grid, path)
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
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by an older train.py's append, or damage
                continue
            if (isinstance(row, dict) and isinstance(row.get("epoch"), int) and 0 < row["epoch"] <= epochs
                    and "kind" not in row):  # "kind": generate.py --evaluate's rows
                rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


@torch.no_grad()
def finish_quality(model, train_loader, val_loader, preview, train_step, args, out_dir: Path,
                   history: list[dict]) -> list[str]:
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
    figures.save_png(make_grid(decode(grid_z), nrow=8), out_dir / quality.GMM_SAMPLES)
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
            figures.save_png(make_grid(torch.cat(walks).flatten(0, 1).float(), nrow=quality.ATTRIBUTE_STEPS),
                             out_dir / quality.ATTRIBUTE_GRID)
            written.append(quality.ATTRIBUTE_GRID)
        written.append(quality.weights_sibling(weights, quality.ATTRIBUTES_SUFFIX).name)
        record["attribute_names"] = vectors["names"]
    record["quality_seconds"] = time.perf_counter() - started
    history[-1].update(record)  # the last epoch's row gains these fields
    write_metrics(out_dir / METRICS, history)
    model.train()
    return written


# ----------------------------------------------------------------------------- setup, and main


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


def describe_setup(args, device, rank: int, world_size: int, amp_why: str, compile_why: str) -> None:
    """The first line of a run, on rank 0: what runs where, and why where it was chosen for the user
    (a collective under torchrun: every rank's thread count)."""
    ddp = world_size > 1
    threads = [torch.get_num_threads()] * world_size
    if ddp:
        dist.all_gather_object(threads, threads[rank])
    if rank == 0:
        uses = f"CPU threads {threads[0]}"
        if ddp:
            each = f"{threads[0]} per process" if len(set(threads)) == 1 else f"{threads} by rank"
            uses = f"{world_size} processes ({dist.get_backend()}), CPU threads {each}"
        print(f"device {device} | amp {args.amp} ({amp_why}) | compile {'on' if args.compile else 'off'} "
              f"({compile_why}) | channels_last {'on' if args.channels_last else 'off'} | {uses}")


def build_data(args, device, rank: int, world_size: int, resumed):
    """(train loader, val loader, the preview faces, the splits in the resident cache): the cache plan, said on rank 0,
    and this rank's loaders; a TrainingError when the train split holds less than one batch."""
    master = rank == 0
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
                            f"{' per process' if world_size > 1 else ''}, fewer than one batch of {args.batch_size}; "
                            f"lower --batch-size to at most {images}, or add images")
    preview = next(iter(val_loader))[:16]  # the same faces every epoch, so reconstructions compare
    return train_loader, val_loader, preview, cached


def build_model(args, device, rank: int, world_size: int, train_loader, val_loader, preview) -> RunState:
    """The model (wrapped for DDP under torchrun), Adam, the training step and evaluation's sums."""
    raw_model = VariationalAutoEncoder(z_dim=args.z_dim).to(
        device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    model = DistributedDataParallel(raw_model) if world_size > 1 else raw_model
    optimizer = make_optimizer(raw_model.parameters(), args.lr, device)
    train_step = TrainStep(model, optimizer, device, amp=args.amp, channels_last=args.channels_last,
                           compile=args.compile, beta=args.beta)
    eval_sums = evaluation_sums(raw_model, train_step, args.beta, compile=args.compile)
    return RunState(args, device, rank, world_size, raw_model, optimizer, train_step, train_step, eval_sums,
                    train_loader, val_loader, preview)


def restore(run: RunState, resumed) -> None:
    """Loads the checkpoint --resume named into the model, Adam and the scaler; sets where the run starts."""
    state, run.resumed_from = resumed.state, resumed.source
    run.start_epoch = restore_checkpoint(state, run.raw_model, run.optimizer, run.train_step.scaler, run.device,
                                         run.args.lr, run.rank, run.args.seed)
    if run.master:
        print(f"resumed from {run.resumed_from} after epoch {run.start_epoch}")


def choose_stepper(run: RunState, cached) -> None:
    """--cuda-graph, after the checkpoint is restored (a graph holds the addresses of the weights and
    Adam's state), and the first metrics line's fill and warm-up times."""
    args, master = run.args, run.master
    if master:
        print(f"{args.loader} loader: {run.train_loader.num_samples * run.world_size} training images per epoch, "
              f"{len(run.train_loader)} steps of {args.batch_size} x {run.world_size}")
    static, line = choose_step(args.cuda_graph, run.train_step, run.train_loader, "train" in cached, run.ddp,
                               report=print if master else lambda line: None)
    if master and line:
        print(line)
    run.stepper = static or run.train_step
    caches = {split: made.cache for split, made in (("train", run.train_loader), ("val", run.val_loader))
              if hasattr(made, "cache")}
    run.first_row = {"fill_s": {split: cache.seconds for split, cache in caches.items()},
                     "fill_source": {split: getattr(cache, "source", "decoded") for split, cache in caches.items()}}
    if static is not None and static.compile_seconds is not None:
        run.first_row["compile_s"] = static.compile_seconds  # the warm-up steps (and capture) before epoch 1


def open_outputs(run: RunState, marker, damaged, summary_writer) -> None:
    """On rank 0, right before the first epoch: the output folder, the checkpoint writer, TensorBoard's
    writer, the drawer, and the metrics of the epochs resumed from (curves and wall time continue)."""
    if not run.master:
        return
    args, out_dir = run.args, run.out_dir
    run.folder = prepare_output_dir(args, marker, run.start_epoch, damaged)
    run.checkpoints = CheckpointWriter(out_dir / CHECKPOINT)
    run.writer = open_tensorboard(summary_writer, run.folder) if summary_writer else None
    # Not run.last_good: the drawer would hold the run, which holds it, and a cycle outlives main(), the
    # loaders' worker processes with it (and their copy of the folder's lock).
    run.drawer = Drawer(args, functools.partial(last_good, run.checkpoints, out_dir, run.resumed_from,
                                                run.start_epoch))
    run.history = read_history(out_dir / METRICS, run.start_epoch) if run.start_epoch else []
    run.started = time.perf_counter() - (run.history[-1].get("wall_s", 0.0) if run.history else 0.0)


def start_run(args) -> RunState | None:
    """Everything before the first epoch, in order: the device, AMP and compile; the output folder's and
    --resume's checks (which create nothing); the data; the model; the checkpoint; the step; the outputs.
    None when --resume names a run that is already complete."""
    device, rank, world_size = setup_device(args)
    amp, amp_why = resolve_amp(args.amp, device)
    use_compile, compile_why = resolve_compile(args.compile, device, amp)
    args.amp, args.compile = amp, use_compile  # saved and checked on --resume as resolved, not as "auto"
    marker = check_output_dir(args)  # creates nothing: a run that stops on a bad flag or path leaves no trace
    summary_writer = tensorboard_writer() if args.tensorboard else None
    resumed = resume_state(args, world_size, rank == 0) if args.resume else None
    if args.resume and resumed is None:
        if world_size > 1:
            dist.destroy_process_group()
        return None
    seed_everything(args.seed)
    describe_setup(args, device, rank, world_size, amp_why, compile_why)
    train_loader, val_loader, preview, cached = build_data(args, device, rank, world_size, resumed)
    run = build_model(args, device, rank, world_size, train_loader, val_loader, preview)
    # The weights above are the same on every rank; the reparameterisation noise is each rank's own.
    torch.manual_seed(args.seed + rank)
    damaged = None
    if resumed:
        damaged = resumed.damaged
        restore(run, resumed)
        del resumed  # the tensors are in the model and optimizer now
    choose_stepper(run, cached)
    open_outputs(run, marker, damaged, summary_writer)
    return run


def main(args):
    run = start_run(args)
    if run is None:  # --resume of a finished run: nothing to do
        return 0
    epoch = run.start_epoch
    try:
        for epoch in range(run.start_epoch, args.epochs):
            run.train_loader.set_epoch(epoch)
            train = train_one_epoch(run.stepper, run.train_loader, epoch, args, run.world_size, run.out_dir,
                                    show=run.master, log=run.log_step())
            clock = time.perf_counter()
            val = evaluate(run.raw_model, run.val_loader, run.train_step, args.beta, run.eval_sums)
            eval_s = time.perf_counter() - clock
            rng = all_rng_states(run.device, run.world_size) if checkpoint_due(epoch, args) else None
            if run.master:
                run.drawer.check()  # the previous epoch's pictures, drawn meanwhile
                grid, figures_s = epoch_pictures(run, epoch)
                record = epoch_record(run, epoch, train, val, eval_s, figures_s)
                write_epoch(run, epoch, record, grid, rng)
                print_epoch(record, args.z_dim)
    except KeyboardInterrupt:
        return interrupted(run, epoch)  # after the checkpoint being written, if any, is whole
    except Diverged as exn:
        raise diverged(run, exn) from None
    except BaseException:  # the folder is free for the command that the error message prints
        if run.folder is not None:
            run.checkpoints.wait()
            run.folder.close()
        raise
    finally:
        if run.checkpoints is not None:
            run.checkpoints.wait()  # Ctrl-C, an error or the end: the checkpoint being written is finished first
        if run.drawer is not None:
            run.drawer.pool.shutdown(wait=True)  # whatever stopped the loop, no picture is left half written
    finish_run(run)
    if run.ddp:
        dist.destroy_process_group()
    return 0


def lost_contact(exn: Exception) -> str | None:
    """Why a collective failed, in one line, when it failed because another rank died or stopped answering."""
    if not dist.is_initialized() or not (isinstance(exn, dist.DistError) or "gloo/transport" in str(exn)):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", cli.first_line(exn))  # gloo's "[source.cc:line] "
    return first.split(". ")[0]


def run(argv=None) -> int:
    """main() on parsed flags, with data, checkpoint and training errors as one line on stderr and exit code 1."""
    args = parse_args(argv)
    try:
        return main(args)
    except (DataError, TrainingError, CheckpointError, RunDirError) as exn:
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
        out_dir = Path(args.output_dir)
        saved = out_dir / CHECKPOINT
        last = (saved, "the last saved") if saved.exists() else (Path(args.resume), "its") if args.resume else None
        start_over = (out_dir / run_dir.MARKER).exists()
        if last:
            print(f"\ninterrupted; {last[0]} holds {last[1]} epoch: continue with `{rerun(args, last[0])}`",
                  file=sys.stderr)
        else:
            print(f"\ninterrupted before a checkpoint was saved, so there is nothing to resume: start again with "
                  f"`{rerun(args, start_over=start_over)}`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
