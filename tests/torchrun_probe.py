"""train.py under torchrun, recording what each rank does, for tests/test_distributed.py.

    torchrun ... tests/torchrun_probe.py PROBE_DIR [train.py flags]

Runs `train.run(flags)`, as `python train.py flags` does, with three of train's functions wrapped;
what they compute is unchanged:
- build_loaders: the loaders are asked for keys as well. Each whole pass over one is appended to
  PROBE_DIR/keys-rank{R}.jsonl as {"split", "epoch", "batches": [[key, ...], ...]}, and the
  training loop gets the images alone, as before.
- evaluate, which every rank calls after each epoch: the rank's weights and the state of its random
  generator (evaluation samples z) go to PROBE_DIR/rank{R}-epoch{E}.pt as {"model", "rng"}.
- run.checkpoint.write_checkpoint, which rank 0's checkpoint thread calls: each epoch's checkpoint
  is also copied to PROBE_DIR/checkpoint-epoch{E}.pt, so that a later run can resume from any epoch.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from run import checkpoint  # noqa: E402


class KeyRecorder:
    """A loader that logs the keys of each whole pass and yields what train.py expects: images only."""

    def __init__(self, loader, split: str, log: Path):
        self.loader, self.split, self.log, self.epoch = loader, split, log, None

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # num_samples and anything else the loader offers
        return getattr(self.loader, name)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __iter__(self):
        batches = []
        for images, keys in self.loader:
            batches.append(list(keys))
            yield images
        with open(self.log, "a") as f:  # reached only when the pass was not abandoned (the preview batch)
            f.write(json.dumps({"split": self.split, "epoch": self.epoch, "batches": batches}) + "\n")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def install(probe: Path) -> None:
    probe.mkdir(parents=True, exist_ok=True)
    real_build_loaders, real_evaluate, real_write = train.build_loaders, train.evaluate, checkpoint.write_checkpoint
    evaluations = []

    def build_loaders(args, device, rank, world_size, *more, **options):
        loaders = real_build_loaders(args, device, rank, world_size, *more, **options, with_keys=True)
        return tuple(KeyRecorder(loader, split, probe / f"keys-rank{rank}.jsonl")
                     for loader, split in zip(loaders, ("train", "val")))

    def evaluate(model, *args, **kwargs):
        state = {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                 "rng": torch.get_rng_state()}
        result = real_evaluate(model, *args, **kwargs)
        evaluations.append(result)
        torch.save(state, probe / f"rank{rank()}-epoch{len(evaluations)}.pt")
        return result

    def write_checkpoint(path, state):
        real_write(path, state)
        shutil.copy(path, probe / f"checkpoint-epoch{state['epoch']}.pt")

    train.build_loaders, train.evaluate, checkpoint.write_checkpoint = build_loaders, evaluate, write_checkpoint


if __name__ == "__main__":
    install(Path(sys.argv[1]))
    sys.exit(train.run(sys.argv[2:]))
