"""Shared fixtures: a small synthetic face set, its shards, and finished training runs, made once per session.

The suite's budget is five minutes on two cores (docs/tests.md), and a training run is what costs: each
train.py run pays its start-up, its epochs and the end-of-training quality work (GMM, SWD, attributes).
To add a test that needs a trained run, in this order of preference:

1. Read a run that exists: `trained` (3 epochs, streamed, batch 32, seed 0) is the uninterrupted reference
   for the tests of train.py and generate.py; tests/test_train.py's `cached_run` is the same with the
   resident cache. A test that must change the folder copies it first (shutil.copytree).
2. Stop train.main() where the flag has been used instead of training (tests/test_flag_effects.py's
   `main_until`), or build the loaders or the step alone.
3. Train only what the assertion needs, on `tiny` (48 faces, a few steps per epoch), in process
   (`train.main(train.parse_args([...]))` or `train.run([...])`), with `--workers 1 --no-compile`, one or two
   epochs; compare a resumed run with an existing uninterrupted one rather than training a second.
4. A subprocess or torchrun launch only for what needs a process of its own (signals, exit codes, ranks);
   several tests that read one launch share it through a module- or session-scoped fixture
   (tests/test_distributed.py's `probed_runs`).

A fixture that more than one test file reads belongs here; one that one file reads belongs in that file,
scoped to the module. pytest prints the 15 slowest tests at the end of every run.
"""

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # before torch loads: two workers on two cores, one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and in every process a test starts (docs/tests.md)

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prep import shard  # noqa: E402
from prep.synthetic import write_synthetic  # noqa: E402

NUM_FACES = 240


def pytest_configure(config):
    config.addinivalue_line("markers", "flag_effect(script, flag): the test shows the effect of that flag of that "
                            "script (train.py, prep/shard.py, generate.py)")


# The files that take longest, longest first (benchmarks/RESULTS.md). pytest-xdist's --dist loadfile hands
# whole files to the workers in collection order: starting these first keeps a long one from starting last
# and running alone while the other worker waits.
LONGEST_FILES = ("test_distributed.py", "test_train.py", "test_faults.py", "test_benchmark.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(LONGEST_FILES)))  # stable: each file keeps its order


SHARD_SIZE = 40


@pytest.fixture(scope="session")
def faces_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("celeba") / "img_align_celeba"
    write_synthetic(folder, NUM_FACES, seed=0, workers=2, progress=False)
    return folder


@pytest.fixture(scope="session")
def shards(faces_dir) -> Path:
    """Shards of `faces_dir` split by key hash: about 193 train, 23 val, 24 test samples."""
    return make_shards(faces_dir, faces_dir.parent / "shards", SHARD_SIZE)


def make_shards(faces_dir: Path, out: Path, shard_size: int) -> Path:
    assert shard.main(["--data-path", str(faces_dir), "--output-dir", str(out), "--shard-size", str(shard_size),
                       "--workers", "2", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def small_shards(faces_dir, tmp_path_factory) -> Path:
    """The same faces in 7-sample shards: many shards, split across workers and ranks mid-shard."""
    return make_shards(faces_dir, tmp_path_factory.mktemp("shards7"), 7)


@pytest.fixture(scope="session")
def one_shard(faces_dir, tmp_path_factory) -> Path:
    """Every split in a single shard."""
    return make_shards(faces_dir, tmp_path_factory.mktemp("shards1"), 1000)


@pytest.fixture(scope="module")
def tiny(faces_dir, tmp_path_factory) -> Path:
    """48 faces in shards of 16, split by key hash (an epoch is a few steps of 8); one copy per test module,
    which may change it."""
    data = tmp_path_factory.mktemp("tiny") / "img_align_celeba"
    data.mkdir()
    for f in sorted(faces_dir.glob("*.jpg"))[:48]:
        shutil.copy2(f, data / f.name)
    return make_shards(data, data.parent / "shards", 16)


@contextmanager
def no_host_sync():
    """Inside (CUDA tests): any synchronising CUDA call torch makes (.item(), a blocking copy) raises."""
    import torch

    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def split_keys(shards: Path, split: str) -> list[str]:
    """The keys of a split, in stored order, read from the `.idx` files."""
    manifest = json.loads((shards / "manifest.json").read_text())
    return [line.split()[3].split(".")[0] for entry in manifest["splits"][split]["shards"]
            for line in (shards / entry["idx"]).read_text().splitlines()[1:]]


@pytest.fixture(scope="session")
def trained(shards, tmp_path_factory) -> Path:
    """The output folder of a 3-epoch train.py run on `shards` (batch 32, one worker, streamed from the
    torch loader): the tests of train.py and generate.py read the same run."""
    import train

    out = tmp_path_factory.mktemp("run")
    assert train.main(train.parse_args(["--data-path", str(shards), "--output-dir", str(out), "--batch-size", "32",
                                        "--workers", "1", "--epochs", "3", "--cache", "off",
                                        "--no-compile"])) == 0
    return out


def copy_shards(shards: Path, dest: Path) -> Path:
    """A copy of a shard folder that a test may damage or write beside, without the decoded files
    (decoded-*.u8) that earlier tests' cached runs left there: a run on the copy decodes its shards."""
    shutil.copytree(shards, dest, ignore=shutil.ignore_patterns("decoded-*"))
    return dest
