"""The `dali` loader: NVIDIA DALI reads the prep shards through their `.idx` files, decodes and augments.

What runs where: the test suite runs the whole CPU path in DALI's CPU-only mode (`device_id=None`):
the webdataset reader with its sharding, shuffling and padding, `peek_image_shape` +
`decoders.image_slice` (ROI decoding), `resize`, `flip`/`coin_flip`, `get_property("source_info")`
for keys, and DALIGenericIterator with DROP and PARTIAL. The CUDA path follows DALI's documentation
and has not yet been run on a GPU: `device="mixed"` decoding (nvJPEG, the hardware decoder and
`hw_decoder_load`, `jpeg_fancy_upsampling`), resize and flip on the GPU, `device_id`, and batches
handed over as CUDA tensors. The tests define the CUDA graph, which makes DALI check every
operator's arguments, but building it needs a GPU.

Every `iter()` builds a fresh pipeline (milliseconds) from (seed, epoch): the torch loader's shard
order for that epoch, then DALI's shard `rank` of `world_size`. An epoch thus depends on nothing but
its number (resumes, and an iterator abandoned halfway, leave no trace), and it is exactly the
iterator's first pass: DALI's reader never stops at an epoch end, only the iterator does, from what
`reader_name` tells it. tests/test_dali.py checks that sample by sample.
"""

import io
import math
import os
import random
import re

import torch
from PIL import Image

from pipeline import DALI_INSTALL
from common.files import open_regular
from pipeline.geometry import CROP_OF, CROP_SIDE, IMAGE_SIZE
from pipeline.shards import (SHUFFLE_BUFFER, DataError, epoch_order, read_index_text, rebuild_hint, split_shards,
                             take)

INSTALL_HINT = f"the dali loader needs NVIDIA DALI: {DALI_INSTALL}"
READER = "reader"

try:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError:  # DaliLoader() reports it with INSTALL_HINT; importing this module must still work
    def pipeline_def(function):
        return function


@pipeline_def
def face_pipeline(tars, idxs, shard_id, num_shards, shuffle, initial_fill, crop, flip, gpu, hw_decoder_load,
                  with_keys):
    jpegs = fn.readers.webdataset(
        paths=tars, index_paths=idxs, ext="jpg", missing_component_behavior="error", name=READER,
        shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle, initial_fill=initial_fill,
        # One pipeline reads one epoch of its own shard; padding repeats the shard's last sample
        # (the iterator trims it) rather than reading on into the next epoch.
        stick_to_shard=True, pad_last_batch=not shuffle,
        # The reader shares the mapped tar bytes: the 1 MiB default is reserved for nothing.
        tensor_init_bytes=1 << 16)
    # nvJPEG's default chroma upsampling differs from libjpeg-turbo's (the CPU decoder, and PIL).
    decode = (dict(device="mixed", hw_decoder_load=hw_decoder_load, jpeg_fancy_upsampling=True) if gpu
              else dict(device="cpu"))
    if crop == "center":
        # geometry.crop_box in integers from the encoded shape, so that only the crop is decoded, for
        # any frame size: side = round(min(w, h) * CROP_SIDE / CROP_OF), rounded half up; never a tie for
        # 148 / 178, as 148 * min(w, h) is even and 178 / 2 = 89 odd.
        shape = fn.peek_image_shape(jpegs, dtype=types.INT32)  # (H, W, C)
        height, width = shape[0], shape[1]
        side = (dmath.min(width, height) * CROP_SIDE + CROP_OF // 2) // CROP_OF
        images = fn.decoders.image_slice(jpegs, start=fn.stack((width - side) // 2, (height - side) // 2),
                                         shape=fn.stack(side, side), **decode)
    else:
        images = fn.decoders.image(jpegs, **decode)
    # Linear with antialiasing widens the filter when shrinking, like PIL's BILINEAR in the torch loader.
    images = fn.resize(images, size=(IMAGE_SIZE, IMAGE_SIZE), antialias=True)
    if flip:
        images = fn.flip(images, horizontal=fn.random.coin_flip())
    if not with_keys:
        return images
    # "<tar>:<offset>:<member>" per sample, of varying length: padded into one dense batch.
    return images, fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)


def index_problem(text: str, shard, tar_size: int) -> str | None:
    """What makes the `.idx` text of `shard` unusable by DALI, or None: the header must give the
    manifest's count, and each line `jpg OFFSET SIZE MEMBER` a member that lies after its own header,
    inside the tar, after the previous member's end (DALI would read a negative or overlapping range
    and fail with a stack trace, or read another member's bytes)."""
    header, *lines = text.splitlines() or [""]
    if header.split() != ["v1.2", str(shard.num_samples)] or len(lines) != shard.num_samples:
        return "does not match the shard and the manifest"
    end = 0  # where the previous member's data ends
    for n, line in enumerate(lines, 2):
        row = line.split()
        if len(row) != 4 or row[0] != "jpg" or not all(re.fullmatch(r"-?[0-9]{1,20}", v) for v in row[1:3]):
            return f"line {n} is not 'jpg OFFSET SIZE MEMBER'"
        offset, size = int(row[1]), int(row[2])
        if offset < 0 or size < 0:
            return f"line {n} gives a negative {'offset' if offset < 0 else 'size'}"
        if offset < end + 512:  # a member's data follows its 512-byte header
            return f"line {n}'s member at offset {offset} overlaps the member before it (which ends at {end})"
        if offset + size > tar_size:
            return f"line {n}'s member ends at byte {offset + size:,}, past the tar's {tar_size:,}"
        end = offset + size
    return None


def read_index(shard, tar_size, hint="run prep/shard.py again"):
    """The `.idx` rows [ext, offset, size, member], checked against the manifest and the tar."""
    try:
        text = read_index_text(shard)
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, ValueError) as exn:
        problem = f"cannot be read ({getattr(exn, 'strerror', None) or exn})"
    else:
        problem = index_problem(text, shard, tar_size)
        if problem is None:
            return [line.split() for line in text.splitlines()[1:]]
    raise DataError(f"index {shard.idx} of shard {shard.tar} {problem}; {hint}")


def check_shards(data_path, split, shards) -> dict:
    """Fail now, naming the shard, where DALI would fail later with a stack trace; (tar, offset) -> key."""
    keys = {}
    for shard in shards:  # split_shards has checked that each is there with the size the manifest records
        rows = read_index(shard, shard.tar.stat().st_size, rebuild_hint(data_path))
        keys.update(((str(shard.tar), int(r[1])), r[3].split(".", 1)[0]) for r in rows)
    return keys


def find_undecodable(spans):
    """(shard, key) of the first sample PIL cannot decode: DALI's decode errors do not say which."""
    for span in spans:
        with os.fdopen(open_regular(span.shard.tar), "rb") as tar:
            tar_size = os.fstat(tar.fileno()).st_size
            for _, offset, size, member in read_index(span.shard, tar_size)[span.start:span.stop]:
                tar.seek(int(offset))
                try:
                    with Image.open(io.BytesIO(tar.read(int(size)))) as im:
                        im.draft("RGB", (1, 1))  # the smallest DCT scale still reads all the data
                        im.load()
                except Exception:  # PIL raises many types for bad data
                    return span.shard, member.split(".", 1)[0]
    return None


class DaliLoader:
    """Yields (B, 3, 64, 64) uint8 batches on `device`, channels_last (with keys when asked)."""

    def __init__(self, data_path, split, batch_size, device, *, train, rank=0, world_size=1, workers=2,
                 seed=0, crop="center", flip=None, with_keys=False, hw_decoder_load=0.65):
        try:
            import nvidia.dali  # noqa: F401  (again: this module may have been imported while DALI was there)
        except ImportError as exn:
            raise DataError(INSTALL_HINT) from exn
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        if self.gpu and not torch.cuda.is_available():
            raise DataError(f"the dali loader was asked for {self.device} but CUDA is not available")
        self.data_path, self.shards = data_path, split_shards(data_path, split)
        keys = check_shards(data_path, split, self.shards)
        self.keys = keys if with_keys else None
        self.batch_size, self.train, self.rank, self.world_size = batch_size, train, rank, world_size
        self.flip = train if flip is None else flip
        self.workers, self.seed, self.crop, self.hw_decoder_load = max(1, workers), seed, crop, hw_decoder_load
        self.epoch = 0
        total = len(keys)
        if not 0 <= rank < world_size <= total:
            raise DataError(f"rank {rank} of {world_size} cannot split the {total} samples of split '{split}'")
        # DALI's shard r holds samples [total*r//world_size, total*(r+1)//world_size) of the epoch order.
        self.start, self.stop = total * rank // world_size, total * (rank + 1) // world_size
        # Training: DROP stops every rank after as many batches as the smallest shard fills (DDP
        # needs equal steps). Evaluation: PARTIAL trims the padding, leaving this shard exactly.
        self.num_samples = total // world_size // batch_size * batch_size if train else self.stop - self.start
        # Two shards' worth, so that batches mix shards, but no more than this rank reads.
        self.initial_fill = min(max(SHUFFLE_BUFFER, 2 * max(s.num_samples for s in self.shards)),
                                self.stop - self.start)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self):
        return epoch_order(self.shards, self.epoch, self.seed, shuffle=self.train)

    def build(self):
        order = self.order()
        device_id = None
        if self.gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipe = face_pipeline(
            [str(s.tar) for s in order], [str(s.idx) for s in order], self.rank, self.world_size, self.train,
            self.initial_fill, self.crop, self.flip, self.gpu, self.hw_decoder_load, self.keys is not None,
            batch_size=self.batch_size, num_threads=self.workers, device_id=device_id,
            # The shuffle buffer's picks and the flips, the same for the same (seed, epoch, rank).
            seed=random.Random(f"{self.seed}-{self.epoch}-{self.rank}").randrange(2**31))
        outputs = ["images", "source"] if self.keys is not None else ["images"]
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        return DALIGenericIterator(pipe, outputs, reader_name=READER, last_batch_policy=policy)

    def __iter__(self):
        if len(self) == 0:  # DALI's iterator would call an empty epoch an error
            return
        try:
            batches = self.build()  # builds the pipeline and runs its first batch
        except RuntimeError as exn:
            raise self.error(exn) from None
        while True:
            try:
                (batch,) = next(batches)
            except StopIteration:
                return
            except RuntimeError as exn:
                raise self.error(exn) from None
            images = batch["images"]
            if len(images) == 0:  # shards are padded to the longest one: a shorter one may end a batch early
                continue
            # NHWC in memory is channels_last NCHW: the permute is a view, not a copy.
            images = images.permute(0, 3, 1, 2)
            if self.keys is None:
                yield images
            else:
                yield images, [self.key(row.numpy().tobytes()) for row in batch["source"]]

    def key(self, source: bytes) -> str:
        # DALI's webdataset source_info is "<tar>:<data offset>:<member name>"; the index maps the first two.
        tar, offset = re.fullmatch(r"(.*):(\d+)(?::[^:]*)?", source.rstrip(b"\0").decode()).groups()
        return self.keys[tar, int(offset)]

    def error(self, exn: RuntimeError) -> Exception:
        """A one-line DataError naming the shard (and sample) behind a DALI failure, where there is one."""
        text = str(exn)
        found = text.split("encountered:", 1)[-1].split("Current pipeline object", 1)[0]
        detail = " ".join(line.strip() for line in found.splitlines() if line.strip() and "C++ context" not in line)
        named = [str(s.tar) for s in self.shards if str(s.tar) in text or str(s.idx) in text]
        if named:
            return DataError(f"shard {', '.join(named)} is unreadable (DALI: {detail}); "
                             f"{rebuild_hint(self.data_path)}")
        # DALI's decoders do not say which sample failed: find it, reading only this rank's epoch.
        if "decoders" in text or "peek_image_shape" in text:
            bad = find_undecodable(take(self.order(), self.start, self.stop))
            if bad:
                return DataError(f"shard {bad[0].tar}: sample {bad[1]} does not decode (DALI: {detail}); "
                                 f"{rebuild_hint(self.data_path)}")
        return exn  # not the data, as far as can be told: DALI's own report is the useful one
