"""How fast each part runs, beside the seed project's naive loop, on the same images in one run.

    python benchmarks/throughput.py                   # synthetic faces, everything this machine can run
    python benchmarks/throughput.py --quick           # the short form (CPU: under 3 minutes on 2 cores)
    python benchmarks/throughput.py --images dataset/celeba/img_align_celeba --json results.json

1. loaders: images/s delivered to the training device as (B, 3, 64, 64) batches, each in the form
   its training step takes: float32 from the seed's ToTensor, uint8 channels_last from the project's
   loaders (their step converts to float on the device; train_step and end_to_end count that).
   `seed` is the seed project's data path: a Dataset over sorted(os.listdir(folder)), PIL
   open + convert("RGB"), Resize((64, 64)), ToTensor(), a shuffling DataLoader with workers and
   pin_memory, reading the JPEG folder. `torch` and `dali` are pipeline/'s loaders over shards that
   prep/shard.py makes from the same JPEGs (on CUDA, `torch-cpu-decode` is the torch loader with its
   GPU decode turned off). `cache` serves the split from one tensor on the device, filled once by a
   pass of the `torch` loader: its row times the batches from that tensor, and reports the fill apart.
2. train_step: the project's training step (model/step.py) on batches already on the device, for
   each mode that applies here; `seed` is the seed's step (eager fp32, F.binary_cross_entropy, a
   loss.item() per step as its loop does); `default` is what train.py picks on this device.
3. end_to_end: each loader feeding train.py's default step, as images/s and as a fraction of that
   step's ceiling (how much the loader holds training back); `seed` is the seed's loader feeding
   the seed's step. From it, the wall time of 40 epochs over CelebA's 162,770 training images (for
   `cache`, 40 epochs plus one fill pass at the fill's measured rate).

Every figure is the median of --repeats timed windows after a warm-up that is not timed, with CUDA
synchronised before each clock read. A loader's window is one whole epoch, its start included; the
training windows are --steps steps. Each training mode is compiled once, in its row of section 2
(whose warm-up holds the compile); the end-to-end rows reuse that step. The sections run in the order
2, 1, 3. The JSON is rewritten after every row, and on Ctrl-C (SIGINT, which benchmarks/gpu_check.sh
sends when the stage's time runs out) the rows finished so far are written and printed, with the row
that was stopped under "interrupted".

The 40-epoch figures here count the steps (and for `cache` one fill pass) only; benchmarks/celeba_epochs.py
projects a whole train.py run, with the evaluation, checkpoints, pictures and compile.
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import PIL  # noqa: E402
import simplejpeg  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
import webdataset  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import cli  # noqa: E402
from common.celeba import CELEBA_SPLIT  # noqa: E402
from common.files import atomic_write  # noqa: E402
from model import CLAMP_EPS, VariationalAutoEncoder  # noqa: E402
from model.step import TrainStep, make_optimizer, resolve_amp, resolve_compile  # noqa: E402
from pipeline import DALI_INSTALL, build_loader, default_workers  # noqa: E402
from prep import shard  # noqa: E402
from prep.synthetic import write_synthetic  # noqa: E402

CELEBA_TRAIN = CELEBA_SPLIT["train"]
EPOCHS = 40
LOADER_NAMES = ("seed", "torch", "torch-cpu-decode", "dali", "cache")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="a folder laid out like img_align_celeba (default: make synthetic faces in a temporary folder)")
    p.add_argument("--limit", type=cli.count, default=10_000, metavar="N",
                   help="with --images: use the first N files, 0 for all (default: 10000)")
    p.add_argument("--synthetic", type=cli.positive_int, default=None, metavar="N",
                   help="synthetic faces to make without --images (default: 10000, 3000 with --quick)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default: auto, CUDA when present)")
    p.add_argument("-b", "--batch-size", type=cli.positive_int, default=128, help="images per batch (default: 128, the seed's)")
    p.add_argument("-j", "--workers", type=cli.count, default=default_workers(),
                   help="loader processes (seed, torch) or threads (dali), the same for all (default: train.py's, "
                        f"{cli.workers_rule()}: {default_workers()} here)")
    p.add_argument("--loaders", default=",".join(LOADER_NAMES),
                   help=f"comma-separated loaders to run (default: all of {','.join(LOADER_NAMES)})")
    p.add_argument("--crop", choices=("center", "none"), default="center",
                   help="the project loaders' geometry (default: center, train.py's); the seed always squashes")
    p.add_argument("--quick", action="store_true",
                   help="fewer images, windows and steps, and no compile row on a CPU (CPU: about a minute on 2 cores)")
    p.add_argument("--no-compile", action="store_true",
                   help="time no compiled mode, `default` included (a dry run of this script; not train.py's default "
                        "where it compiles)")
    p.add_argument("--repeats", type=cli.positive_int, default=None, help="timed windows per row (default: 5, 3 with --quick)")
    p.add_argument("--steps", type=cli.positive_int, default=None,
                   help="training steps per timed window (default: CUDA 50, CPU 8, CPU --quick 4)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here as JSON")
    args = p.parse_args(argv)
    args.loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    unknown = sorted(set(args.loaders) - set(LOADER_NAMES))
    if unknown:
        p.error(f"--loaders: unknown {', '.join(unknown)}; choose from {', '.join(LOADER_NAMES)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    cuda = args.device.type == "cuda"
    if args.synthetic is None:
        args.synthetic = 3000 if args.quick else 10_000
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.steps is None:
        args.steps = 50 if cuda else (4 if args.quick else 8)
    if args.json is not None:  # found now, not after the whole benchmark has run
        problem = "it is a folder" if args.json.is_dir() else cli.unwritable(args.json.parent)
        if problem:
            p.error(f"--json {args.json}: {problem}")
    return args


# ----------------------------------------------------------------------------- the seed's data path and step
class SeedFaces(Dataset):
    """The seed project's Dataset: every file of the folder, decoded whole by PIL, squashed to 64x64."""

    def __init__(self, folder):
        self.folder = folder
        self.files = sorted(os.listdir(folder))
        self.transform = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor()])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(Image.open(os.path.join(self.folder, self.files[i])).convert("RGB"))


def seed_loader(folder, args):
    return DataLoader(SeedFaces(folder), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      pin_memory=args.device.type == "cuda")


def seed_step(device, beta=1e-3):
    """The seed's training step: eager fp32, NCHW, the clamped BCE of its README, a host sync per step."""
    model = VariationalAutoEncoder().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    total = [0.0]

    def step(x):
        x = x.to(device, non_blocking=True)
        x_hat, mu, logvar = model(x)
        bce = F.binary_cross_entropy(x_hat.clamp(CLAMP_EPS, 1 - CLAMP_EPS), x.clamp(CLAMP_EPS, 1 - CLAMP_EPS))
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
        loss = bce + beta * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total[0] += loss.item()
        return len(x)
    return step


# ----------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


WINDOW_S = 10  # a timed window longer than this gets fewer steps (CPU bf16 without bf16 units, say)


def timed(stream, work, *, warmup, steps, repeats, device, fixed=False) -> dict:
    """Median images/s and ms/step of `repeats` windows of `steps` items, after `warmup` untimed ones."""
    started = time.perf_counter()
    for _ in range(warmup):
        last = time.perf_counter()
        work(next(stream))
        sync(device)
    warmup_s = time.perf_counter() - started
    if not fixed:
        steps = max(1, min(steps, int(WINDOW_S / (time.perf_counter() - last))))
    rates, step_ms = [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        images = sum(work(next(stream)) for _ in range(steps))
        sync(device)
        seconds = time.perf_counter() - t0
        rates.append(images / seconds)
        step_ms.append(1000 * seconds / steps)
    return {"img_per_s": statistics.median(rates), "ms_per_step": statistics.median(step_ms),
            "runs_img_per_s": [round(r, 1) for r in rates], "steps": steps, "warmup_s": round(warmup_s, 2)}


def forever(loader):
    """Epoch after epoch, as training reads them."""
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


# ----------------------------------------------------------------------------- data
def prepare_images(args, tmp: Path):
    """(JPEG folder, shard folder, description): the same images for every loader."""
    quiet = contextlib.redirect_stdout(io.StringIO())
    if args.images is None:
        folder = tmp / "img_align_celeba"
        write_synthetic(folder, args.synthetic, seed=0, workers=os.cpu_count(), progress=True)
        source = f"{args.synthetic} synthetic faces (prep/synthetic.py, seed 0)"
    else:
        if not args.images.is_dir():
            sys.exit(f"error: --images {args.images} is not a folder")
        files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if args.limit:
            files = files[:args.limit]
        if not files:
            sys.exit(f"error: --images {args.images} holds no .jpg files")
        folder = tmp / "img_align_celeba"  # links, so the seed reads exactly the files that are sharded
        folder.mkdir()
        for f in files:
            (folder / f.name).symlink_to(f.resolve())
        source = f"{len(files)} JPEGs from {args.images}"
    with quiet:
        rc = shard.main(["--data-path", str(folder), "--output-dir", str(tmp / "shards"), "--quiet"])
    if rc:
        sys.exit("error: prep/shard.py failed on the benchmark images")
    return folder, tmp / "shards", source


def loader_skip_reason(name, args):
    if name not in args.loaders:
        return "not in --loaders"
    cuda = args.device.type == "cuda"
    if name == "torch-cpu-decode" and not cuda:
        return "the torch loader always decodes on the CPU without CUDA: that is the `torch` row"
    if name == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return f"NVIDIA DALI is not installed ({DALI_INSTALL})"
    return None


def make_loader(name, folder, shards, args):
    if name == "seed":
        return seed_loader(folder, args)
    options = {"gpu_decode": False} if name == "torch-cpu-decode" else {"source": "torch"} if name == "cache" else {}
    return build_loader(name if name in ("dali", "cache") else "torch", shards, "train", args.batch_size,
                        args.device, workers=args.workers, crop=args.crop, **options)


def fill_figures(loader) -> dict:
    """The one fill pass of a `cache` loader: seconds and images/s."""
    return {"fill_s": loader.cache.seconds, "fill_img_per_s": len(loader.cache) / loader.cache.seconds}


# ----------------------------------------------------------------------------- training modes
def modes_for(args):
    """mode -> TrainStep settings, or a string saying why the mode is skipped here."""
    cuda = args.device.type == "cuda"
    default_amp, why = resolve_amp("auto", args.device)
    modes = {
        "fp32": dict(amp="off", channels_last=False),
        "channels_last": dict(amp="off", channels_last=True),
        "bf16": dict(amp="bf16", channels_last=True),
        "fp16": dict(amp="fp16", channels_last=True),
        "compile": dict(amp="off", channels_last=True, compile=True),
        "bf16+compile": dict(amp="bf16", channels_last=True, compile=True),
        "compile-cudagraphs": dict(amp=default_amp, channels_last=True, compile=True, compile_mode="reduce-overhead"),
        "default": dict(amp=default_amp, channels_last=True,  # train.py's choices
                        compile=resolve_compile(None, args.device, default_amp)[0]),
    }
    if not cuda:
        if args.quick:  # compiling takes 10-25 s on a CPU: of the compiled modes, only train.py's own is timed
            for mode in ("compile", "bf16+compile"):
                if full_settings(modes[mode]) != full_settings(modes["default"]):
                    modes[mode] = "--quick skips it: about 20 s of compiling on a CPU"
        modes["fp16"] = "fp16 with a GradScaler is a CUDA mode"
        modes["compile-cudagraphs"] = "CUDA graphs need CUDA"
    if args.no_compile:
        for mode, settings in modes.items():
            if isinstance(settings, dict) and settings.get("compile"):
                if mode == "default":
                    modes[mode] = {**settings, "compile": False}
                else:
                    modes[mode] = "--no-compile"
    if default_amp != "bf16":  # bf16 where train.py would not pick it: timed all the same, for comparison
        if isinstance(modes["bf16+compile"], dict):
            modes["bf16+compile"] = f"train.py would not use bf16 here: {why}"
        if cuda:
            modes["bf16"] = why
    return modes


def full_settings(settings: dict) -> dict:
    """TrainStep's settings with its defaults filled in, so that equal steps compare equal."""
    return {"compile": False, "compile_mode": None, **settings}


def same_settings(modes, mode):
    """An earlier mode with the very same settings: measured once, reported under both names."""
    for other, settings in modes.items():
        if other == mode:
            return None
        if isinstance(settings, dict) and full_settings(settings) == full_settings(modes[mode]):
            return other
    return None


STEPS: dict = {}  # one TrainStep per settings: each mode is compiled once, and rows that train alike share it


def project_step(settings, device):
    key = (str(device), tuple(sorted(full_settings(settings).items())))
    if key not in STEPS:
        model = VariationalAutoEncoder().to(
            device, memory_format=torch.channels_last if settings["channels_last"] else torch.contiguous_format)
        step = TrainStep(model, make_optimizer(model.parameters(), 3e-4, device), device, **settings)

        def work(images):
            step(images)
            return len(images)
        STEPS[key] = work
    return STEPS[key]


# ----------------------------------------------------------------------------- report
def fmt_rate(row):
    return f"{row['img_per_s']:>9,.0f}" if "img_per_s" in row else f"{'-':>9}"


def fmt_duration(seconds):
    """Seconds in the unit that keeps two or three significant digits: 8.4 s, 95 s, 12.5 min, 2.9 h."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def report(results):
    env, lines = results["env"], []
    lines.append(f"{env['device_name']} | batch {env['batch_size']} | workers {env['workers']} | {env['images']}")
    if results.get("interrupted"):
        lines.append(f"STOPPED during {results['interrupted']}: the rows below finished before it")
    lines.append("")
    lines.append(f"{'loader (batches on the device)':<40}{'img/s':>9}  {'vs seed':>8}")
    for name, row in results["loaders"].items():
        extra = f"{row['vs_seed']:>7.2f}x" if "vs_seed" in row else f"{'':>8}"
        note = f"  skipped: {row['skipped']}" if "skipped" in row else f"  {row['dtype']}"
        if "fill_s" in row:
            note += (f", {row['img_per_s'] / env['batch_size']:,.0f} batches/s; filled once in {row['fill_s']:.1f} s "
                     f"({row['fill_img_per_s']:,.0f} img/s)")
        lines.append(f"  {name:<38}{fmt_rate(row)}  {extra}{note}")
    lines.append("")
    lines.append(f"{'training step (batches in memory)':<40}{'img/s':>9}  {'ms/step':>8}")
    for mode, row in results["train_step"].items():
        ms = f"{row['ms_per_step']:>8.1f}" if "ms_per_step" in row else f"{'':>8}"
        note = f"  skipped: {row['skipped']}" if "skipped" in row else (f"  (= {row['same_as']})" if "same_as" in row else "")
        if row.get("cudagraph_skips"):
            note += f"  CUDA graphs skipped {row['cudagraph_skips']} time(s): partly plain compile"
        lines.append(f"  {mode:<38}{fmt_rate(row)}  {ms}{note}")
    lines.append("")
    lines.append(f"{'end to end (loader -> step)':<40}{'img/s':>9}  {'vs seed':>8}  {'of ceiling':>10}  "
                 f"{EPOCHS} epochs of CelebA")
    for name, row in results["end_to_end"].items():
        if "skipped" in row:
            lines.append(f"  {name:<38}{fmt_rate(row)}  skipped: {row['skipped']}")
            continue
        vs = f"{row['vs_seed']:>7.2f}x" if "vs_seed" in row else f"{'':>8}"
        lines.append(f"  {name + ' (' + row['mode'] + ')':<38}{fmt_rate(row)}  {vs}  "
                     f"{row['fraction_of_ceiling']:>10.0%}  {fmt_duration(row['projected_40_epochs_s'])}"
                     + (" (one fill pass included)" if "fill_s" in row else ""))
    return "\n".join(lines)


def write_json(path, results):
    if path is not None:
        atomic_write(path, (json.dumps(results, indent=1) + "\n").encode())


def environment(args, source, num_images):
    try:
        import nvidia.dali  # here: DALI is optional and heavy; the version is all this needs
        dali = nvidia.dali.__version__
    except ImportError:
        dali = None
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), cpu)
    cuda = args.device.type == "cuda"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "dali": dali, "webdataset": webdataset.__version__,
        "pillow": PIL.__version__, "simplejpeg": simplejpeg.__version__, "device": str(args.device),
        "device_name": torch.cuda.get_device_name(args.device) if cuda else f"CPU ({cpu}, {os.cpu_count()} cores)",
        "cuda": torch.version.cuda if cuda else None, "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "workers": args.workers, "crop": args.crop, "images": source,
        "num_images": num_images, "quick": args.quick, "repeats": args.repeats, "steps": args.steps,
        "no_compile": args.no_compile,
    }


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    results = {"env": {}, "loaders": {}, "train_step": {}, "end_to_end": {}}
    current = ["preparing the images"]  # the row under way, for the record when it is stopped
    bar = None
    try:
        with tempfile.TemporaryDirectory(prefix="vae-bench-") as tmp:
            folder, shards, source = prepare_images(args, Path(tmp))
            num_images = len(os.listdir(folder))
            results["env"] = environment(args, source, num_images)
            write_json(args.json, results)
            bar = measure(args, folder, shards, results, current)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        results["interrupted"] = current[0]
        write_json(args.json, results)
        print(report(results) if results["env"] else f"STOPPED while {current[0]}: no row finished")
        if args.json:
            print(f"\nwrote {args.json} (stopped during {current[0]})")
        return 130
    print(report(results))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


def measure(args, folder, shards, results, current):
    """Every row, each one's figures written to --json as soon as it is measured; returns the progress bar."""
    device = args.device
    modes = modes_for(args)
    skips = {name: loader_skip_reason(name, args) for name in LOADER_NAMES}
    runnable = [name for name in LOADER_NAMES if skips[name] is None]
    todo = len(runnable) * 2 + 1 + sum(isinstance(m, dict) for m in modes.values())
    bar = tqdm(total=todo, desc="benchmark", unit="row", file=sys.stderr, dynamic_ncols=True)

    def run_row(label, fn):
        current[0] = label
        bar.set_postfix_str(label)
        try:
            return fn()
        finally:
            bar.update()

    def done():
        write_json(args.json, results)

    # 2. training step on batches in memory: real faces, a few distinct batches cycled. First: the rows
    # a short run most needs, and each mode's compile happens here, once.
    current[0] = "reading the step's batches"
    source_loader = build_loader("torch", shards, "train", args.batch_size, device, workers=0, crop=args.crop)
    batches = list(itertools.islice(forever(source_loader), 4))
    warmup = 2 if device.type == "cpu" else 10
    e2e_warmup = 8 if device.type == "cpu" else 20  # until the loader's prefetch queue has filled
    results["train_step"]["seed"] = run_row("step seed", lambda: timed(
        itertools.cycle([b.float().div(255).contiguous() for b in batches]), seed_step(device),
        warmup=warmup, steps=args.steps, repeats=args.repeats, device=device))
    done()
    for mode, settings in modes.items():
        if isinstance(settings, str):
            results["train_step"][mode] = {"skipped": settings}
            continue
        twin = same_settings(modes, mode)
        if twin:
            results["train_step"][mode] = {**results["train_step"][twin], "same_as": twin}
            bar.update()
            done()
            continue
        skipped_graphs = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
        # Compiled modes warm up longer: on the 2-core CPU, one run's windows right after compiling were
        # still rising (benchmarks/RESULTS.md), so 2 untimed steps were not enough there.
        row = run_row(f"step {mode}", lambda: timed(
            itertools.cycle(batches), project_step(settings, device),
            warmup=warmup * (4 if settings.get("compile") else 1), steps=args.steps, repeats=args.repeats,
            device=device))
        if settings.get("compile_mode") == "reduce-overhead":
            # Inductor falls back to plain compiled kernels, with a log line, where it cannot graph.
            row["cudagraph_skips"] = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skipped_graphs
        results["train_step"][mode] = {**row, "settings": settings}
        done()

    # 1. loaders
    for name in LOADER_NAMES:
        if skips[name]:
            results["loaders"][name] = {"skipped": skips[name]}
            continue
        current[0] = f"loader {name} (building it)"
        loader = make_loader(name, folder, shards, args)
        def ready(images):
            images.to(device, non_blocking=True)  # the project's loaders are there already
            return len(images)
        stream = forever(loader)
        # Whole epochs, starts included: one untimed, then one per window.
        epoch = len(loader)
        results["loaders"][name] = run_row(f"loader {name}", lambda: timed(
            stream, ready, warmup=epoch, steps=epoch, repeats=args.repeats, device=device, fixed=True))
        results["loaders"][name]["dtype"] = "float32" if name == "seed" else "uint8"
        if name == "cache":
            results["loaders"][name].update(fill_figures(loader))
        stream.close()
        done()
    if "img_per_s" in results["loaders"].get("seed", {}):
        for row in results["loaders"].values():
            if "img_per_s" in row:
                row["vs_seed"] = row["img_per_s"] / results["loaders"]["seed"]["img_per_s"]
        done()

    # 3. end to end: each loader feeding the default step (the seed's loader feeding the seed's step)
    for name in LOADER_NAMES:
        if skips[name]:
            results["end_to_end"][name] = {"skipped": skips[name]}
            continue
        mode = "seed" if name == "seed" else "default"
        work = seed_step(device) if name == "seed" else project_step(modes["default"], device)
        current[0] = f"end to end {name} (building the loader)"
        loader = make_loader(name, folder, shards, args)
        stream = forever(loader)
        row = run_row(f"end to end {name}", lambda: timed(
            stream, work, warmup=e2e_warmup, steps=args.steps, repeats=args.repeats, device=device))
        stream.close()
        row["mode"] = mode
        row["fraction_of_ceiling"] = row["img_per_s"] / results["train_step"][mode]["img_per_s"]
        row["projected_40_epochs_s"] = EPOCHS * CELEBA_TRAIN / row["img_per_s"]
        row["projection_counts"] = "the steps" + (" and one fill pass" if name == "cache" else "")
        if name == "cache":  # and the one pass that fills it
            row.update(fill_figures(loader))
            row["projected_40_epochs_s"] += CELEBA_TRAIN / row["fill_img_per_s"]
        results["end_to_end"][name] = row
        done()
    bar.close()
    seed_e2e = results["end_to_end"].get("seed", {}).get("img_per_s")
    if seed_e2e:
        for row in results["end_to_end"].values():
            if "img_per_s" in row:
                row["vs_seed"] = row["img_per_s"] / seed_e2e
    done()
    return bar


if __name__ == "__main__":
    rc = main()
    if rc == 130:  # stopped: what was measured is written; do not wait seconds for loader workers to wind down
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
