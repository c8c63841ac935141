"""Data loaders behind one small face.

    loader = build_loader("torch", "dataset/celeba/shards", "train", batch_size=128, device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images in loader:  # (B, 3, 64, 64) uint8 on the device, channels_last
            x = images.float() / 255

`len(loader)` is the number of batches one epoch yields on this rank and `loader.num_samples` the
number of images. Training splits (`train=True`, the default for "train") shuffle, flip and drop
the final partial batch; evaluation splits keep every sample exactly once, in a fixed order.
"""

import os

from pipeline.geometry import CROPS, IMAGE_SIZE
from pipeline.shards import SPLITS, DataError

LOADERS = ("torch", "dali")


def default_workers() -> int:
    """Loader processes (torch) or threads (dali) when the user gives none: min(8, CPU cores - 1), at least 1."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def build_loader(name: str, data_path, split: str, batch_size: int, device, *, train: bool | None = None,
                 rank: int = 0, world_size: int = 1, workers: int = 2, seed: int = 0, crop: str = "center",
                 flip: bool | None = None, with_keys: bool = False, **options):
    """A loader by name; `options` go to that loader (e.g. `gpu_decode` for torch)."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, not {crop!r}")
    common = dict(train=split == "train" if train is None else train, rank=rank, world_size=world_size,
                  workers=workers, seed=seed, crop=crop, flip=flip, with_keys=with_keys, **options)
    if name == "torch":
        from pipeline.torch_loader import TorchLoader
        return TorchLoader(data_path, split, batch_size, device, **common)
    if name == "dali":
        from pipeline.dali_loader import DaliLoader
        return DaliLoader(data_path, split, batch_size, device, **common)
    raise ValueError(f"unknown loader {name!r}; choose one of {LOADERS}")


__all__ = ["build_loader", "default_workers", "LOADERS", "SPLITS", "CROPS", "IMAGE_SIZE", "DataError"]
