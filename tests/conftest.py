"""Shared fixtures: a small synthetic face set and its shards, made once per test session."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prep import shard  # noqa: E402
from prep.synthetic import write_synthetic  # noqa: E402

NUM_FACES = 240
SHARD_SIZE = 40


@pytest.fixture(scope="session")
def faces_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("celeba") / "img_align_celeba"
    write_synthetic(folder, NUM_FACES, seed=0, workers=2, progress=False)
    return folder


@pytest.fixture(scope="session")
def shards(faces_dir) -> Path:
    """Shards of `faces_dir` split by key hash: about 193 train, 23 val, 24 test samples."""
    out = faces_dir.parent / "shards"
    assert shard.main(["--data-path", str(faces_dir), "--output-dir", str(out),
                       "--shard-size", str(SHARD_SIZE), "--workers", "2", "--quiet"]) == 0
    return out
