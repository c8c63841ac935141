"""The torch loader: geometry and decoding. Epochs, rank splits and flips: tests/test_loader_contract.py."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import build_loader
from pipeline.geometry import crop_box
from pipeline.torch_loader import decode_plan, decode_resized

BATCH = 16


def test_center_crop_is_celeba_protocol():
    assert crop_box(178, 218) == (15, 35, 163, 183)
    assert crop_box(178, 218, "none") == (0, 0, 178, 218)


# Mean absolute difference from PIL's full decode + BILINEAR resize, in 0..255 units, measured on the
# synthetic faces: centre crop (decoded whole) 0.03, at most 0.07; whole frame (decoded at half size by
# the DCT) 0.57, at most 0.70. The bounds sit a little above; a window one pixel off gives 3 or more.
FULL_DECODE_BOUND = {"center": 0.1, "none": 0.8}


@pytest.mark.parametrize("crop", ["center", "none"])
def test_decode_matches_a_full_decode_and_pil_resize(faces_dir, crop):
    """The workers' decode (DCT-scaled where exact) and batched resize against the plain PIL way."""
    diffs = []
    for path in sorted(faces_dir.glob("*.jpg"))[:20]:
        data = path.read_bytes()
        fast = decode_resized(data, crop).astype(np.float64)
        full = Image.open(io.BytesIO(data)).convert("RGB")
        reference = np.asarray(full.resize((64, 64), Image.BILINEAR, box=crop_box(*full.size, crop)), np.float64)
        assert fast.shape == (64, 64, 3)
        diffs.append(np.abs(fast - reference).mean())
    assert np.mean(diffs) < FULL_DECODE_BOUND[crop]
    if crop == "center":
        shifted = np.asarray(full.resize((64, 64), Image.BILINEAR, box=np.add(crop_box(*full.size), 1)), np.float64)
        assert np.abs(fast - shifted).mean() > 10 * FULL_DECODE_BOUND[crop], "the bound must tell a shifted window"


def test_decode_scale_is_the_smallest_that_keeps_the_crop_on_whole_pixels():
    assert decode_plan(178, 218, "none") == (89, 109, (0, 0, 89, 109))  # half size: the seed's squash
    assert decode_plan(178, 218, "center") == (178, 218, (15, 35, 163, 183))  # odd offsets: whole
    assert decode_plan(356, 356, "center") == (178, 178, (15, 15, 163, 163))  # even offsets: half size
    assert decode_plan(1024, 512, "none") == (128, 64, (0, 0, 128, 64))  # 1/8, still 64 px


@pytest.mark.parametrize("size", [(161, 219), (177, 217), (63, 65)])
@pytest.mark.parametrize("crop", ["center", "none"])
def test_odd_sized_frames_decode(faces_dir, size, crop):
    """Odd sides have no exact smaller DCT scale; the crop must still fit and match."""
    face = Image.open(sorted(faces_dir.glob("*.jpg"))[0]).convert("RGB").resize(size)
    data = io.BytesIO()
    face.save(data, "JPEG", quality=90)
    fast = decode_resized(data.getvalue(), crop).astype(np.float64)
    full = Image.open(data).convert("RGB")
    reference = np.asarray(full.resize((64, 64), Image.BILINEAR, box=crop_box(*size, crop)), np.float64)
    assert fast.shape == (64, 64, 3)
    # Decoded whole, like the centre crop; upscaling the 63x65 frame, torch's and PIL's kernels differ
    # a little more (measured 0.13).
    assert np.abs(fast - reference).mean() < 0.2


# The GPU decode path against the workers' output, mean absolute difference in 0..255 units measured on
# the synthetic faces: centre crop 0.13 (both decode whole with libjpeg-turbo; the float32 resize rounds
# to within one level of the uint8 kernel's fixed point), whole frame 0.54 (the workers decode at half
# size). CUDA adds nvJPEG's chroma upsampling: tests/test_cuda.py has its bound.
DEVICE_PATH_BOUND = {"center": 0.2, "none": 0.8}


def decode_ops(fn, *args):
    """(aten op, input dtypes) of every op `fn` runs: what CUDA would be asked to dispatch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
            self.ops.append((func.overloadpacket.__name__, dtypes))
            return func(*args, **(kwargs or {}))

    with Record() as record:
        out = fn(*args)
    return out, record.ops


@pytest.mark.parametrize("crop", ["center", "none"])
def test_the_gpu_decode_path_run_on_the_cpu_matches_the_workers(faces_dir, crop):
    """gpu_decode is nvJPEG's path on CUDA; the same TorchCodec call decodes with libjpeg-turbo on the CPU,
    so the cropping, the float32 resize, the rounding and the flips that CUDA runs run here, dtype for dtype."""
    from pipeline.torch_loader import ShardStream, gpu_decode, jpeg_decoder
    assert jpeg_decoder(torch.device("cpu"))[0] == "torchcodec"
    jpegs = [p.read_bytes() for p in sorted(faces_dir.glob("*.jpg"))[:12]]
    flips = [i % 3 == 0 for i in range(len(jpegs))]
    packed = ShardStream.pack_bytes([{"jpg": j} for j in jpegs], flips)
    images, ops = decode_ops(gpu_decode, packed["data"], packed["lengths"], packed["flips"], crop, "cpu")
    assert images.shape == (12, 3, 64, 64) and images.dtype == torch.uint8
    # CUDA's antialiased bilinear kernel takes floating types only: the resize must see float32.
    resizes = [dtypes for op, dtypes in ops if op == "_upsample_bilinear2d_aa"]
    assert resizes == [(torch.float32,)], ops
    diffs, mirrored = [], []
    for image, jpeg, flip in zip(images, jpegs, flips):
        reference = torch.from_numpy(decode_resized(jpeg, crop)).permute(2, 0, 1)
        reference = reference.flip(-1) if flip else reference
        diffs.append((image.float() - reference.float()).abs().mean().item())
        mirrored.append((image.float() - reference.flip(-1).float()).abs().mean().item())
    assert np.mean(diffs) < DEVICE_PATH_BOUND[crop]
    assert np.mean(mirrored) > 5 * DEVICE_PATH_BOUND[crop], "the bound must tell a flip from none"


def test_the_loader_with_device_decode_gives_the_workers_images(shards):
    """The whole TorchLoader with its device path (bytes from the workers, decode in the main process) on
    the CPU: the same keys, batches uint8 and channels_last, pixels within the bound of the workers'."""
    def by_key(**options):
        loader = build_loader("torch", shards, "val", BATCH, "cpu", workers=1, with_keys=True, **options)
        return {k: im for images, keys in loader for k, im in zip(keys, images)}, loader
    device, loader = by_key(gpu_decode=True)
    workers, _ = by_key()
    assert loader.gpu_decode and device.keys() == workers.keys()
    images, _ = next(iter(loader))
    assert images.dtype == torch.uint8 and images.is_contiguous(memory_format=torch.channels_last)
    diffs = [(device[k].float() - workers[k].float()).abs().mean().item() for k in device]
    assert np.mean(diffs) < DEVICE_PATH_BOUND["center"]


def test_the_decoders_are_tried_in_order_and_none_is_one_line(monkeypatch):
    from pipeline import DataError
    from pipeline import torch_loader

    def missing(jpegs, device):
        raise ImportError("No module named 'torchcodec'")

    def cpu_only(jpegs, device):
        raise RuntimeError("decode_jpeg: torchcodec was not compiled with nvJPEG support\nRebuild it")

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch_loader, "JPEG_DECODERS",
                        {"torchcodec": missing, "torchvision": torch_loader._torchvision_decode})
    torch_loader.jpeg_decoder.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29 says so on each call
            assert torch_loader.jpeg_decoder(cpu)[0] == "torchvision"
        torch_loader.jpeg_decoder.cache_clear()
        monkeypatch.setattr(torch_loader, "JPEG_DECODERS", {"torchcodec": missing, "torchvision": cpu_only})
        with pytest.raises(DataError) as error:
            torch_loader.jpeg_decoder(cpu)
    finally:
        torch_loader.jpeg_decoder.cache_clear()
    message = str(error.value)
    assert "\n" not in message and "No module named 'torchcodec'" in message and "nvJPEG support" in message
    assert "pip install 'torchcodec>=0.16'" in message


@pytest.mark.parametrize("train", [True, False])
def test_the_batch_sequence_does_not_depend_on_the_worker_count(small_shards, train):
    """Batch i is made by worker i mod W and yielded i-th: the epoch is the same for 0, 1, 2 or 3 workers,
    so a streaming run resumed with another -j reads what the uninterrupted run would have."""
    split = "train" if train else "val"
    epochs = {}
    for workers in (0, 1, 2, 3):
        loader = build_loader("torch", small_shards, split, BATCH, "cpu", train=train, workers=workers,
                              with_keys=True, seed=5)
        epochs[workers] = []
        for number in (0, 1):
            loader.set_epoch(number)
            epochs[workers].append([(keys, images) for images, keys in loader])
    reference = epochs[0]
    assert len(reference[0]) > 1
    assert [keys for keys, _ in reference[0]] != [keys for keys, _ in reference[1]] or not train
    for workers, batches in epochs.items():
        for got, want in zip(batches, reference):
            assert [keys for keys, _ in got] == [keys for keys, _ in want], f"{workers} workers: other batches"
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want)), f"{workers} workers: other flips"
