"""The `torch` loader: webdataset reads the shards inside DataLoader workers.

An epoch's batches are planned from (seed, epoch, rank) alone and worker w makes every W-th one, so
the DataLoader yields the same batches in the same order whatever the worker count (`ShardStream`).

On CPU the workers decode with libjpeg-turbo through simplejpeg, at the smallest DCT-domain scale
(1/8 ... 8/8) at which the crop still falls on whole pixels and spans 64 px or more: half size for
the seed's whole-frame squash of 178x218 frames, full size for CelebA's 148x148 crop, whose odd
offsets (15, 35) would otherwise move half a pixel. The crops of a batch are then resized together
by one antialiased uint8 `interpolate`. On CUDA the workers only read bytes; whole batches are
decoded by nvJPEG through TorchCodec (`torchcodec.decoders.decode_jpeg(list, device="cuda")`; torchvision's
deprecated `decode_jpeg` when TorchCodec is missing), then cropped, resized in float32 (CUDA's antialiased
`interpolate` has no uint8 kernel) and rounded back to uint8 on the GPU, on a side stream so that the
decoder's stream synchronisations do not wait for the training step queued before it.
"""

import functools
import io
import math
import os
import multiprocessing
import random
import tarfile
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Callable

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.cli import first_line
from common.files import NotRegularFile, open_regular
from pipeline.geometry import IMAGE_SIZE, crop_box
from pipeline.images import check_pixels, open_image
from pipeline.shards import SHUFFLE_BUFFER, DataError, epoch_order, rank_samples, rebuild_hint, split_shards, take

SHUFFLE_START = 256  # the buffer yields from this size on and grows to SHUFFLE_BUFFER: epochs start sooner
DCT_SCALES = [Fraction(m, 8) for m in range(1, 9)]  # the downscalings libjpeg-turbo decodes directly


@functools.lru_cache(maxsize=256)  # one entry per frame size: CelebA has one
def decode_plan(width: int, height: int, crop: str) -> tuple[int, int, tuple[int, int, int, int]]:
    """(decoded width, height, crop box in decoded pixels) at the smallest DCT scale at which the crop
    falls on whole pixels and keeps both sides >= 64 px."""
    box = crop_box(width, height, crop)
    side = min(box[2] - box[0], box[3] - box[1])
    for scale in DCT_SCALES:
        if all((c * scale).denominator == 1 for c in box) and side * scale >= IMAGE_SIZE:
            break
    else:
        scale = Fraction(1)
    return int(width * scale), int(height * scale), tuple(int(c * scale) for c in box)


def decode_crop(jpeg: bytes, crop: str) -> np.ndarray:
    """JPEG bytes -> the crop region as (h, w, 3) uint8, decoded no larger than it needs to be. An image whose
    header claims more than MAX_PIXELS is refused (TooManyPixels, a ValueError) before it is decoded."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    except ValueError:
        height = width = None
    if height is not None:
        check_pixels(width, height)
    try:
        if height is None:
            raise ValueError("not a JPEG simplejpeg reads")
        scaled_width, scaled_height, box = decode_plan(width, height, crop)
        image = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", min_width=scaled_width, min_height=scaled_height)
        if image.shape[:2] != (scaled_height, scaled_width):  # not the scale asked for: start again whole
            image, box = simplejpeg.decode_jpeg(jpeg, colorspace="RGB"), crop_box(width, height, crop)
    except ValueError:  # not a JPEG simplejpeg reads (CMYK, a PNG named .jpg): PIL reads the rest
        image = np.array(open_image(jpeg).convert("RGB"))  # writable, as torch wants
        box = crop_box(image.shape[1], image.shape[0], crop)
    left, top, right, bottom = box
    return image[top:bottom, left:right]


def resize_crops(crops: list[torch.Tensor]) -> torch.Tensor:
    """(3, h, w) uint8 crops on the CPU -> (B, 3, 64, 64) uint8, antialiased bilinear.

    One call for the batch when the crops share a size (CelebA: always), stacked channels_last: the
    layout of the uint8 fast path of `interpolate`, which exists on the CPU only (`resize_crops_float`
    is the GPU's)."""
    def resize(x):
        return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
    if len({c.shape for c in crops}) == 1:
        return resize(torch.stack([c.permute(1, 2, 0) for c in crops]).permute(0, 3, 1, 2))
    return torch.cat([resize(c[None]) for c in crops])


def decode_resized_batch(jpegs: list[bytes], crop: str) -> torch.Tensor:
    """JPEG bytes -> (B, 64, 64, 3) uint8 on the CPU, as the workers make them."""
    crops = [torch.from_numpy(decode_crop(jpeg, crop)).permute(2, 0, 1) for jpeg in jpegs]
    return resize_crops(crops).permute(0, 2, 3, 1).contiguous()  # a view when the result is channels_last


def decode_resized(jpeg: bytes, crop: str = "center") -> np.ndarray:
    """One JPEG -> (64, 64, 3) uint8, as the workers make them."""
    return decode_resized_batch([jpeg], crop)[0].numpy()


def cause(exn: Exception) -> str:
    """What went wrong, in words: webdataset wraps the reader's message in tuples with the open file."""
    first = exn.args[0] if exn.args else ""
    while isinstance(first, tuple) and first:
        first = first[0]
    return first_line(exn, str(first).split(" @ ", 1)[0])


def tar_members(stream, url: str, size: int):
    """{"fname", "data", "__url__"} of each regular member of the uncompressed tar `stream` of `size` bytes,
    as webdataset's tar_file_iterator yields them, with every member's size checked against the bytes
    left in the file before it is read: a tar header may claim any size, and a sparse member makes up
    the bytes it claims (prep/shard.py writes neither)."""
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if info.issparse():
                raise ValueError(f"member {info.name!r} is a sparse file, which prep/shard.py never writes")
            if not info.isreg() or info.name.startswith("__"):  # webdataset skips these too
                continue
            if info.size > size - info.offset_data:
                raise ValueError(f"member {info.name!r} claims {info.size:,} bytes, more than the "
                                 f"{max(size - info.offset_data, 0):,} left in the {size:,}-byte file")
            yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []  # a stream read keeps no list of what it has passed


def read_spans(spans):
    """Yield the samples of each span, with errors that name the shard and say how to rebuild it.

    Each tar is opened here (`open_regular`: no link followed, no FIFO waited on) and read by
    `tar_members`, whose samples webdataset groups by key: given a URL string, webdataset would open
    it itself, and it runs `pipe:` URLs in a shell."""
    for span in spans:
        count, hint = 0, rebuild_hint(span.shard.tar.parent)
        try:
            fd = open_regular(span.shard.tar)
        except NotRegularFile as exn:
            raise DataError(f"shard {exn}; {hint}") from None
        except OSError as exn:
            raise DataError(f"shard {span.shard.tar} is unreadable ({exn.strerror or exn}); {hint}") from None
        try:
            with os.fdopen(fd, "rb") as stream:
                files = tar_members(stream, str(span.shard.tar), os.fstat(fd).st_size)
                for sample in islice(wds.tariterators.group_by_keys(files), span.start, span.stop):
                    count += 1
                    yield sample
        except (tarfile.TarError, OSError, ValueError, EOFError) as exn:
            raise DataError(f"shard {span.shard.tar} is unreadable ({cause(exn)}); {hint}") from None
        if count < span.stop - span.start:  # a tar cut at a member boundary ends early without an error
            raise DataError(f"shard {span.shard.tar} ends after {span.start + count} of its "
                            f"{span.shard.num_samples} samples: it is truncated; {hint}")


class ShardStream(IterableDataset):
    """This rank's samples of an epoch, in batches planned from (seed, epoch, rank) alone.

    `plan` lays the epoch's batches out once; worker w of W makes batches w, w + W, w + 2W, ... and the
    DataLoader, which asks its workers in turn, yields them as 0, 1, 2, ...: the same batches in the same
    order for any worker count, so a run resumed with another `-j` goes on as it would have. Every
    worker reads this rank's whole run of the shards (the samples arrive in stream order, each batch
    takes its samples from the shuffle window) but decodes only its own batches."""

    def __init__(self, shards, batch_size, rank, world_size, train, flip, crop, seed, decode, with_keys):
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size
        self.train, self.flip, self.crop, self.seed = train, flip, crop, seed
        self.decode, self.with_keys = decode, with_keys
        # Shared memory: workers persist across epochs with their own copy of this object, so a plain
        # attribute set in the main process would never reach them.
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        total = sum(s.num_samples for s in shards)
        self.start, self.stop = rank_samples(total, rank, world_size, train)

    def plan(self, epoch: int) -> tuple[list[list[int]], list[bool]]:
        """The epoch's batches as positions in this rank's run of the epoch's shard order, and the flip
        of each place in that sequence. Training: the run through a shuffle buffer, whole batches only;
        evaluation: stored order, the last batch possibly short."""
        n = self.stop - self.start
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}")
        if self.train:
            positions = list(wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_START, rng=rng)(iter(range(n))))
            positions = positions[:n - n % self.batch_size]
        else:
            positions = list(range(n))
        flips = [self.flip and rng.random() < 0.5 for _ in positions]
        return [positions[i:i + self.batch_size] for i in range(0, len(positions), self.batch_size)], flips

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self._epoch.value
        batches, flips = self.plan(epoch)
        mine = list(range(worker, len(batches), workers))
        if not mine:
            return
        place = {p: (b, j) for b in mine for j, p in enumerate(batches[b])}  # position -> (batch, slot)
        filling = {b: [None] * len(batches[b]) for b in mine}
        missing = {b: len(batches[b]) for b in mine}
        order = epoch_order(self.shards, epoch, self.seed, shuffle=self.train)
        turn = 0  # the next of `mine` to yield
        for position, sample in enumerate(read_spans(take(order, self.start, self.stop))):
            if position not in place:
                continue
            b, j = place.pop(position)
            filling[b][j] = sample
            missing[b] -= 1
            while turn < len(mine) and missing[mine[turn]] == 0:
                b = mine[turn]
                yield self.make_batch(filling.pop(b), flips[b * self.batch_size:][:len(batches[b])])
                turn += 1
            if turn == len(mine):  # the rest of the run holds none of this worker's samples
                return

    def make_batch(self, batch, flips):
        out = self.decode_batch(batch, flips) if self.decode else self.pack_bytes(batch, flips)
        if self.with_keys:
            out["keys"] = [s["__key__"] for s in batch]
        return out

    def decode_batch(self, batch, flips):
        try:
            images = decode_resized_batch([sample["jpg"] for sample in batch], self.crop)  # (B, 64, 64, 3)
        except (OSError, ValueError, KeyError):
            for sample in batch:  # which one: the error alone does not say
                try:
                    decode_crop(sample["jpg"], self.crop)
                except (OSError, ValueError, KeyError) as exn:
                    raise DataError(f"sample {sample['__key__']} in {sample['__url__']} does not decode "
                                    f"({exn}); {rebuild_hint(Path(sample['__url__']).parent)}") from exn
            raise
        flipped = [i for i, flip in enumerate(flips) if flip]
        images[flipped] = images[flipped].flip(2)
        return {"images": images}

    @staticmethod
    def pack_bytes(batch, flips):
        # One buffer per batch: a tensor per JPEG would cost a shared-memory handle each.
        blobs = [sample["jpg"] for sample in batch]
        for sample, blob in zip(batch, blobs):  # the device decoder sizes its output from the header alone
            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(blob)
            except ValueError:  # not a JPEG simplejpeg reads: the decoder reports it, naming no size
                continue
            try:
                check_pixels(width, height, f"sample {sample.get('__key__', '')}")
            except ValueError as exn:
                url = sample.get("__url__", "")
                raise DataError(f"{exn} in {url}; {rebuild_hint(Path(url).parent)}") from None
        data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        return {"data": data, "lengths": [len(b) for b in blobs], "flips": torch.tensor(flips)}


# ----------------------------------------------------------------------------- decoding on the training device


def _torchcodec_decode(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchcodec.decoders import decode_jpeg  # TorchCodec >= 0.16; older releases have no image decoders
    return decode_jpeg(jpegs, mode="RGB", device=device)


def _torchvision_decode(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg  # deprecated since torchvision 0.29
    if device.type == "cuda":
        # torchvision allocates the outputs on the current stream (the loader's side stream) and decodes
        # on a pool stream that does not wait for it, so the caching allocator may hand it a block that
        # work queued on the current stream still reads (pytorch/vision#9606). With nothing queued
        # there, no such block exists: the host waits for this stream alone, not the training stream.
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)


# Batched nvJPEG on CUDA and libjpeg-turbo on the CPU behind one call, in the order they are tried.
JPEG_DECODERS: dict[str, Callable] = {"torchcodec": _torchcodec_decode, "torchvision": _torchvision_decode}
DECODER_HINT = "pip install 'torchcodec>=0.16' (or pip install -e '.[gpu]')"


@functools.cache
def _probe_jpeg() -> torch.Tensor:
    data = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(data, "JPEG")
    return torch.frombuffer(bytearray(data.getvalue()), dtype=torch.uint8)


@functools.cache
def jpeg_decoder(device: torch.device) -> tuple[str, Callable]:
    """(name, decode) of the first of JPEG_DECODERS that imports and decodes a JPEG on `device`: a
    decoder that only fails at the first batch (a CPU-only build, say) is passed over here instead."""
    failures = []
    for name, decode in JPEG_DECODERS.items():
        try:
            (image,) = decode([_probe_jpeg()], device)
            if image.shape == (3, 16, 16) and image.device.type == device.type:
                return name, decode
            failures.append(f"{name} gave {tuple(image.shape)} on {image.device}")
        except Exception as exn:  # ImportError, or a RuntimeError from a build without this device
            failures.append(f"{name}: {first_line(exn)}")
    raise DataError(f"no JPEG decoder works on {device} ({'; '.join(failures)}): {DECODER_HINT}")


def resize_crops_float(crops: list[torch.Tensor]) -> torch.Tensor:
    """(3, h, w) uint8 crops on any device -> (B, 3, 64, 64) uint8: antialiased bilinear in float32,
    rounded. CUDA's antialiased kernel dispatches floating types only (docs/cuda-paths.md); float32
    keeps the rounding within one level of the CPU's uint8 kernel."""
    def resize(x):
        x = F.interpolate(x.float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        return x.round_().clamp_(0, 255).to(torch.uint8)
    if len({c.shape for c in crops}) == 1:
        return resize(torch.stack(crops))
    return torch.cat([resize(c[None]) for c in crops])


def gpu_decode(data, lengths, flips, crop, device) -> torch.Tensor:
    """A batch of JPEG bytes -> (B, 3, 64, 64) uint8 on `device`: decoded there (nvJPEG on CUDA), cropped,
    resized by `resize_crops_float` and flipped. The same calls run on the CPU, where the tests run them."""
    device = torch.device(device)
    _, decode = jpeg_decoder(device)
    images = decode(list(torch.split(data, lengths)), device)
    crops = []
    for image in images:  # (3, H, W) each
        left, top, right, bottom = crop_box(image.shape[-1], image.shape[-2], crop)
        crops.append(image[:, top:bottom, left:right])
    out = resize_crops_float(crops)
    flips = flips.to(device, non_blocking=True).view(-1, 1, 1, 1)
    return torch.where(flips, out.flip(-1), out)


def lower_priority(worker_id: int) -> None:
    """Training on the CPU: the model's threads keep their cores, and workers fill the prefetch queue in
    the gaps. At equal priority each worker's time slice stalls every training thread at the next
    barrier, which lowered the end-to-end rate on 2 cores (benchmarks/RESULTS.md has the figures)."""
    os.nice(19)


class TorchLoader:
    """Yields (B, 3, 64, 64) uint8 batches on `device`, channels_last (with keys when asked)."""

    def __init__(self, data_path, split, batch_size, device, *, train, rank=0, world_size=1, workers=2,
                 seed=0, crop="center", flip=None, with_keys=False, gpu_decode=None):
        self.device = torch.device(device)
        self.gpu_decode = self.device.type == "cuda" if gpu_decode is None else gpu_decode
        if self.gpu_decode:
            jpeg_decoder(self.device)  # no decoder: say so now, in one line, not at the first batch
        # The decoders synchronise their stream with the host; on their own stream that waits for the
        # decode alone, not for the training step queued on the current stream.
        self.stream = torch.cuda.Stream(self.device) if self.gpu_decode and self.device.type == "cuda" else None
        self.crop, self.with_keys, self.batch_size = crop, with_keys, batch_size
        self.dataset = ShardStream(split_shards(data_path, split), batch_size, rank, world_size, train,
                                   train if flip is None else flip, crop, seed, not self.gpu_decode, with_keys)
        n = self.dataset.stop - self.dataset.start
        self.num_samples = n - n % batch_size if train else n
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=workers,
                                 pin_memory=self.device.type == "cuda" and not self.gpu_decode,
                                 prefetch_factor=4 if workers else None,
                                 # Workers outlive epochs: no teardown and fork at every epoch start.
                                 persistent_workers=workers > 0,
                                 # Its own generator: drawing worker seeds from the global one would make
                                 # the model's noise depend on when workers start (and so break resuming).
                                 generator=torch.Generator().manual_seed(seed),
                                 worker_init_fn=lower_priority if self.device.type == "cpu" else None)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.dataset._epoch.value = epoch

    def __iter__(self):
        for item in self.loader:
            if self.gpu_decode:
                images = self.decode_on_device(item)
            else:
                # NHWC in memory is channels_last NCHW: the permute is a view, not a copy.
                images = item["images"].to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            yield (images, item["keys"]) if self.with_keys else images

    def decode_on_device(self, item) -> torch.Tensor:
        if self.stream is None:
            return gpu_decode(item["data"], item["lengths"], item["flips"], self.crop, self.device).contiguous(
                memory_format=torch.channels_last)
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            images = gpu_decode(item["data"], item["lengths"], item["flips"], self.crop, self.device).contiguous(
                memory_format=torch.channels_last)
        current.wait_stream(self.stream)
        images.record_stream(current)  # allocated on the side stream, used and freed on the current one
        return images
