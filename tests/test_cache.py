"""The cache: its pixels are the filling loader's, its order and flips come from (seed, epoch), two
processes fill it by exchanging shares, and the choice of caching says why.

Epochs, rank splits, flips and the batch format: tests/test_loader_contract.py, as for every loader.
"""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import DataError, build_loader, cache
from pipeline.cache import CachedLoader, mirror, plan
from pipeline.shards import rank_samples
from prep import shard
from conftest import split_keys, copy_shards

BATCH = 16


def by_key(loader):
    return {k: image for images, keys in loader for k, image in zip(keys, images)}


@pytest.mark.parametrize("crop", ["center", "none"])
@pytest.mark.parametrize("source", ["torch", "dali"])
def test_cached_pixels_are_the_filling_loaders_own(shards, source, crop):
    cached = build_loader("cache", shards, "val", BATCH, "cpu", source=source, crop=crop, with_keys=True)
    own = by_key(build_loader(source, shards, "val", BATCH, "cpu", crop=crop, with_keys=True, workers=1))
    assert cached.cache.keys == split_keys(shards, "val"), "rows in stored order"
    assert cached.cache.images.shape == (len(own), 64, 64, 3) and cached.cache.images.dtype == torch.uint8
    for row, key in enumerate(cached.cache.keys):
        assert torch.equal(cached.cache.images[row], own[key].permute(1, 2, 0))
    served = by_key(cached)
    assert served.keys() == own.keys() and all(torch.equal(served[k], own[k]) for k in own)


def test_what_the_cache_holds_does_not_depend_on_how_it_was_filled(small_shards):
    one = build_loader("cache", small_shards, "train", BATCH, "cpu", workers=0).cache
    three = build_loader("cache", small_shards, "train", 7, "cpu", workers=3,
                         fill_batch_size=7).cache  # batches out of order
    assert one.keys == three.keys == split_keys(small_shards, "train")
    assert torch.equal(one.images, three.images)


def test_ranks_read_runs_of_one_permutation_and_its_flips(shards):
    filled = build_loader("cache", shards, "train", BATCH, "cpu", workers=0).cache
    whole = CachedLoader(filled, 1, train=True)  # batch 1: this rank's run is the whole permutation
    order, flips = whole.plan()
    assert sorted(order.tolist()) == list(range(len(filled)))
    assert 0.25 < flips.float().mean() < 0.75
    for world_size in (2, 3):
        for rank in range(world_size):
            loader = CachedLoader(filled, BATCH, train=True, rank=rank, world_size=world_size)
            rows, rank_flips = loader.plan()
            start = rank_samples(len(filled), rank, world_size, train=True)[0]
            assert torch.equal(rows, order[start:start + loader.num_samples])
            assert torch.equal(rank_flips, flips[start:start + loader.num_samples])
    other_seed = CachedLoader(filled, 1, train=True, seed=1).plan()
    assert not torch.equal(other_seed[0], order) and not torch.equal(other_seed[1], flips)
    whole.set_epoch(1)
    assert not torch.equal(whole.plan()[0], order)


def test_mirror_flips_exactly_the_chosen_images():
    images = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    flips = torch.tensor([True, False, False, True, True, False])
    out = mirror(images, flips)
    for image, flipped, result in zip(images, flips, out):
        assert torch.equal(result, image.flip(1) if flipped else image)  # (H, W, C): W is dim 1
    assert not torch.equal(images[0], images[0].flip(1)), "a mirror must be told from the original"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the same ops run on the CPU above)")
def test_on_cuda_the_same_ops_give_the_same_batches_without_a_host_sync(shards):
    filled = build_loader("cache", shards, "train", BATCH, "cpu", workers=0).cache
    on_gpu = cache.Cache(filled.images.cuda(), filled.keys, filled.decoded, filled.seconds)
    cpu, gpu = CachedLoader(filled, BATCH, train=True), CachedLoader(on_gpu, BATCH, train=True)
    batches = iter(gpu)
    first = next(batches)  # the epoch's permutation goes to the GPU here, once
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call from here on raises
    try:
        rest = list(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(b.is_cuda and b.is_contiguous(memory_format=torch.channels_last) for b in [first, *rest])
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, [first, *rest], strict=True))


def test_a_missing_index_is_named(shards, tmp_path):
    copy = copy_shards(shards, tmp_path / "shards")
    (copy / "val-000000.idx").unlink()
    with pytest.raises(DataError, match=r"index .*val-000000\.idx of shard .*val-000000\.tar is unreadable"):
        build_loader("cache", copy, "val", BATCH, "cpu")


# ----------------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def odd_shards(faces_dir, tmp_path_factory):
    """The first 40 faces: 35 training images, so two ranks' shares differ by one."""
    folder = tmp_path_factory.mktemp("odd") / "img"
    folder.mkdir()
    for face in sorted(faces_dir.glob("*.jpg"))[:40]:
        (folder / face.name).symlink_to(face)
    assert shard.main(["--data-path", str(folder), "--output-dir", str(folder.parent / "shards"), "--shard-size",
                       "7", "--workers", "1", "--quiet"]) == 0
    shards = folder.parent / "shards"
    assert len(split_keys(shards, "train")) % 2 == 1
    return shards


def fill_in_a_process_group(rank, world_size, store, shards, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        sizes = {"train": 35, "val": 2}
        chosen, _ = plan("auto", sizes, "cpu", epochs_left=5)  # agrees on a budget through all_reduce
        loader = build_loader("cache", shards, "train", 4, "cpu", rank=rank, world_size=world_size, workers=0,
                              with_keys=True)
        keys = [k for _, ks in loader for k in ks]
        torch.save({"images": loader.cache.images, "keys": loader.cache.keys, "decoded": loader.cache.decoded,
                    "epoch": keys, "chosen": chosen}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_fill_by_exchanging_their_shares(odd_shards, tmp_path):
    mp.spawn(fill_in_a_process_group, args=(2, tmp_path / "store", odd_shards, tmp_path), nprocs=2)
    alone = build_loader("cache", odd_shards, "train", 4, "cpu", workers=0).cache
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert rank["keys"] == alone.keys and torch.equal(rank["images"], alone.images)
        assert rank["chosen"] == ["train", "val"]
    # Each decoded only its share: 17 and 18 of the 35.
    shares = [rank_samples(35, r, 2, train=False) for r in (0, 1)]
    assert [rank["decoded"] for rank in ranks] == [hi - lo for lo, hi in shares] == [17, 18]
    assert not set(ranks[0]["epoch"]) & set(ranks[1]["epoch"]) and len(ranks[0]["epoch"]) == len(ranks[1]["epoch"])


# ----------------------------------------------------------------------------- whether to cache

GB = 10**9
CELEBA = {"train": 162_770, "val": 19_867}  # 2.00 GB and 244.1 MB


@pytest.fixture
def budget(monkeypatch):
    """Sets the bytes the cache may take."""
    def set_budget(n):
        monkeypatch.setattr(cache, "memory_budget", lambda device: (n, "a test's budget"))
    return set_budget


def test_auto_caches_both_splits_when_they_fit(budget):
    budget(3 * GB)
    chosen, line = plan("auto", CELEBA, "cpu", epochs_left=40)
    assert chosen == ["train", "val"]
    assert line.startswith("cache on (40 epochs to run): train 2.00 GB + val 244.1 MB in RAM, where the cache may "
                           "take 3.00 GB (a test's budget)")


def test_auto_keeps_val_streaming_when_only_train_fits(budget):
    budget(2.1 * GB)
    chosen, line = plan("auto", CELEBA, "cpu", epochs_left=40)
    assert chosen == ["train"] and line.endswith("val streams, as it does not fit as well")


def test_auto_streams_and_says_why(budget):
    budget(1 * GB)
    assert plan("auto", CELEBA, "cpu", epochs_left=40) == (
        [], "cache off: the train split needs 2.00 GB, more than the cache may take 1.00 GB (a test's budget); "
            "the torch loader decodes every epoch")
    budget(3 * GB)
    chosen, line = plan("auto", CELEBA, "cpu", epochs_left=1, loader="dali")
    assert chosen == [] and line.startswith("cache off: 1 epoch to run") and "the dali loader decodes" in line
    assert plan("off", CELEBA, "cpu", epochs_left=40)[0] == []


def test_on_that_does_not_fit_names_the_sizes(budget):
    budget(1 * GB)
    with pytest.raises(DataError, match=r"^--cache on: the train split needs 2\.00 GB, more than the cache may take "
                                        r"1\.00 GB \(a test's budget\); use --cache auto or off"):
        plan("on", CELEBA, "cpu", epochs_left=40)
    budget(3 * GB)
    assert plan("on", CELEBA, "cpu", epochs_left=1)[0] == ["train", "val"], "on means on, even for one epoch"


def test_a_resumed_run_keeps_its_choice(budget):
    budget(3 * GB)
    chosen, line = plan("auto", CELEBA, "cpu", epochs_left=1, resumed="on")
    assert chosen == ["train", "val"] and "the run being resumed used it" in line
    chosen, line = plan("auto", CELEBA, "cpu", epochs_left=39, resumed="off")
    assert chosen == [] and "the run being resumed streamed" in line
    budget(1 * GB)
    chosen, line = plan("auto", CELEBA, "cpu", epochs_left=39, resumed="on")
    assert chosen == [] and "data order differs from an uninterrupted run's" in line


def test_the_cpu_budget_is_a_share_of_available_ram(monkeypatch):
    monkeypatch.setattr(cache, "available_ram", lambda: 8 * GB)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cache.memory_budget("cpu") == (int(8 * GB * cache.MEMORY_FRACTION),
                                          f"{cache.MEMORY_FRACTION:.0%} of the 8.00 GB of available RAM")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of one torchrun hold a copy each
    assert cache.memory_budget("cpu")[0] == int(8 * GB * cache.MEMORY_FRACTION / 2)
    monkeypatch.undo()
    assert cache.available_ram() > 0
