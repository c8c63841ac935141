"""Training checkpoints that a crash, Ctrl-C, a full disk or a damaged file cannot take away.

save_checkpoint writes `checkpoint.pt.tmp`, syncs it, reads it back and compares it with what it
meant to write, then rotates: the old `checkpoint.pt` becomes `checkpoint.prev.pt` and the new file
takes its name, each step an atomic rename (the old file is linked as the previous one before the
new one replaces it, so `checkpoint.pt` names a whole checkpoint at every moment). A failure at any
point leaves the last good checkpoint as it was. Each checkpoint carries a SHA-256 digest of its contents, because torch.load does not notice
flipped bytes inside tensor data: load_checkpoint checks it, and falls back to the previous
checkpoint when the newest one is missing, unreadable or damaged.

The file stays a plain dict that `torch.load(path, weights_only=False)` opens: model, optimizer,
scaler, epoch, args, world_size, rng, digest.
"""

import errno
import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch

# The settings that change what a run computes, with the flag that sets each. Resuming with other
# values would mix two runs into one; --resume refuses, --resume-force carries on.
SETTINGS = {"z_dim": "--z-dim", "batch_size": "--batch-size", "beta": "--beta", "lr": "--lr", "crop": "--crop",
            "flip": "--flip", "seed": "--seed", "loader": "--loader", "world_size": "world size"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what to do about it. Scripts print it without a traceback."""


class NotACheckpoint(CheckpointError):
    """A weights file given where a checkpoint belongs: an error of its own, never a reason to fall back."""


def previous(path: Path) -> Path:
    """checkpoint.pt -> checkpoint.prev.pt, where the checkpoint before the newest one is kept."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def digest(state) -> str:
    """SHA-256 of everything in a checkpoint: the bytes of every tensor and array, the repr of the rest."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            h.update(f"tensor {x.dtype} {tuple(x.shape)}\n".encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, np.ndarray):
            h.update(f"array {x.dtype} {x.shape}\n".encode())
            h.update(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
        elif isinstance(x, dict):
            h.update(f"dict {len(x)}\n".encode())
            for key, value in x.items():
                walk(key)
                walk(value)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__} {len(x)}\n".encode())
            for value in x:
                walk(value)
        else:
            h.update(f"{type(x).__name__} {x!r}\n".encode())

    walk(state)
    return h.hexdigest()


def save_checkpoint(path: Path, model, optimizer, scaler, epoch: int, args, device, world_size: int = 1) -> None:
    """Writes a checkpoint at `path`, keeping the one it replaces as previous(path).

    Raises OSError (ENOSPC, EACCES...) naming the file when it cannot be written or read back whole;
    the checkpoints already on disk are then untouched."""
    path = Path(path)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "epoch": epoch, "args": vars(args), "world_size": world_size,
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
    state["digest"] = digest(state)
    tmp, prev = path.with_name(path.name + ".tmp"), previous(path)
    prev_tmp = prev.with_name(prev.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces anything
        try:
            written = torch.load(tmp, map_location="cpu", weights_only=False)
            whole = digest({k: v for k, v in written.items() if k != "digest"}) == state["digest"]
        except Exception as exn:  # a file that does not load is a write that failed
            raise OSError(errno.EIO, f"it does not read back ({_cause(exn)})", str(tmp)) from None
        if not whole:
            raise OSError(errno.EIO, "it reads back other bytes than were written", str(tmp))
        if path.exists():
            # The current checkpoint becomes the previous one while keeping its name (a second link),
            # so that `path` names a whole checkpoint at every moment, Ctrl-C or crash included.
            try:
                os.link(path, prev_tmp)
                os.replace(prev_tmp, prev)
            except OSError:  # a file system without hard links: a short moment with previous(path) only
                os.replace(path, prev)
        os.replace(tmp, path)
    except OSError as exn:
        raise OSError(exn.errno, exn.strerror or str(exn), exn.filename or str(tmp)) from None
    finally:
        tmp.unlink(missing_ok=True)  # a half-written file helps nobody
        prev_tmp.unlink(missing_ok=True)


def save_weights(path: Path, model) -> None:
    """The plain CPU state_dict that the seed README's snippet loads, replaced atomically: a file under
    this name is always whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    except OSError as exn:
        raise OSError(exn.errno, exn.strerror or str(exn), str(tmp)) from None
    finally:
        tmp.unlink(missing_ok=True)


def _cause(exn: Exception) -> str:
    """The first sentence of an exception, which is the part that says what is wrong."""
    text = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
    return text.split(". ", 1)[0].rstrip(".")


def _read(path: Path) -> dict:
    """A checkpoint that is whole and was written by save_checkpoint, or CheckpointError saying why not."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as exn:  # torch.load raises many types for damaged files; all mean "unreadable"
        raise CheckpointError(f"{path} is unreadable ({_cause(exn)})") from None
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NotACheckpoint(f"{path} holds only model weights (a vae_celeba.pth), not a training checkpoint")
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "args", "rng"} <= state.keys():
        raise CheckpointError(f"{path} is not a checkpoint written by train.py")
    saved = state.pop("digest", None)
    if saved is not None and saved != digest(state):
        raise CheckpointError(f"{path} is damaged (its contents do not match the digest saved with it)")
    return state


def load_checkpoint(path: Path) -> tuple[dict, Path, str | None]:
    """(state, the file it came from, a note when that is not `path`): the newest whole checkpoint.

    Falls back to previous(path) when `path` is missing, unreadable or damaged, and says so in the
    note. A weights file given instead of a checkpoint is an error, not a reason to fall back."""
    path, prev = Path(path), previous(Path(path))
    try:
        return _read(path), path, None
    except NotACheckpoint as exn:
        raise NotACheckpoint(f"--resume: {exn}: weights alone cannot continue training (they hold no "
                             f"optimizer state); pass the run's checkpoint.pt, or leave --resume out to "
                             f"start a new run") from None
    except CheckpointError as newest:
        if not prev.exists():
            if not path.exists():
                raise CheckpointError(f"--resume: no checkpoint at {path}; leave --resume out to start "
                                      f"a new run") from None
            raise CheckpointError(f"--resume: {newest}, and there is no earlier checkpoint {prev.name}; "
                                  f"start again with --overwrite") from None
        try:
            state = _read(prev)
        except CheckpointError as older:
            raise CheckpointError(f"--resume: {newest}, and {older}; start again with --overwrite") from None
        return state, prev, f"{newest}; continuing from {prev}, saved after epoch {state['epoch']}"


def settings_of(args: dict, world_size: int) -> dict:
    return {**{k: args.get(k) for k in SETTINGS if k != "world_size"}, "world_size": world_size}


def _show(key: str, value) -> str:
    if key == "flip":
        return "--flip" if value else "--no-flip"
    return f"{SETTINGS[key]} {value}"


def setting_changes(state: dict, wanted: dict) -> dict[str, str]:
    """setting -> one line saying how it differs between the checkpoint and this run, for each that does."""
    saved = settings_of(state["args"], state.get("world_size", 1))
    return {k: f"{_show(k, wanted[k])} now, {_show(k, saved[k])} in the checkpoint"
            for k in SETTINGS if saved[k] != wanted[k]}


def restore_checkpoint(state: dict, model, optimizer, scaler, device, lr: float) -> int:
    """Puts back everything save_checkpoint wrote; returns the number of finished epochs.

    `lr` wins over the learning rate stored with the optimizer, so that --resume-force --lr takes."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler.is_enabled() and state["scaler"]:  # empty when saved with a disabled (non-fp16) scaler
        scaler.load_state_dict(state["scaler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return state["epoch"]
