"""The `cache` loader: a split decoded once, kept as one (N, 64, 64, 3) uint8 tensor on the training device.

With a fixed crop and flips as the only augmentation, an image's 64x64 pixels are the same in every
epoch. So one pass of a decoding loader (`torch` or `dali`) in evaluation mode -- fixed order, no
flips, the run's crop -- fills the tensor (GPU memory on CUDA, RAM on the CPU), and every epoch after
that is tensor indexing: no decoding, no worker processes, no host synchronisation per batch. The
cached pixels are exactly those the filling loader makes. Rows are in stored order (the split's
shards in manifest order, each in its own order), so what the cache holds does not depend on how it
was filled. Under torch.distributed each rank decodes only its evaluation share (the filling
loader's own rank split) and the ranks exchange the shares, so every rank holds the whole split.

Batches: each epoch, a permutation of the whole split and a coin per position come from a CPU
generator seeded by (seed, epoch) and go to the device once. In training each rank reads a
contiguous, equal run of the permutation (the final partial batch dropped); in evaluation it reads
a disjoint run of the stored order, every sample once over the ranks. A batch is the `index_select`
of its rows, and where flips are on, `torch.where` between those rows and their mirror (`flip`).

The same op sequence runs on the CPU and on CUDA, so the CPU test suite runs what the GPU runs. Their
CUDA kernels, read in ATen's source (aten/src/ATen/native/cuda/): index_select (Indexing.cu, every
dtype; beyond 16 indices it runs as gather, ScatterGatherKernel.cu, every dtype), flip (IndexKernel.cu,
every dtype, any strides), where (TensorCompare.cu, dispatched by element size), slice copies; NCCL
broadcasts uint8 as ncclUint8.
"""

import gc
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import cache_file as cache_files
from pipeline.geometry import IMAGE_SIZE
from pipeline.shards import DataError, rank_samples, split_shards, stored_keys

PIXELS = (IMAGE_SIZE, IMAGE_SIZE, 3)
IMAGE_BYTES = math.prod(PIXELS)
MEMORY_FRACTION = 0.5  # of the device's free memory (CUDA) or the available RAM (CPU) the cache may take
CACHE_MODES = ("auto", "on", "off")
# Images per batch of the filling pass, at least: the pixels do not depend on it, and on the CPU a fill
# at 256 took less CPU time than at 32, 128 or 512 (benchmarks/RESULTS.md, "Decoding once").
FILL_BATCH_SIZE = 256


class Cache:
    """A split as `images`, (N, 64, 64, 3) uint8 on one device with rows in stored order, and their `keys`.

    `decoded` counts the images this process decoded (its share under torch.distributed; 0 when loaded),
    `seconds` the time the fill took (decoding and exchange, or loading, included), `source` says
    whether the pixels were "decoded" or "loaded" from the decoded file beside the shards
    (pipeline/cache_file.py), and `file_note` what happened to that file, in words (None without one)."""

    def __init__(self, images: torch.Tensor, keys: list[str], decoded: int, seconds: float,
                 source: str = "decoded", file_note: str | None = None):
        self.images, self.keys, self.decoded, self.seconds = images, keys, decoded, seconds
        self.source, self.file_note = source, file_note

    def __len__(self) -> int:
        return len(self.keys)


def exchanges(world_size: int) -> bool:
    """Whether a fill for `world_size` ranks decodes one share and exchanges it: only in a process group.
    Without one (tests, the benchmark) every rank's cache is filled whole."""
    if world_size == 1 or not dist.is_initialized():
        return False
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size {world_size} is not the process group's {dist.get_world_size()}")
    return True


def fill(reader, keys: list[str], device, rank: int = 0, world_size: int = 1, progress: bool = False,
         desc: str = "caching") -> Cache:
    """One pass of `reader`, an evaluation-mode loader with keys over share `rank` of `world_size` of the
    split whose stored keys are `keys`, into a Cache on `device`; shares exchanged in a process group."""
    started = time.perf_counter()
    device = torch.device(device)
    row_of = {key: i for i, key in enumerate(keys)}
    if len(row_of) != len(keys):
        raise DataError("the shards' indexes hold the same key twice; run prep/shard.py again")
    images = torch.empty((len(keys), *PIXELS), dtype=torch.uint8, device=device)
    start, stop = rank_samples(len(keys), rank, world_size, train=False)
    filled = torch.zeros(len(keys), dtype=torch.bool)
    count = 0
    for batch, batch_keys in tqdm(reader, total=len(reader), desc=desc, unit="batch", disable=not progress,
                                  dynamic_ncols=True):
        try:
            rows = [row_of[key] for key in batch_keys]
        except KeyError as exn:
            raise DataError(f"sample {exn.args[0]} is in the shards but not in their indexes; "
                            "run prep/shard.py again") from None
        nhwc = batch.permute(0, 2, 3, 1)  # channels_last NCHW is NHWC in memory: a view
        # One slice copy per run of consecutive rows (a batch is one run when loaders read in stored
        # order): index_copy_ costs a hundred times more on CPUs.
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            images[rows[i]:rows[i] + j - i].copy_(nhwc[i:j])
            i = j
        filled[rows] = True
        count += len(rows)
    if count != stop - start or int(filled[start:stop].sum()) != count:
        raise RuntimeError(f"{type(reader).__name__} gave {count} images for the {stop - start} of this rank's "
                           f"share [{start}, {stop}), not each of them once")
    if exchanges(world_size):
        # Every rank broadcasts its share into the others' tensors in place: an all-gather of unequal
        # shares without a padded buffer or a copy (NCCL's own all_gather does the same for unequal sizes).
        for source in range(world_size):
            lo, hi = rank_samples(len(keys), source, world_size, train=False)
            dist.broadcast(images[lo:hi], src=source)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Cache(images, keys, decoded=count, seconds=time.perf_counter() - started)


def mirror(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """(B, 64, 64, 3) images, those where the bool `flips` is True mirrored left to right."""
    mirrored = images.flip(2)
    # where() chooses whole images, so it may choose 8-byte words: on uint8 the CPU kernel goes byte by byte.
    def words(x):
        return x.view(len(x), -1).view(torch.int64)
    return torch.where(flips[:, None], words(mirrored), words(images)).view(torch.uint8).view(images.shape)


def gather(images: torch.Tensor, rows: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
    """The batch of `rows` (int64, on the device) of a cache's (N, 64, 64, 3) `images`, mirrored where the
    bool `flips` is True: (B, 3, 64, 64) uint8 channels_last. The one gather of the loader and of the
    static-buffer step (model/step.py), so both serve the same pixels by the same ops."""
    batch = images.index_select(0, rows)
    if flips is not None:
        batch = mirror(batch, flips)
    return batch.permute(0, 3, 1, 2)  # NHWC in memory is channels_last NCHW: a view


@dataclass(frozen=True)
class Resident:
    """A training split resident on the device, as the cache hands it to the static-buffer step
    (model/step.py's StaticStep): its `images`, `steps` batches of `batch_size` per epoch, whether it
    flips, and `plan(epoch)`, the epoch's rows and flip coins on the CPU. `gather` makes a batch by the
    loader's own ops, so both serve the same pixels."""
    images: torch.Tensor
    batch_size: int
    steps: int
    flip: bool
    plan: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]

    def gather(self, rows: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        return gather(self.images, rows, flips)


class CachedLoader:
    """Yields (B, 3, 64, 64) uint8 channels_last batches from a Cache, on its device (with keys when asked)."""

    def __init__(self, cache: Cache, batch_size: int, *, train: bool, rank: int = 0, world_size: int = 1,
                 seed: int = 0, flip: bool | None = None, with_keys: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size}")
        self.cache, self.images, self.device = cache, cache.images, cache.images.device
        self.batch_size, self.train, self.rank, self.world_size = batch_size, train, rank, world_size
        self.seed, self.flip, self.with_keys = seed, train if flip is None else flip, with_keys
        self.epoch = 0
        self.start, self.stop = rank_samples(len(cache), rank, world_size, train)
        n = self.stop - self.start
        self.num_samples = n - n % batch_size if train else n

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's rows for `epoch` (None: the one set_epoch set), in order, and each one's flip (None
        without flips), on the CPU."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(random.Random(f"{self.seed}-{epoch}").getrandbits(63))
        total = len(self.cache)
        # Drawn for the whole split on every rank: ranks agree on the permutation, and an image's place
        # and flip do not depend on the number of ranks.
        order = torch.randperm(total, generator=generator) if self.train else torch.arange(total)
        flips = torch.rand(total, generator=generator) < 0.5 if self.flip else None
        run = slice(self.start, self.start + self.num_samples)
        return order[run], None if flips is None else flips[run]

    def resident(self) -> "Resident":
        """What the static-buffer step takes from a training split: the resident images and each epoch's plan."""
        if not self.train:
            raise ValueError("the static-buffer step serves a training CachedLoader (the resident cache)")
        return Resident(self.images, self.batch_size, len(self), self.flip, self.plan)

    def __iter__(self):
        rows_cpu, flips = self.plan()
        rows = rows_cpu.to(self.device)  # once per epoch; batches below slice it without a host sync
        flips = None if flips is None else flips.to(self.device)
        for lo in range(0, self.num_samples, self.batch_size):
            hi = lo + self.batch_size
            images = gather(self.images, rows[lo:hi], None if flips is None else flips[lo:hi])
            yield (images, [self.cache.keys[i] for i in rows_cpu[lo:hi].tolist()]) if self.with_keys else images


def cached_loader(data_path, split: str, batch_size: int, device, *, train: bool, rank: int = 0,
                  world_size: int = 1, workers: int = 2, seed: int = 0, crop: str = "center",
                  flip: bool | None = None, with_keys: bool = False, source: str = "torch",
                  progress: bool = False, cache_file: str = "off", fill_batch_size: int | None = None,
                  fill_with=None, **options) -> CachedLoader:
    """Fills a Cache of `split` with one evaluation pass of the `source` loader, which `fill_with` (the signature
    of pipeline.build_loader) builds with `options`, then serves it. `loader.cache.seconds` is how long the
    fill took. `cache_file="auto"` loads the split from its decoded file beside the shards when that
    matches, and writes the file after decoding otherwise (pipeline/cache_file.py); "off" neither reads nor
    writes it. The filling pass reads batches of `fill_batch_size` (default: the larger of `batch_size` and
    FILL_BATCH_SIZE)."""
    if cache_file not in cache_files.FILE_MODES:
        raise ValueError(f"cache_file must be one of {cache_files.FILE_MODES}, not {cache_file!r}")
    started = time.perf_counter()
    device = torch.device(device)
    share = (rank, world_size) if exchanges(world_size) else (0, 1)
    keys = stored_keys(split_shards(data_path, split))
    fill_batch_size = fill_batch_size or max(batch_size, FILL_BATCH_SIZE)
    reader = fill_with(source, data_path, split, fill_batch_size, device, train=False, rank=share[0],
                          world_size=share[1], workers=workers, seed=seed, crop=crop, flip=False, with_keys=True,
                          **options)
    cache = None
    if cache_file == "auto":
        short, decoder = cache_files.decoder_of(reader)
        path = Path(data_path) / cache_files.file_name(split, short, crop)
        header = cache_files.expected_header(data_path, split, keys, decoder, crop)
        cache, note = load_file(path, header, keys, device, share[1], started)
    if cache is None:
        cache = fill(reader, keys, device, *share, progress=progress, desc=f"caching {split} ({source} loader)")
        if cache_file == "auto":
            # After the exchange every rank holds the whole split; one process per machine writes it (the
            # shard folder may be a machine's own disk), and on a shared folder the last rename wins.
            if int(os.environ.get("LOCAL_RANK", share[0])) == 0:
                note = save_file(path, cache.images, header, note)
            cache.file_note = note
    del reader  # its workers or pipeline, and their memory, go now
    if cache.source == "decoded":  # a reader that never ran holds nothing; a collection costs more than a load
        gc.collect()
    if source == "dali" and device.type == "cuda" and cache.source == "decoded":
        from nvidia.dali.backend import ReleaseUnusedMemory  # here: DALI is optional, and the fill ran it
        ReleaseUnusedMemory()  # DALI keeps its GPU memory pools after the pipeline is gone
    return CachedLoader(cache, batch_size, train=train, rank=rank, world_size=world_size, seed=seed, flip=flip,
                        with_keys=with_keys)


def load_file(path: Path, header: dict, keys: list[str], device, world_size: int,
              started: float) -> tuple[Cache | None, str | None]:
    """The Cache loaded from the decoded file `path`, or None and why not (None when there is no file).
    In a process group every rank loads the file itself and all use it only if all could."""
    images, why = None, None
    try:
        images = cache_files.load(path, header, device)
    except FileNotFoundError:
        pass
    except cache_files.Unusable as exn:
        why = f"{path} was not used, as {exn}; decoded again"
    except OSError as exn:  # a read error mid-file
        why = f"{path} was not used, as it could not be read ({exn.strerror or exn}); decoded again"
    if exchanges(world_size):
        everyone = torch.tensor([images is not None], dtype=torch.int32, device=device)
        dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
        if images is not None and not int(everyone):
            images, why = None, f"{path} was not usable on every process; decoded again"
    if images is None:
        return None, why
    return Cache(images, keys, decoded=0, seconds=time.perf_counter() - started, source="loaded",
                 file_note=f"loaded from {path}"), None


def save_file(path: Path, images: torch.Tensor, header: dict, note: str | None) -> str:
    """Writes the decoded file and says what happened, after `note` (why the old one was not used)."""
    started = time.perf_counter()
    failed = cache_files.save(path, images, header)
    said = (f"{path} {failed}" if failed else
            f"wrote {path} ({nbytes(cache_files.file_bytes(len(images)))} in {time.perf_counter() - started:.1f} s) "
            "for later runs to load")
    return f"{note}; {said}" if note else said


# ----------------------------------------------------------------------------- whether to cache


def nbytes(n: float) -> str:
    for unit, scale, digits in (("GB", 1e9, 2), ("MB", 1e6, 1), ("kB", 1e3, 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} bytes"


def available_ram() -> int | None:
    """Bytes of RAM available to new allocations without swapping: MemAvailable on Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_budget(device) -> tuple[int, str]:
    """Bytes this process's caches may take on `device`, and in words how that was worked out."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * MEMORY_FRACTION), f"{MEMORY_FRACTION:.0%} of the {nbytes(free)} free on {device}"
    available = available_ram()
    if available is None:
        return 0, "this system does not say how much RAM is available"
    # Processes of one torchrun on this machine each hold a copy in the same RAM.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    shared = f", shared by {local} processes" if local > 1 else ""
    how = f"{MEMORY_FRACTION:.0%} of the {nbytes(available)} of available RAM{shared}"
    return int(available * MEMORY_FRACTION / local), how


def plan(mode: str, sizes: dict[str, int], device, epochs_left: int, resumed: str | None = None,
         loader: str = "torch") -> tuple[list[str], str]:
    """Which of the splits in `sizes` (split -> images, the training split first) to cache, and a line
    saying why: the first if it fits, and each other one that fits as well. `resumed` is the choice
    ("on"/"off") of the run being resumed, if any: `auto` keeps it, so that the data order of a resumed
    run is that of an uninterrupted one. Raises DataError when `mode` is "on" and the training split
    does not fit."""
    if mode not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {CACHE_MODES}, not {mode!r}")
    streams = f"the {loader} loader decodes every epoch"
    if mode == "off":
        return [], f"cache off (--cache off): {streams}"
    if mode == "auto" and resumed == "off":
        return [], f"cache off: the run being resumed streamed, and keeping that keeps its data order; {streams}"
    if mode == "auto" and resumed != "on" and epochs_left <= 1:
        left = max(epochs_left, 0)
        return [], (f"cache off: {left} epoch{'' if left == 1 else 's'} to run, and filling the cache would be one "
                    f"more pass over the images; {streams}")
    budget, how = memory_budget(device)
    if dist.is_initialized():  # every rank must choose alike: the smallest budget decides
        agreed = torch.tensor([budget], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if int(agreed) < budget:
            budget, how = int(agreed), "the smallest budget of the ranks"
    needs = {split: n * IMAGE_BYTES for split, n in sizes.items()}
    (first, need), *_ = needs.items()
    allowed = f"the cache may take {nbytes(budget)} ({how})"
    if need > budget:
        if mode == "on":
            raise DataError(f"--cache on: the {first} split needs {nbytes(need)}, more than {allowed}; "
                            "use --cache auto or off, or free memory")
        order = "; the remaining epochs' data order differs from an uninterrupted run's" if resumed == "on" else ""
        return [], f"cache off: the {first} split needs {nbytes(need)}, more than {allowed}{order}; {streams}"
    chosen, total = [], 0
    for split, need in needs.items():
        if total + need <= budget:
            chosen.append(split)
            total += need
    held = " + ".join(f"{split} {nbytes(needs[split])}" for split in chosen)
    left = [split for split in needs if split not in chosen]
    why = ("the run being resumed used it, and keeping that keeps its data order" if mode == "auto" and resumed == "on"
           else "--cache on" if mode == "on" else f"{epochs_left} epochs to run")
    memory = "GPU memory" if torch.device(device).type == "cuda" else "RAM"
    line = f"cache on ({why}): {held} in {memory}, where {allowed}; filled by one pass of the {loader} loader"
    if left:
        line += f"; {' and '.join(left)} streams, as it does not fit as well"
    return chosen, line
