"""Data loaders behind one small face.

    loader = build_loader("torch", "dataset/celeba/shards", "train", batch_size=128, device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images in loader:  # (B, 3, 64, 64) uint8 on the device, channels_last
            x = images.float() / 255

`len(loader)` is the number of batches one epoch yields on this rank and `loader.num_samples` the
number of images. Training splits (`train=True`, the default for "train") shuffle, flip and drop
the final partial batch; evaluation splits keep every sample exactly once, in a fixed order.
pipeline/loader.py writes this face down as the `Loader` protocol.

`torch` and `dali` decode the shards every epoch; `cache` decodes them once with one of them
(`source="torch"` or `"dali"`) into a tensor on the device and serves every epoch from it.
"""

from common.cli import default_workers
from pipeline.cache import cached_loader
from pipeline.geometry import CROPS, IMAGE_SIZE
from pipeline.shards import SPLITS, DataError, split_size
from pipeline.torch_loader import TorchLoader

LOADERS = ("torch", "dali")  # the decoding loaders, train.py's --loader
ALL_LOADERS = (*LOADERS, "cache")
# How to install DALI: the pyproject `dali` extra pins a version known to work, where an unpinned
# nvidia-dali-cuda130 may install a newer one.
DALI_INSTALL = "pip install -e '.[dali]'"


def build_loader(name: str, data_path, split: str, batch_size: int, device, *, train: bool | None = None,
                 rank: int = 0, world_size: int = 1, workers: int = 2, seed: int = 0, crop: str = "center",
                 flip: bool | None = None, with_keys: bool = False, **options):
    """A loader by name; `options` go to that loader (e.g. `gpu_decode` for torch; for cache, `source`, the
    loader that fills it, `progress`, and that loader's options)."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, not {crop!r}")
    common = dict(train=split == "train" if train is None else train, rank=rank, world_size=world_size,
                  workers=workers, seed=seed, crop=crop, flip=flip, with_keys=with_keys, **options)
    if name == "torch":
        return TorchLoader(data_path, split, batch_size, device, **common)
    if name == "dali":
        from pipeline.dali_loader import DaliLoader  # here: DALI is optional and heavy, loaded only when asked for
        return DaliLoader(data_path, split, batch_size, device, **common)
    if name == "cache":
        return cached_loader(data_path, split, batch_size, device, fill_with=build_loader, **common)
    raise ValueError(f"unknown loader {name!r}; choose one of {ALL_LOADERS}")


__all__ = ["build_loader", "default_workers", "LOADERS", "ALL_LOADERS", "DALI_INSTALL", "SPLITS", "CROPS", "IMAGE_SIZE", "DataError",
           "split_size"]
