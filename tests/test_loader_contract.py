"""The face every loader shows (pipeline/loader.py), tested once for each name in pipeline.ALL_LOADERS.

Exact epochs on every rank, fixed evaluation order, flips that are mirrors and repeat, the batch
format. `workers` is the torch loader's processes, DALI's threads, and the cache's filling loader's.
"""

from collections import Counter

import pytest
import torch

from pipeline import ALL_LOADERS, build_loader
from pipeline.loader import Loader
from conftest import split_keys

BATCH = 16


def ranks(name, shards, split, batch, world_size=1, **options):
    return [build_loader(name, shards, split, batch, "cpu", rank=r, world_size=world_size, with_keys=True, **options)
            for r in range(world_size)]


def epoch(loader, number, batch):
    """(keys in order, batches) of one epoch, checking the batch format on the way."""
    loader.set_epoch(number)
    batches = list(loader)
    assert len(batches) == len(loader)
    for images, keys in batches:
        assert images.dtype == torch.uint8 and images.device.type == "cpu"
        assert images.shape == (len(keys), 3, 64, 64) and 0 < len(keys) <= batch
        assert images.is_contiguous(memory_format=torch.channels_last)
    keys = [k for _, ks in batches for k in ks]
    assert loader.num_samples == len(keys)
    return keys, batches


def by_key(loader):
    return {k: image for images, keys in loader for k, image in zip(keys, images)}


@pytest.mark.parametrize("name", ALL_LOADERS)
@pytest.mark.parametrize("layout, world_size, batch, workers", [
    ("shards", 1, BATCH, 0),
    ("small_shards", 1, BATCH, 3),  # many 7-sample shards, split across workers mid-shard
    ("small_shards", 2, BATCH, 2),
    ("one_shard", 2, BATCH, 1),  # only the seed can reorder a single shard
    ("small_shards", 3, 13, 1),  # 194 faces: 64 per rank, 4 batches of 13 on each
])
def test_training_epochs_are_exact_on_every_rank(name, layout, world_size, batch, workers, request):
    shards = request.getfixturevalue(layout)
    everything = set(split_keys(shards, "train"))
    loaders = ranks(name, shards, "train", batch, world_size, workers=workers)
    assert all(isinstance(loader, Loader) for loader in loaders)
    assert len({len(loader) for loader in loaders}) == 1 and len(loaders[0]) > 0, "DDP needs equal steps on every rank"
    assert loaders[0].num_samples == len(everything) // world_size // batch * batch
    orders = []
    for number in range(3):
        per_rank = []
        for loader in loaders:
            keys, batches = epoch(loader, number, batch)
            assert all(len(images) == batch for images, _ in batches), "the partial batch is dropped"
            per_rank.append(keys)
        seen = [k for keys in per_rank for k in keys]
        assert len(seen) == len(set(seen)) and set(seen) <= everything, "no sample twice in an epoch"
        # What rests out: the remainder of splitting into ranks, then each rank's partial batch.
        assert len(everything - set(seen)) == len(everything) - world_size * loaders[0].num_samples
        orders.append(per_rank[0])
    assert orders[0] != orders[1] != orders[2], "training order should change between epochs"
    assert epoch(loaders[0], 1, batch)[0] == orders[1], "the same seed and epoch give the same order"


@pytest.mark.parametrize("name", ALL_LOADERS)
@pytest.mark.parametrize("layout, split, world_size, batch, workers", [
    ("small_shards", "val", 1, BATCH, 2),
    ("small_shards", "val", 2, BATCH, 0),
    ("shards", "test", 3, 7, 1),
    # Training faces read as evaluation: 194 over 3 ranks is 64, 65, 65, and DALI pads every rank's share
    # to 65, so it gives rank 0 an empty ninth batch that the loader must skip and not count.
    ("shards", "train", 3, 8, 1),
])
def test_evaluation_epochs_keep_every_sample_once_in_a_fixed_order(name, layout, split, world_size, batch, workers,
                                                                    request):
    shards = request.getfixturevalue(layout)
    loaders = ranks(name, shards, split, batch, world_size, train=False, workers=workers)
    next(iter(loaders[0]))  # abandoned halfway, as train.py does for its preview batch
    first = None
    for number in range(3):
        per_rank = [epoch(loader, number, batch)[0] for loader in loaders]
        assert Counter(k for keys in per_rank for k in keys) == Counter(split_keys(shards, split))
        assert first is None or per_rank == first, "evaluation order is fixed"
        first = per_rank


@pytest.mark.flag_effect("train.py", "--flip")
@pytest.mark.parametrize("name", ALL_LOADERS)
def test_training_flips_are_mirrors_and_repeatable(name, shards):
    plain = by_key(build_loader(name, shards, "train", BATCH, "cpu", train=False, with_keys=True, workers=1))
    train = build_loader(name, shards, "train", BATCH, "cpu", with_keys=True, workers=1)
    first, second = by_key(train), by_key(train)
    mirrored = 0
    for key, image in first.items():
        assert torch.equal(image, second[key]), "same seed and epoch: same flips"
        if torch.equal(image, plain[key].flip(-1)):
            mirrored += 1
        else:
            assert torch.equal(image, plain[key])
    assert 0.25 < mirrored / len(first) < 0.75
    assert all(image.float().std() > 10 for image in first.values()), "real pictures, not a constant fill"


@pytest.mark.flag_effect("train.py", "--flip")
@pytest.mark.parametrize("name", ALL_LOADERS)
def test_training_without_flips_gives_the_images_as_they_are(name, shards):
    plain = by_key(build_loader(name, shards, "train", BATCH, "cpu", train=False, with_keys=True, workers=1))
    assert all(not torch.equal(image, image.flip(-1)) for image in plain.values()), "a flip would not show"
    train = build_loader(name, shards, "train", BATCH, "cpu", flip=False, with_keys=True, workers=1)
    for number in range(2):
        train.set_epoch(number)
        seen = by_key(train)
        assert len(seen) == train.num_samples > 0
        assert all(torch.equal(image, plain[key]) for key, image in seen.items()), "flip=False: no image mirrored"


@pytest.mark.parametrize("name", ALL_LOADERS)
def test_a_split_too_small_for_one_training_batch_yields_nothing(name, shards):
    loader = build_loader(name, shards, "val", 1000, "cpu", train=True, workers=1)
    assert len(loader) == loader.num_samples == 0 and list(loader) == []
