"""The processes and the device a run uses: torchrun's ranks (one GPU each), or one process; CPU threads."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(requested: int | None, local_world_size: int, env=os.environ) -> int | None:
    """Threads for this process's CPU ops, or None to keep torch's default (OMP_NUM_THREADS, else every core).

    torchrun sets OMP_NUM_THREADS=1 for every process when it starts several on a machine and the
    variable was unset, which leaves all but a few cores idle when training on the CPU. Its 1 cannot
    be told from a user's, so with several local processes OMP_NUM_THREADS=1 counts as unset and the
    cores are divided among the processes; --threads 1 forces one thread."""
    if requested:
        return requested
    if local_world_size > 1 and env.get("OMP_NUM_THREADS", "1") == "1":
        return max(1, usable_cores() // local_world_size)
    return None


def setup_device(args):
    """(device, rank, world_size): several processes under torchrun, one GPU each; else one process."""
    threads = cpu_threads(args.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads:
        torch.set_num_threads(threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
        # Every collective gives up after --dist-timeout: a rank that died or hangs ends the job, not a wait.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.dist_timeout))
        rank, world_size = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    else:
        rank, world_size = 0, 1
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device refuses a device without an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, rank, world_size


def all_reduce(stats: torch.Tensor) -> torch.Tensor:
    """Sums `stats` over the ranks (in place) when training on several."""
    if dist.is_initialized():
        dist.all_reduce(stats)
    return stats


def describe_setup(args, device, rank: int, world_size: int, amp_why: str, compile_why: str) -> None:
    """The first line of a run, on rank 0: what runs where, and why where it was chosen for the user
    (a collective under torchrun: every rank's thread count)."""
    ddp = world_size > 1
    threads = [torch.get_num_threads()] * world_size
    if ddp:
        dist.all_gather_object(threads, threads[rank])
    if rank == 0:
        uses = f"CPU threads {threads[0]}"
        if ddp:
            each = f"{threads[0]} per process" if len(set(threads)) == 1 else f"{threads} by rank"
            uses = f"{world_size} processes ({dist.get_backend()}), CPU threads {each}"
        print(f"device {device} | amp {args.amp} ({amp_why}) | compile {'on' if args.compile else 'off'} "
              f"({compile_why}) | channels_last {'on' if args.channels_last else 'off'} | {uses}")
