"""The record of a run, on rank 0: what each epoch leaves behind, and the end of training.

    record = Record(args, folder, model, optimizer, scaler, start_epoch, resumed_at, first_row)
    record.record(epoch, train, val, eval_s, grid, figures_s, rng)  # each epoch: its row, pictures, checkpoint
    record.finish(preview, train_step, loaders, cached)              # after the last: pictures, quality, weights
    record.close()                                                   # however the run ends

An epoch's writes, in this order: its metrics.jsonl row, its pictures (drawn on a background thread
while the next epoch trains; the last epoch's awaited), its checkpoint (written by a thread of its
own, when due), TensorBoard's scalars, and one printed line. The checkpoint comes last: an epoch it
holds has its metrics row (a resume drops the rows of epochs past the checkpoint). metrics.jsonl has
one writer, MetricsFile, which generate.py --evaluate shares (its rows have no "epoch").
"""

import concurrent.futures
import contextlib
import json
import sys
import time
from pathlib import Path

from common.files import atomic_write
from model import VAELoss, figures, quality
from model.assess import assess, first_images
from pipeline import build_loader
from pipeline.attributes import AttributeFileError, shard_attributes
from pipeline.cache import CachedLoader
from pipeline.cache_file import decoder_of
from pipeline.shards import load_manifest
from run import fid_plan
from run.checkpoint import CheckpointWriter, checkpoint_state, save_weights
from run.folder import (CHECKPOINT, CURVES, INTERPOLATIONS, METRICS, RECONSTRUCTIONS, SAMPLES, TB, TB_EVENTS,
                        WEIGHTS, RunDir)
from run.recovery import TrainingError, write_failure


class Record:
    """Rank 0's record of the run in its locked output folder: metrics.jsonl, the pictures, the checkpoints,
    TensorBoard (`summary_writer`, its SummaryWriter class, or None) and the printed lines. `resumed_at`
    is (checkpoint, epoch) of a resumed run, what it continues from until it saves its own; `first_row`
    joins the first row this run writes (its fill and warm-up times)."""

    def __init__(self, args, folder: RunDir, model, optimizer, scaler, start_epoch: int,
                 resumed_at: tuple[Path, int] | None, first_row: dict, summary_writer=None):
        self.args, self.folder, self.out_dir = args, folder, Path(args.output_dir)
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.start_epoch, self.resumed_at, self.first_row = start_epoch, resumed_at, first_row
        self.checkpoints = CheckpointWriter(self.out_dir / CHECKPOINT)
        self.writer = open_tensorboard(summary_writer, folder) if summary_writer else None
        self.log = self.log_step if self.writer is not None else None
        self.drawer = Drawer()
        # A resumed run drops the rows of the epochs it trains again; curves and wall time continue.
        self.metrics = MetricsFile(self.out_dir / METRICS, start_epoch if args.resume else None)
        if args.resume and self.metrics.path.is_file():
            self.metrics.write()
        history = self.metrics.epochs
        self.started = time.perf_counter() - (history[-1].get("wall_s", 0.0) if history else 0.0)
        self.checkpoint_s = 0.0  # the training thread's time in the last checkpoint, which the next row reports

    def last_good(self) -> tuple[Path, int] | None:
        """(checkpoint, epoch) of the newest whole checkpoint on disk, once writes have ended."""
        self.checkpoints.wait()
        if self.checkpoints.saved is not None:
            return self.out_dir / CHECKPOINT, self.checkpoints.saved
        return self.resumed_at

    def log_step(self, step: int, means: dict) -> None:
        """Training scalars every few steps, to TensorBoard (`log` is this method with it, None without)."""
        for k, v in means.items():
            self.writer.add_scalar(f"train_step/{k}", v, step)

    @contextlib.contextmanager
    def writing(self):
        """A write that fails (full disk, permissions) stops the run with one line naming the last good checkpoint."""
        try:
            yield
        except OSError as exn:
            raise write_failure(exn, self.args, self.last_good()) from None

    def check(self) -> None:
        """The previous epoch's pictures, drawn meanwhile: their write error, if any, stops the run."""
        with self.writing():
            self.drawer.check()

    def record(self, epoch: int, train: dict, val: dict, eval_s: float, grid, figures_s: float, rng) -> dict:
        """Epoch `epoch` (0-based): its row, its pictures when `grid` is there, its checkpoint when `rng`,
        every rank's random state, is there; TensorBoard and the printed line. Returns the row."""
        args, out_dir = self.args, self.out_dir
        row = {"epoch": epoch + 1,
               **{f"train_{k}": train[k] for k in VAELoss._fields},
               **{f"val_{k}": v for k, v in val.items()},
               "train_bits_per_dim": VAELoss.bits_per_dim(train["neg_elbo"]),
               "val_bits_per_dim": VAELoss.bits_per_dim(val["neg_elbo"]),
               "lr": self.optimizer.param_groups[0]["lr"],
               "images_per_s": train["images_per_s"], "seconds": train["seconds"],
               "eval_s": eval_s, "figures_s": figures_s, "checkpoint_s": self.checkpoint_s,
               **(self.first_row if epoch == self.start_epoch else {}),
               "wall_s": time.perf_counter() - self.started}
        with self.writing():
            self.checkpoints.raise_failure()  # the previous epoch's write, if it failed
            self.metrics.append(row)
            if grid is not None:
                picture = RECONSTRUCTIONS.format(epoch=epoch + 1)
                self.folder.claim(picture)
                self.drawer.submit(draw_epoch, grid, self.metrics.epochs, out_dir / picture, out_dir / CURVES,
                                   self.writer, epoch + 1)
            if epoch + 1 == args.epochs:
                self.drawer.check(wait=True)  # the last pictures before the run's last checkpoint
            clock = time.perf_counter()
            if rng is not None:
                self.checkpoints.save(checkpoint_state(self.model, self.optimizer, self.scaler, epoch + 1,
                                                       saved_args(args), len(rng), rng))
            self.checkpoint_s = time.perf_counter() - clock
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch" and not isinstance(v, dict):
                    self.writer.add_scalar(f"epoch/{k}", v, epoch + 1)
            self.writer.flush()
        print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f}, "
              f"{row['val_bits_per_dim']:.3f} bits/dim, PSNR {row['val_psnr']:.2f} dB, "
              f"{row['val_active_dims']}/{args.z_dim} active dims | {row['images_per_s']:.0f} img/s")
        return row

    def finish(self, preview, train_step, loaders: dict, cached) -> None:
        """After the last epoch: the end of training's pictures and quality figures (end_of_training), which
        join the last epoch's row; then the weights, last, which mark a finished run, and one line listing
        what was written."""
        with self.writing():
            self.drawer.close()  # its last error, if any, stops the run before the weights mark it finished
            self.checkpoints.raise_failure()
            found, pictures, written = end_of_training(self.model, preview, train_step, self.args, loaders, cached)
            self.metrics.epochs[-1].update(found)
            self.metrics.write()
            save_weights(self.out_dir / WEIGHTS, self.model)
        if self.writer is not None:
            for name, grid in pictures.items():
                self.writer.add_image(name, grid, self.args.epochs)
        print(f"wrote {', '.join(str(self.out_dir / name) for name in [WEIGHTS, *written])}")

    def close(self) -> None:
        """However the run ended: the checkpoint being written and the pictures being drawn are finished
        (not cut short), TensorBoard is closed and the folder's lock released."""
        self.checkpoints.wait()
        self.drawer.close(check=False)
        if self.writer is not None:
            self.writer.close()
        self.folder.close()


class MetricsFile:
    """metrics.jsonl, rewritten whole and atomically at each change: a crash or a full disk leaves the old
    file, never a line cut short (a few kB per epoch). `rows` are every row in order; `epochs` the rows of
    the epochs, in order, the last written of each."""

    def __init__(self, path: Path, epochs: int | None = None):
        """Reads `path` when it exists, keeping only the epoch rows of epochs 1..`epochs` (all: None)."""
        self.path, self.rows = Path(path), []
        if not self.path.is_file():
            return
        found, other = {}, []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a damaged line
                continue
            if not isinstance(row, dict):
                continue
            if "epoch" not in row:
                other.append(row)
            elif isinstance(row["epoch"], int) and 0 < row["epoch"] <= (row["epoch"] if epochs is None else epochs):
                found[row["epoch"]] = row
        self.rows = [found[e] for e in sorted(found)] + other

    @property
    def epochs(self) -> list[dict]:
        return [row for row in self.rows if "epoch" in row]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in self.rows).encode())


class Drawer:
    """Draws pictures and curves on one background thread, so that the training thread only launches the
    reconstruction's forward pass. Jobs run in order; a job's error is raised on the training thread by
    the next `check()` (each epoch's end) or by `close()`, which waits for every job.

    An epoch's pictures are drawn while the next epoch trains, so its checkpoint is saved before they are
    written: a picture that fails to write is missing from a run that resumes after it (curves.png is
    drawn again at the next epoch). The last epoch's pictures are awaited before its checkpoint, so a run
    that fails there resumes into that epoch and draws them."""

    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="figures")
        self.jobs = []

    def submit(self, fn, *args) -> None:
        self.jobs.append(self.pool.submit(fn, *args))

    def check(self, wait: bool = False) -> None:
        """Raises the first error of the jobs done so far (all of them, with `wait`): an OSError as it is,
        anything else as a TrainingError."""
        if wait:
            concurrent.futures.wait(self.jobs)
        done = [job for job in self.jobs if job.done()]
        self.jobs = [job for job in self.jobs if not job.done()]
        for job in done:
            exn = job.exception()
            if isinstance(exn, OSError):
                raise exn
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


def open_tensorboard(summary_writer, folder: RunDir):
    """A SummaryWriter on OUTPUT_DIR/tb, its event file listed in run.json (and tb/ when it made it)."""
    tb = folder.folder / TB
    made = not tb.exists()
    folder.claim_tb(made, [])  # before the folder exists: a crash right after leaves it listed
    before = set(tb.iterdir()) if not made else set()
    writer = summary_writer(str(tb))
    folder.claim_tb(made, [p.name for p in tb.iterdir() if p not in before and TB_EVENTS.match(p.name)])
    return writer


def tensorboard_writer():
    """torch's SummaryWriter class; a TrainingError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # here: tensorboard is optional, loaded when asked for
    except ImportError as exn:
        raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard "
                            "(or pip install -e '.[tensorboard]')") from exn
    return SummaryWriter


def end_of_training(model, preview, train_step, args, loaders: dict, cached) -> tuple[dict, dict, list]:
    """After the last epoch, on rank 0: the samples, the interpolations, and in one pass over each split
    (from the resident cache when there is one) the quality work of model/assess.py: the ex-post GMM and
    its faces, the SWD of prior samples, GMM samples and reconstructions against the validation images,
    active units, FID and KID when on (run/fid_plan.py: --fid, by default on CUDA), and with attributes in
    the shards their vectors and attributes.png. Returns the figures
    for the last epoch's row, TensorBoard's pictures and the names of the files written."""
    out_dir, device = Path(args.output_dir), train_step.device
    samples = figures.save_samples(model, args.z_dim, args.seed, device, out_dir / SAMPLES)
    lines = figures.save_interpolations(model, preview, train_step, out_dir / INTERPOLATIONS)
    started = time.perf_counter()

    def every_image(split, keys):  # the whole split once, in stored order
        if split in cached:
            return CachedLoader(loaders[split].cache, args.batch_size, train=False, with_keys=keys)
        return build_loader(args.loader, args.data_path, split, args.batch_size, device, train=False,
                            workers=args.workers, crop=args.crop, with_keys=keys)

    n_fid = fid_plan.images(args.fid, device)
    # A file that fails now (parse_args checked it) costs the figure, not the run: it warns, the weights follow.
    network = fid_plan.network(args.fid_weights, device, asked=False) if n_fid else None
    val, keys = first_images(every_image("val", keys=True), max(quality.SWD_IMAGES, n_fid if network else 0),
                             keys=True)
    fid_reals = None
    if network is not None:
        # What decoded the pixels, for the reals' statistics file: the val loader, or the loader that filled the cache.
        reader = loaders["val"] if "val" not in cached else build_loader(
            args.loader, args.data_path, "val", args.batch_size, device, train=False, workers=args.workers,
            crop=args.crop)
        fid_reals, line = fid_plan.reals(network, val[:n_fid], keys[:n_fid], args.data_path, args.crop,
                                         decoder_of(reader)[1])
        print(line)
    try:
        attributes = shard_attributes(args.data_path, load_manifest(args.data_path))
    except AttributeFileError as exn:  # the weights matter more than the attribute pictures
        print(f"warning: no attribute vectors: {exn}", file=sys.stderr)
        attributes = None
    found, files = assess(model, out_dir / WEIGHTS, seed=args.seed, batch_size=args.batch_size,
                          to_input=train_step.to_input, autocast=train_step.autocast,
                          train=every_image("train", keys=True), attributes=attributes,
                          real=val[:quality.SWD_IMAGES], fid_reals=fid_reals, pictures=out_dir, start=preview[:1])
    found["quality_seconds"] = time.perf_counter() - started
    pictures = {"generated_samples": samples, **({"interpolations": lines} if lines is not None else {})}
    return found, pictures, [SAMPLES, *([INTERPOLATIONS] if lines is not None else []), *(f.name for f in files)]


def saved_args(args) -> dict:
    """The settings as plain values (what a checkpoint and run.json may hold), the command line aside."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k != "given"}, default=str))
