"""The GPU check's first stage: does each CUDA path work at all, in well under 90 seconds.

    python benchmarks/smoke.py --data-path SHARDS --images JPEG_FOLDER --json results.json [--device cuda]

1. versions: Python, torch, CUDA, the GPU, and the packages the loaders use;
2. decoder: which JPEG decoder the torch loader's GPU path loaded (TorchCodec, or torchvision's fallback);
3. cache: the validation split filled into a resident cache by the torch loader, and one batch from it;
4. step: train.py's training step (bf16, channels_last, train.py's TF32 and cuDNN settings) on that
   batch, eager: the first call, then a few timed calls. Not compiled unless --compile: a compile here
   would fill inductor's on-disk caches, and the answer stage after it would measure a warm compile as
   if it were a machine's first;
5. decode: a batch of a few hundred JPEGs decoded on the device (pipeline/torch_loader.py's
   `gpu_decode`) against the workers' CPU decode of the same files: images/s of each and the mean
   absolute difference of the pixels (bound: tests/test_cuda.py's CUDA_BOUND).

Each check is reported on its own line and in --json under "smoke", written when the stage ends; a
failing check does not stop the others. Exit status 1 when any failed.
"""

import argparse
import importlib
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks import report  # noqa: E402
from model import VariationalAutoEncoder  # noqa: E402
from model.step import TrainStep, make_optimizer, resolve_amp, resolve_compile  # noqa: E402
from pipeline import build_loader  # noqa: E402
from pipeline.torch_loader import decode_resized_batch, gpu_decode, jpeg_decoder  # noqa: E402

CUDA_BOUND = 1.0  # mean absolute difference, 0..255: tests/test_cuda.py says where it comes from


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", type=Path, required=True, help="shards made by prep/shard.py")
    p.add_argument("--images", type=Path, required=True, help="the JPEG folder they were made from")
    p.add_argument("--json", type=Path, required=True, help="the results file the smoke part is merged into")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto, CUDA when present)")
    p.add_argument("--decode", type=int, default=256, help="JPEGs in the decode comparison (default: 256)")
    p.add_argument("--batch-size", type=int, default=128, help="the step's batch (default: 128, the seed's)")
    p.add_argument("--workers", type=int, default=2, help="the cache fill's loader processes (default: 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first (default: 5)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="compile the step (default: off, so that the GPU check's answer stage compiles first)")
    args = p.parse_args(argv)
    args.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                               else args.device)
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions(args) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(args.device)}
    if args.device.type == "cuda":
        props = torch.cuda.get_device_properties(args.device)
        out.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    else:
        out["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
    for name in ("torchvision", "torchcodec", "triton", "webdataset", "simplejpeg", "nvidia.dali"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as exn:  # absent or broken: the entry says which
            out[name] = f"missing ({type(exn).__name__})"
    return out


def decoder(args) -> dict:
    name, _ = jpeg_decoder(args.device)
    return {"name": name, "fallback": name != "torchcodec"}


def cache_batch(args, state) -> dict:
    loader = build_loader("cache", args.data_path, "val", args.batch_size, args.device, workers=args.workers,
                          source="torch")
    images = next(iter(loader))
    assert images.device.type == args.device.type and images.dtype == torch.uint8, (images.device, images.dtype)
    assert images.shape[1:] == (3, 64, 64) and images.is_contiguous(memory_format=torch.channels_last)
    assert images.float().std() > 10, "the cached batch is not pictures"
    state["batch"] = images
    return {"images": len(loader.cache), "fill_s": round(loader.cache.seconds, 3),
            "fill_img_per_s": round(len(loader.cache) / loader.cache.seconds, 1), "batch": list(images.shape)}


def step(args, state) -> dict:
    images = state.get("batch")
    if images is None:
        raise RuntimeError("no batch: the cache check failed")
    amp, _ = resolve_amp("auto", args.device)
    compile_on = resolve_compile(args.compile, args.device, amp)[0] if args.compile else False
    model = VariationalAutoEncoder().to(args.device, memory_format=torch.channels_last)
    train_step = TrainStep(model, make_optimizer(model.parameters(), 3e-4, args.device), args.device, amp=amp,
                           compile=compile_on)
    sync(args.device)
    started = time.perf_counter()
    out = train_step(images)
    sync(args.device)
    first = time.perf_counter() - started
    times = []
    for _ in range(max(1, args.steps)):
        started = time.perf_counter()
        out = train_step(images)
        sync(args.device)
        times.append(time.perf_counter() - started)
    losses = [t.item() for t in out]
    assert all(map(lambda v: v == v and abs(v) < float("inf"), losses)), f"non-finite losses {losses}"
    times.sort()
    return {"amp": amp, "compile": compile_on, "batch": len(images), "first_call_s": round(first, 3),
            "ms_per_step": round(1000 * times[len(times) // 2], 3), "loss": round(losses[0], 5)}


def decode(args) -> dict:
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:args.decode]
    if not files:
        raise RuntimeError(f"no JPEGs in {args.images}")
    blobs = [f.read_bytes() for f in files]
    data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
    lengths, flips = [len(b) for b in blobs], torch.zeros(len(blobs), dtype=torch.bool)

    def on_device():
        out = gpu_decode(data, lengths, flips, "center", args.device)
        sync(args.device)
        return out

    on_device()  # the decoder's buffers and kernels, once
    started = time.perf_counter()
    device_images = on_device()
    device_s = time.perf_counter() - started
    started = time.perf_counter()
    cpu_images = decode_resized_batch(blobs, "center").permute(0, 3, 1, 2)
    cpu_s = time.perf_counter() - started
    difference = (device_images.cpu().float() - cpu_images.float()).abs().mean().item()
    assert difference < CUDA_BOUND, f"mean difference {difference:.3f} from the CPU decode, over {CUDA_BOUND}"
    return {"images": len(blobs), "device_img_per_s": round(len(blobs) / device_s, 1),
            "cpu_one_thread_img_per_s": round(len(blobs) / cpu_s, 1), "mean_abs_difference": round(difference, 4)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.type == "cuda":  # train.py's settings
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    results, state, failed = {}, {}, []
    checks = [("versions", lambda: versions(args)), ("decoder", lambda: decoder(args)),
              ("cache", lambda: cache_batch(args, state)), ("step", lambda: step(args, state)),
              ("decode", lambda: decode(args))]
    for name, check in checks:
        started = time.perf_counter()
        try:
            results[name] = check()
            status = "ok"
        except KeyboardInterrupt:  # the stage's time ran out: keep what the checks before found
            results[name] = {"error": "stopped: the stage's time ran out"}
            failed.append(name)
            results[name]["seconds"] = round(time.perf_counter() - started, 2)
            print(f"{name:<9} STOPPED", flush=True)
            break
        except Exception as exn:  # every check runs and says what went wrong
            traceback.print_exc()
            results[name] = {"error": f"{type(exn).__name__}: {exn}"}
            failed.append(name)
            status = "FAILED"
        results[name]["seconds"] = round(time.perf_counter() - started, 2)
        print(f"{name:<9} {status:<7} {results[name]}", flush=True)
    results["failed"] = failed
    report.merge(args.json, "smoke", results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
