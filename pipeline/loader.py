"""The face every loader shows to train.py and the benchmark, written down once.

tests/test_loader_contract.py checks it for every name in `pipeline.ALL_LOADERS`: a new loader gets
exact epochs, rank splits, flips and the batch format tested by being added there.
"""

from typing import Iterator, Protocol, runtime_checkable

import torch

Batch = torch.Tensor | tuple[torch.Tensor, list[str]]


@runtime_checkable
class Loader(Protocol):
    """One rank's view of a split.

    Iterating yields (B, 3, 64, 64) uint8 batches on the training device, channels_last in memory;
    built with `with_keys=True` it yields `(images, keys)`, the key of each image in order.
    Training (`train=True`): every rank gets the same number of full batches, ranks are disjoint, the
    final partial batch is dropped, the order and flips depend on (seed, epoch) only. Evaluation:
    every sample exactly once over the ranks, in a fixed order, the last batch possibly short.
    """

    num_samples: int  # images one epoch yields on this rank

    def __len__(self) -> int:
        """Batches one epoch yields on this rank."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads; training order and flips follow from it and the seed."""
        ...

    def __iter__(self) -> Iterator[Batch]:
        ...
