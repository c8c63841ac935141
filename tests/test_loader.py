"""The torch loader: geometry and decoding. Epochs, rank splits and flips: tests/test_loader_contract.py."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.geometry import crop_box
from pipeline.torch_loader import decode_plan, decode_resized


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


@pytest.mark.parametrize("crop, bound", [("center", 0.1), ("none", 0.8)])
def test_the_gpu_decode_path_run_on_the_cpu_matches_the_workers(faces_dir, crop, bound):
    """gpu_decode is nvJPEG's path on CUDA; torchvision decodes the same way on the CPU, so its cropping,
    resizing and flipping run here. Bounds as for the full decode above (same kernels, same decoder)."""
    from pipeline.torch_loader import ShardStream, gpu_decode
    jpegs = [p.read_bytes() for p in sorted(faces_dir.glob("*.jpg"))[:12]]
    flips = [i % 3 == 0 for i in range(len(jpegs))]
    packed = ShardStream.pack_bytes([{"jpg": j} for j in jpegs], flips)
    images = gpu_decode(packed["data"], packed["lengths"], packed["flips"], crop, "cpu")
    assert images.shape == (12, 3, 64, 64) and images.dtype == torch.uint8
    for image, jpeg, flip in zip(images, jpegs, flips):
        reference = torch.from_numpy(decode_resized(jpeg, crop)).permute(2, 0, 1)
        assert (image.float() - (reference.flip(-1) if flip else reference).float()).abs().mean() < bound
