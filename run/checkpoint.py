"""Training checkpoints that a crash, Ctrl-C, a full disk, a damaged file or a hostile one cannot take away.

A checkpoint is what `torch.save` writes (a zip archive), with one addition: the zip comment at its
very end holds `vae-celeba checkpoint sha256=<hex>`, the SHA-256 of every byte before it. Reading
checks that digest on the raw bytes before anything is deserialised, then loads them with
`torch.load(weights_only=True)`, which builds tensors and plain values only and runs nothing: a
file that is cut short, has flipped bytes, or holds anything else is refused in one line. The file
stays one that `torch.load(path)` opens (zip readers skip the comment). The digest has no key: it
catches damage (a cut, a flipped byte), not an attacker, who can edit the file and compute it again.
What keeps code in a checkpoint from running is weights_only; what keeps an edited field from being
used is run/checkpoint_fields.py's state_problem, which checks every field (the weights' shapes against the model of the saved
--z-dim, Adam's state against those weights, the random states, types and ranges) before any is used. A checkpoint holds:

    {"format": 2, "model": state_dict, "optimizer": state_dict, "scaler": state_dict (empty unless fp16),
     "epoch": finished epochs, "args": train.py's settings (plain values; "data" the shards' identity), "world_size": int,
     "rng": [{"torch": uint8 tensor, "cuda": uint8 tensor or None} for each rank]}

Nothing else in the project draws from python's `random` or numpy's global generator (the loaders
seed their own), so their states are not kept. vae_celeba.pth is the same kind of file with the
tag `vae-celeba weights`, holding the plain CPU state_dict and nothing else.

write_checkpoint writes through common.files.atomic_write (a unique temporary file, synced), reads
the file back and compares it with the bytes it meant to write, then rotates: the old
`checkpoint.pt` becomes `checkpoint.prev.pt` (linked first, so `checkpoint.pt` names a whole
checkpoint at every moment) and the new file takes its name. A failure at any point leaves the last
good checkpoint as it was. load_checkpoint falls back to the previous checkpoint when the newest one
is missing, unreadable or damaged. CheckpointWriter does the copying to host memory on the caller's
thread and all of the writing on a thread of its own. resume_checkpoint is --resume's check of a
checkpoint against the run's settings; restore puts it back into the model, Adam and the scaler.
"""

import errno
import hashlib
import io
import os
import pickle
import secrets
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from common.cli import first_sentence
from common.files import TMP_SUFFIX, atomic_write
from pipeline.shards import data_identity
from run.checkpoint_fields import BOOLEAN_SETTINGS, FORMAT, state_problem

CHECKPOINT_TAG, WEIGHTS_TAG = b"vae-celeba checkpoint sha256=", b"vae-celeba weights sha256="
_EOCD = b"PK\x05\x06"  # a zip's end-of-central-directory record: 22 bytes, then the comment
_HEX = 64

# The settings that change what a run computes, with the flag that sets each: the one list that the
# --resume check, train.py's --resume-force help and the README use. Resuming with other values would
# mix two runs into one; --resume refuses, --resume-force carries on (never for z_dim). amp and compile
# are the resolved values (what `auto` became on the machine that ran).
# "data" is the identity of the shards (pipeline/shards.py's data_identity), shown as the --data-path that
# held them.
SETTINGS = {"z_dim": "--z-dim", "batch_size": "--batch-size", "beta": "--beta", "lr": "--lr", "crop": "--crop",
            "flip": "--flip", "seed": "--seed", "loader": "--loader", "amp": "--amp", "compile": "--compile",
            "data": "--data-path", "world_size": "world size"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what to do about it. Scripts print it without a traceback."""


class NotACheckpoint(CheckpointError):
    """A weights file given where a checkpoint belongs: an error of its own, never a reason to fall back."""


class Loaded(NamedTuple):
    state: dict
    source: Path  # the file it came from
    note: str | None  # when that is not the file asked for: why
    damaged: Path | None  # the newest checkpoint, when it was there but unreadable or damaged


def previous(path: Path) -> Path:
    """checkpoint.pt -> checkpoint.prev.pt, where the checkpoint before the newest one is kept."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def serialize(obj, tag: bytes = CHECKPOINT_TAG) -> bytes:
    """torch.save's bytes of `obj`, their SHA-256 appended as the zip comment after `tag`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    if bytes(data[-22:-18]) != _EOCD or bytes(data[-2:]) != b"\0\0":  # torch.save writes no comment
        raise RuntimeError("torch.save wrote a zip archive this version does not know how to sign")
    body = data[:-2]
    comment = tag + hashlib.sha256(body).hexdigest().encode()
    return b"".join([body, len(comment).to_bytes(2, "little"), comment])


def signed_as(data: bytes, path: Path) -> bytes | None:
    """The tag that `data` ends with, once its digest is checked; None when it carries none.
    CheckpointError when the digest does not match: the bytes were changed after they were written."""
    for tag in (CHECKPOINT_TAG, WEIGHTS_TAG):
        n = len(tag) + _HEX
        if (len(data) >= n + 22 and data[-n:].startswith(tag) and data[-n - 2:-n] == n.to_bytes(2, "little")
                and data[-n - 22:-n - 18] == _EOCD):
            if hashlib.sha256(memoryview(data)[:-n - 2]).hexdigest().encode() != data[-_HEX:]:
                raise CheckpointError(f"{path} is damaged (its bytes do not match the digest saved with them)")
            return tag
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as exn:
        raise CheckpointError(f"{path} is unreadable ({exn.strerror or exn})") from None


def _unpickle(data: bytes, path: Path):
    """torch.load with weights_only=True: tensors and plain values, or CheckpointError; nothing runs."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds objects other than tensors and plain values; refused without "
                              f"loading them (unpickling such a file can run any code)") from None
    except Exception as exn:  # torch.load raises many types for damaged files; all mean "unreadable"
        raise CheckpointError(f"{path} is unreadable ({first_sentence(exn)})") from None


def _read(path: Path) -> dict:
    """A checkpoint that is whole and was written by write_checkpoint, or CheckpointError saying why not."""
    data = _read_bytes(path)
    tag = signed_as(data, path)
    if tag == WEIGHTS_TAG:
        raise NotACheckpoint(f"{path} holds only model weights (a vae_celeba.pth), not a training checkpoint")
    if tag is None:
        raise CheckpointError(f"{path} is unreadable (it does not end with the digest train.py writes: cut short, "
                              f"or saved by another program or an older train.py); refused unopened")
    state = _unpickle(data, path)
    problem = state_problem(state)
    if problem:
        raise CheckpointError(f"{path} is not a checkpoint this train.py wrote: {problem} (edited, or written by "
                              f"another program or version)")
    return state


def load_checkpoint(path: Path) -> Loaded:
    """The newest whole checkpoint: `path`, or previous(path) when `path` is missing, unreadable or
    damaged, said in the note. A weights file given instead of a checkpoint is an error, not a reason
    to fall back."""
    path, prev = Path(path), previous(Path(path))
    try:
        return Loaded(_read(path), path, None, None)
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
        damaged = path if os.path.lexists(path) else None
        return Loaded(state, prev, f"{newest}; continuing from {prev}, saved after epoch {state['epoch']}", damaged)


def load_weights(path: Path) -> dict:
    """A model state_dict from `path`, read safely: train.py's vae_celeba.pth (its digest checked
    first) or any state_dict saved with torch.save. CheckpointError in one line when the file is
    damaged, is a training checkpoint, or holds anything but tensors and plain values; nothing in it runs."""
    path = Path(path)
    data = _read_bytes(path)
    if signed_as(data, path) == CHECKPOINT_TAG:
        raise CheckpointError(f"{path} is a training checkpoint, not weights: pass the vae_celeba.pth that "
                              f"train.py writes beside it when training ends")
    state = _unpickle(data, path)
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{path} does not hold model weights (a state_dict like train.py's vae_celeba.pth)")
    return state


def write_checkpoint(path: Path, state: dict) -> None:
    """Writes `state` (tensors on the CPU) as a checkpoint at `path`, keeping the one it replaces as
    previous(path). Raises OSError (ENOSPC, EACCES, EIO...) naming the file when it cannot be written
    or read back whole; the checkpoints already on disk are then untouched."""
    path = Path(path)
    data = serialize(state, CHECKPOINT_TAG)
    expected = hashlib.sha256(data).digest()
    prev = previous(path)

    def verify_and_rotate(tmp: Path) -> None:
        with open(tmp, "rb") as f:
            if hashlib.sha256(f.read()).digest() != expected:
                raise OSError(errno.EIO, "it reads back other bytes than were written", str(tmp))
        if os.path.lexists(path):
            # The current checkpoint becomes the previous one while keeping its name (a second link),
            # so that `path` names a whole checkpoint at every moment, Ctrl-C or crash included.
            link = prev.with_name(f".{prev.name}.{secrets.token_hex(8)}{TMP_SUFFIX}")
            try:
                os.link(path, link, follow_symlinks=False)
                os.replace(link, prev)
            except OSError:  # a file system without hard links: a short moment with previous(path) only
                link.unlink(missing_ok=True)
                os.replace(path, prev)

    atomic_write(path, data, before_replace=verify_and_rotate)


def save_weights(path: Path, model) -> None:
    """The plain CPU state_dict that the seed README's snippet loads, written atomically and durably."""
    atomic_write(path, serialize({k: v.detach().cpu() for k, v in model.state_dict().items()}, WEIGHTS_TAG))


def rng_state(device) -> dict:
    """This process's random state: what the reparameterisation noise and the loaders' seeds draw from."""
    device = torch.device(device)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def all_rng_states(device, world_size: int) -> list[dict]:
    """Every rank's random state, in rank order, on every rank (a collective: all ranks call it)."""
    mine = rng_state(device)
    if world_size == 1:
        return [mine]
    states = [None] * world_size
    dist.all_gather_object(states, mine)
    return states


def checkpoint_state(model, optimizer, scaler, epoch: int, args: dict, world_size: int, rng: list[dict]) -> dict:
    """What a checkpoint holds, with references to the live tensors (CheckpointWriter.save copies them)."""
    return {"format": FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "args": args, "world_size": world_size, "rng": rng}


def _host_copy(obj, buffers: dict, key: tuple = ()):
    """`obj` with every tensor copied to host memory: on CUDA into pinned buffers kept in `buffers`
    across calls (copies that do not wait for the GPU); on the CPU plain clones, since training goes
    on changing the originals in place."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj.detach().clone()
        buffer = buffers.get(key)
        if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
            buffer = buffers[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
        return buffer.copy_(obj.detach(), non_blocking=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v, buffers, (*key, k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v, buffers, (*key, i)) for i, v in enumerate(obj))
    return obj


class CheckpointWriter:
    """Checkpoints written, synced, read back and rotated on a thread of their own, with
    write_checkpoint's guarantees; one at a time.

        writer = CheckpointWriter(out_dir / "checkpoint.pt")
        writer.save(checkpoint_state(...))  # copies to host memory, returns while the thread writes
        writer.raise_failure()              # at each epoch boundary: an OSError from the last write
        writer.wait()                       # before exit, Ctrl-C included

    `saved` is the epoch of the newest checkpoint verified on disk by this writer (None before)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.buffers: dict = {}
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.saved: int | None = None

    def save(self, state: dict) -> None:
        self.wait()  # the buffers are free again, and checkpoints land in order
        self.raise_failure()
        host = _host_copy(state, self.buffers)
        ready = None
        if self.buffers:  # copies from the GPU in flight: the thread waits for them, training does not
            ready = torch.cuda.Event()
            ready.record()
        self.thread = threading.Thread(target=self._write, args=(host, ready), name="checkpoint writer")
        self.thread.start()

    def _write(self, host: dict, ready) -> None:
        try:
            if ready is not None:
                ready.synchronize()
            write_checkpoint(self.path, host)
            self.saved = host["epoch"]
        except BaseException as exn:  # handed to the training thread, which stops with it
            self.failure = exn

    def wait(self) -> None:
        """Returns once no write is in flight."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def raise_failure(self) -> None:
        """Raises what made the last finished write fail, once."""
        if self.failure is not None and (self.thread is None or not self.thread.is_alive()):
            failure, self.failure = self.failure, None
            try:
                raise failure
            finally:
                del failure  # no cycle through this frame


def settings_of(args: dict, world_size: int) -> dict:
    return {**{k: args.get(k) for k in SETTINGS if k != "world_size"}, "world_size": world_size}


def _show(key: str, value, args: dict) -> str:
    if key in BOOLEAN_SETTINGS:
        return SETTINGS[key] if value else f"--no-{SETTINGS[key][2:]}"
    if key == "data":  # an identity means nothing to the reader: the folder that held those shards
        return f"--data-path {args.get('data_path')} (shards {str(value)[:12]})"
    return f"{SETTINGS[key]} {value}"


def setting_changes(state: dict, args: dict, world_size: int) -> dict[str, str]:
    """setting -> one line saying how it differs between the checkpoint and this run (its settings `args`),
    for each that does. A checkpoint that does not record its shards (an older train.py's) is not
    compared on them."""
    saved, wanted = settings_of(state["args"], state["world_size"]), settings_of(args, world_size)
    return {k: f"{_show(k, wanted[k], args)} now, {_show(k, saved[k], state['args'])} in the checkpoint"
            for k in SETTINGS if saved[k] != wanted[k] and not (k == "data" and saved[k] is None)}


def restore_checkpoint(state: dict, model, optimizer, scaler, device, lr: float, rank: int = 0,
                       seed: int = 0) -> int:
    """Puts back everything write_checkpoint wrote; returns the number of finished epochs.

    `lr` wins over the learning rate stored with the optimizer, so that --resume-force --lr takes. Each
    rank takes its own random state; a rank the checkpoint has none for (--resume-force on more
    processes) starts its noise stream at seed + rank, as a new run does."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler.is_enabled() and state["scaler"]:  # empty when saved with a disabled (non-fp16) scaler
        scaler.load_state_dict(state["scaler"])
    if rank < len(state["rng"]):
        rng = state["rng"][rank]
        torch.set_rng_state(rng["torch"])
        if torch.device(device).type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
    else:
        torch.manual_seed(seed + rank)
    return state["epoch"]


def resume_checkpoint(args, world_size: int, master: bool, weights: Path) -> Loaded | None:
    """The checkpoint that --resume names, checked against this run's settings (`args`, whose `data` it
    sets to the identity of --data-path's shards); None when the run it belongs to is already complete
    (its `weights` written), which changes nothing."""
    loaded = load_checkpoint(Path(args.resume))
    state, source, note = loaded.state, loaded.source, loaded.note
    if note and master:
        print(note, file=sys.stderr)
    done = state["epoch"]
    if done >= args.epochs and weights.is_file():
        if master:
            print(f"{source} has finished epoch {done} and --epochs is {args.epochs}: the run is already complete; "
                  f"nothing changed. Raise --epochs to train further")
        return None
    args.data = data_identity(args.data_path)
    if "data" not in state["args"] and master:
        print(f"--resume: {source} does not record which shards it was trained on (an older train.py): "
              f"--data-path {args.data_path} is taken as the same", file=sys.stderr)
    changes = setting_changes(state, vars(args), world_size)
    if "z_dim" in changes:
        raise CheckpointError(f"--resume: {changes['z_dim']}: the weights have another shape, which even "
                              f"--resume-force cannot change; resume with --z-dim {state['args']['z_dim']}")
    if changes and not args.resume_force:
        raise CheckpointError("\n".join([f"--resume: {source} was trained with other settings, which change the "
                                         "result:", *(f"  {line}" for line in changes.values()),
                                         "use the checkpoint's settings, or add --resume-force to carry on "
                                         "with these"]))
    if changes and master:
        print("\n".join(f"--resume-force: {line}" for line in changes.values()), file=sys.stderr)
    return loaded
