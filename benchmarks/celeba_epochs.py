"""train.py itself, for a few epochs, over resident splits of CelebA's size, each epoch's time split into parts.

    python benchmarks/celeba_epochs.py --data-path SHARDS --output-dir DIR --json results.json [train.py flags]

CelebA's 202,599 JPEGs are not needed to time what train.py does with them once they are resident:
with --cache on, every epoch reads one (N, 64, 64, 3) uint8 tensor on the device, and the steps,
evaluation, checkpoints and pictures do not depend on which faces it holds. So this script runs
train.py's own `run()` in this process with two benchmark-only substitutions, made from outside
(train.py is not changed):

- `train.split_size` answers CelebA's split sizes (162,770 train, 19,867 val), so that the cache plan
  (`--cache on`: an error if they do not fit) reserves for the real thing;
- `train.build_loader("cache", ...)` first fills the split from SHARDS (a few thousand real JPEGs) the
  way train.py would, which measures the fill's decode rate, then tiles those decoded faces to the
  split's CelebA size on the device and serves that with the project's CachedLoader. The tiles keep
  the fill's source: "decoded", or "loaded" when the decoded file beside SHARDS (written by an
  earlier run, --cache-file auto) was read instead.

The fill is timed from its first batch: the time to the first batch (the loader's workers starting,
one batch decoded) is counted once, the rest at the rate measured after it, so a fill of a few
thousand images projects CelebA's without counting the start-up 50 times over. The write of the
decoded file (pipeline/cache.py `save_file`) is timed and counted by its bytes. The compile is
recorded with where it happened: inside epoch 1 (the ordinary step compiles on its first call) or
before it (--cuda-graph on warms up and captures before epoch 1, and metrics.jsonl's first row has
compile_s), so that the projection takes it out of epoch 1's steps only when it was in them.

Everything else is train.py's: the device setup, compile, the epoch loop, evaluation, reconstructions,
curves, checkpoints, metrics.jsonl, samples and interpolations. Each part's time is read from
metrics.jsonl where train.py records it ("seconds", and "eval_s", "checkpoint_s", "figures_s",
"compile_s", "fill_s" where present) and otherwise timed here around train.py's own functions (wall time on
the training thread; each of them ends by reading the GPU's results, so no time is lost between
parts). The projection (benchmarks/report.py) adds them up for 40 epochs, with the fills at the
measured decode rate, and goes into --json under --key.

`--graphed` adds `--cuda-graph on` when train.py has that flag (and `--cuda-graph off` is added
otherwise, so the two runs differ in that alone); with `--compare KEY` the losses and weights are
compared with the run stored under KEY.
"""

import argparse
import contextlib
import io
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

import pipeline.cache  # noqa: E402
import train  # noqa: E402
from benchmarks import report  # noqa: E402
from model import figures  # noqa: E402
from model.step import resolve_amp, resolve_compile  # noqa: E402
from pipeline.cache import Cache, CachedLoader  # noqa: E402
from common.celeba import CELEBA_SPLIT  # noqa: E402
from run import record  # noqa: E402
from run.folder import METRICS  # noqa: E402

LOSS_BOUND = 0.02  # relative difference of the validation loss, each epoch, that a graphed run may show


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", type=Path, required=True, help="shards made by prep/shard.py (a few thousand JPEGs)")
    p.add_argument("--output-dir", type=Path, required=True, help="train.py's --output-dir: a new folder")
    p.add_argument("--json", type=Path, required=True, help="the results file this run's part is merged into")
    p.add_argument("--key", default="answer", help="the name of this run's part in --json (default: answer)")
    p.add_argument("--epochs", type=int, default=3, help="epochs to run (default: 3; the first holds the compile)")
    p.add_argument("--train-images", type=int, default=CELEBA_SPLIT["train"],
                   help=f"resident training images (default: CelebA's {CELEBA_SPLIT['train']:,})")
    p.add_argument("--val-images", type=int, default=CELEBA_SPLIT["val"],
                   help=f"resident validation images (default: CelebA's {CELEBA_SPLIT['val']:,})")
    p.add_argument("--graphed", action="store_true", help="run with --cuda-graph on, if train.py has that flag")
    p.add_argument("--compare", metavar="KEY", help="compare losses and weights with the run stored under KEY")
    args, train_flags = p.parse_known_args(argv)
    for flag in ("--cache", "--resume", "--data-path", "--output-dir", "--epochs"):
        if any(f == flag or f.startswith(flag + "=") for f in train_flags):
            p.error(f"{flag} is this script's to set")
    if args.epochs < 1 or args.train_images < 1 or args.val_images < 1:
        p.error("--epochs, --train-images and --val-images must be at least 1")
    args.train_flags = train_flags
    return args


def train_flags_of() -> str:
    """train.py's --help text."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        train.parse_args(["--help"])
    return out.getvalue()


# ----------------------------------------------------------------------------- the substitutions


def tiled(cache: Cache, n: int) -> Cache:
    """A Cache of `n` rows on the same device: the decoded faces of `cache`, repeated in order, with its
    fill's time and source (decoded, or loaded from the decoded file)."""
    rows = torch.arange(n, device=cache.images.device) % len(cache)
    keys = [f"{cache.keys[i % len(cache)]}.{i // len(cache)}" for i in range(n)]
    return Cache(cache.images.index_select(0, rows), keys, decoded=cache.decoded, seconds=cache.seconds,
                 source=cache.source, file_note=cache.file_note)


class FirstBatch:
    """A fill's reader, passed through, that notes when its first batch arrived and how many images it held."""

    def __init__(self, reader, started: float, seen: dict):
        self.reader, self.started, self.seen = reader, started, seen

    def __len__(self):
        return len(self.reader)

    def __iter__(self):
        for i, batch in enumerate(self.reader):
            if i == 0:
                self.seen.update(first_batch_s=time.perf_counter() - self.started, first_batch_images=len(batch[0]))
            yield batch


class Recorder:
    """Installs the substitutions and the timers into train.py's namespace, and keeps what they saw."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes, self.fills, self.events = sizes, {}, []  # events: (name, epoch index, start, seconds)
        self.epoch_starts, self.first_step_s, self.first_step_started, self.ended = [], None, None, None
        self.started, self.tiling_s, self.seen = None, 0.0, {}  # seen: the fill being made, as it goes

    def patches(self):
        real_build = train.build_loader

        def split_size(data_path, split):
            return self.sizes[split]

        def build_loader(name, data_path, split, batch_size, device, **options):
            if name != "cache":
                return real_build(name, data_path, split, batch_size, device, **options)
            self.seen = {}
            filled = real_build("cache", data_path, split, batch_size, device, **options)
            cache = filled.cache
            self.fills[split] = {"images": len(cache), "seconds": cache.seconds, "cached": True,
                                 "img_per_s": len(cache) / cache.seconds, "source": cache.source, **self.seen}
            started = time.perf_counter()
            big = tiled(cache, self.sizes[split])
            sync(big.images.device)
            self.tiling_s += time.perf_counter() - started
            train_mode = options.get("train", split == "train")
            train_mode = split == "train" if train_mode is None else train_mode
            return CachedLoader(big, batch_size, train=train_mode, rank=options.get("rank", 0),
                                world_size=options.get("world_size", 1), seed=options.get("seed", 0),
                                flip=options.get("flip"), with_keys=options.get("with_keys", False))

        def timed(name, fn):
            def wrapper(*a, **k):
                started = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    self.events.append((name, len(self.epoch_starts) - 1, started, time.perf_counter() - started))
            return wrapper

        def epoch(fn):
            def wrapper(*a, **k):
                self.epoch_starts.append(time.perf_counter())
                return fn(*a, **k)
            return wrapper

        real_fill, real_save = pipeline.cache.fill, pipeline.cache.save_file

        def fill(reader, *a, **k):  # the decode's first batch, noted on the way through
            return real_fill(FirstBatch(reader, time.perf_counter(), self.seen), *a, **k)

        def save_file(path, images, *a, **k):  # the decoded file's write, timed, with its bytes
            started = time.perf_counter()
            try:
                return real_save(path, images, *a, **k)
            finally:
                self.seen.update(write_s=time.perf_counter() - started,
                                 write_bytes=Path(path).stat().st_size if Path(path).is_file() else 0)

        recorder = self

        class FirstStepTimed(train.TrainStep):
            """The first call holds the compile: timed, the device synchronised on both sides."""

            def __call__(self, images):
                if recorder.first_step_s is not None:
                    return super().__call__(images)
                sync(self.device)
                started = recorder.first_step_started = time.perf_counter()
                out = super().__call__(images)
                sync(self.device)
                recorder.first_step_s = time.perf_counter() - started
                return out

        essential = [("split_size", split_size), ("build_loader", build_loader)]
        patches = [mock.patch.object(train, name, value) for name, value in essential]
        patches += [mock.patch.object(train, "train_one_epoch", epoch(train.train_one_epoch)),
                    mock.patch.object(train, "TrainStep", FirstStepTimed)]
        # Where train.py's run calls each timed part: the module whose attribute it reads.
        homes = {"evaluate": train, "save_curves": figures, "save_samples": figures, "save_interpolations": figures,
                 "save_weights": record}
        patches += [mock.patch.object(home, name, timed(name, getattr(home, name))) for name, home in homes.items()]
        patches += [mock.patch.object(pipeline.cache, "fill", fill),
                    mock.patch.object(pipeline.cache, "save_file", save_file)]
        return patches

    def seconds(self, epoch: int, *names) -> float:
        return sum(s for name, e, _, s in self.events if e == epoch and name in names)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the epochs


def read_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def epoch_parts(recorder: Recorder, rows: list[dict]) -> tuple[list[dict], dict]:
    """Per epoch: steps, evaluation, checkpoint, pictures and the rest of its wall time; and where each
    figure came from (train.py's metrics.jsonl or this script's timers)."""
    epochs, source = [], {}
    starts = recorder.epoch_starts + [recorder.ended]
    finals = [start for name, _, start, _ in recorder.events if name == "save_samples"]
    if finals:
        starts[-1] = min(finals)
    for i, row in enumerate(rows[:len(recorder.epoch_starts)]):
        mine = {"eval_s": recorder.seconds(i, "evaluate"), "checkpoint_s": recorder.seconds(i, "save_checkpoint"),
                "figures_s": recorder.seconds(i, "save_reconstructions", "save_curves")}
        part = {"epoch": row.get("epoch", i + 1), "steps_s": row["seconds"]}
        for key, value in mine.items():
            part[key] = row[key] if isinstance(row.get(key), (int, float)) else value
            source[key] = "metrics.jsonl" if isinstance(row.get(key), (int, float)) else "benchmark timers"
        part["wall_s"] = starts[i + 1] - starts[i]
        part["other_s"] = part["wall_s"] - sum(part[k] for k in ("steps_s", "eval_s", "checkpoint_s", "figures_s"))
        part["train_loss"], part["val_loss"] = row.get("train_loss"), row.get("val_loss")
        epochs.append({k: round(v, 4) if isinstance(v, float) else v for k, v in part.items()})
    source["steps_s"] = "metrics.jsonl"
    return epochs, source


def compile_seconds(recorder: Recorder, rows: list[dict], epochs: list[dict], batch: int, train_images: int):
    """(seconds, how, where): train.py's compile_s where it records one (the warm-up and capture of
    --cuda-graph, before epoch 1); else the first step's time less a later step's; else the first epoch's
    steps less a later epoch's. `where` is "before epoch 1" or "epoch 1": whether epoch 1's steps hold it."""
    first_call_before = (recorder.first_step_started is not None and recorder.epoch_starts
                         and recorder.first_step_started < recorder.epoch_starts[0])
    if rows and isinstance(rows[0].get("compile_s"), (int, float)):
        return rows[0]["compile_s"], "metrics.jsonl compile_s", "before epoch 1"
    later = report.median(e["steps_s"] for e in epochs[1:])
    if recorder.first_step_s is not None and later:
        step = later / max(1, train_images // batch)
        return (max(0.0, recorder.first_step_s - step), "the first step's time less a later step's",
                "before epoch 1" if first_call_before else "epoch 1")
    if len(epochs) > 1:
        return max(0.0, epochs[0]["steps_s"] - later), "the first epoch's steps less a later epoch's", "epoch 1"
    return None, "not measured: one epoch, and no compile_s in metrics.jsonl", None


def setup_seconds(recorder: Recorder, compile_s, where) -> float:
    """From train.py's start to epoch 1's, less the fills, the decoded files' writes, a compile made before
    epoch 1 and this script's tiling: the flags, the model, the cache plan, the preview batch."""
    if recorder.started is None or not recorder.epoch_starts:
        return 0.0
    spent = sum(f["seconds"] + f.get("write_s", 0.0) for f in recorder.fills.values()) + recorder.tiling_s
    if where == "before epoch 1":
        spent += compile_s or 0.0
    return max(0.0, recorder.epoch_starts[0] - recorder.started - spent)


def weights_difference(a: Path, b: Path) -> dict:
    wa, wb = torch.load(a, map_location="cpu"), torch.load(b, map_location="cpu")
    va = torch.cat([t.flatten().double() for k, t in sorted(wa.items()) if t.is_floating_point()])
    vb = torch.cat([t.flatten().double() for k, t in sorted(wb.items()) if t.is_floating_point()])
    return {"relative_l2": ((va - vb).norm() / va.norm()).item(),
            "cosine": torch.nn.functional.cosine_similarity(va, vb, dim=0).item()}


def compare(this: dict, other: dict) -> dict:
    """This run's losses and weights against another's (the ordinary step's), epoch by epoch."""
    pairs = list(zip(other.get("epochs", []), this.get("epochs", [])))
    diffs = [abs(b["val_loss"] - a["val_loss"]) / abs(a["val_loss"]) for a, b in pairs
             if a.get("val_loss") and b.get("val_loss") is not None]
    out = {"against": other.get("flags"), "val_loss_relative_differences": [round(d, 5) for d in diffs]}
    if other.get("weights") and this.get("weights") and Path(other["weights"]).is_file() and Path(this["weights"]).is_file():
        out["weights"] = weights_difference(Path(other["weights"]), Path(this["weights"]))
    if not diffs or any(math.isnan(d) for d in diffs):
        out["verdict"] = "not comparable: a run has no validation loss"
    else:
        worst = max(diffs)
        agrees = worst <= LOSS_BOUND
        out["agrees"] = agrees
        out["verdict"] = (f"validation loss within {worst:.2%} of the ordinary step's each epoch "
                          f"({'within' if agrees else 'OUTSIDE'} the {LOSS_BOUND:.0%} bound)")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit("error: run this on one process; the resident splits are tiled per process")
    flags = list(args.train_flags)
    has_cuda_graph = "--cuda-graph" in train_flags_of()
    if has_cuda_graph:
        flags += ["--cuda-graph", "on" if args.graphed else "off"]
    elif args.graphed:
        report.merge(args.json, args.key, {"skipped": report.NO_CUDA_GRAPH})
        print(f"skipped: {report.NO_CUDA_GRAPH}")
        return 0
    argv = ["--data-path", str(args.data_path), "--output-dir", str(args.output_dir), "--epochs", str(args.epochs),
            "--cache", "on", *flags]
    sizes = {"train": args.train_images, "val": args.val_images}
    print(f"train.py {' '.join(argv)}\n(resident splits: {sizes['train']:,} training and {sizes['val']:,} validation "
          f"images tiled from the faces decoded from {args.data_path}; train.py's 'cached' lines count the tiles, "
          "the decode rate is the fill's, recorded below)")
    recorder = Recorder(sizes)
    part = {"flags": flags, "command": "train.py " + " ".join(argv), "started": time.strftime("%H:%M:%S"),
            "has_cuda_graph": has_cuda_graph}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for patch in recorder.patches():
            stack.enter_context(patch)
        try:
            recorder.started = time.perf_counter()
            rc = train.run(argv)
        except KeyboardInterrupt:
            rc = 130
        recorder.ended = time.perf_counter()
    # What follows takes well under the seconds between the stage's SIGINT and its SIGKILL: let it finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    part["seconds"] = round(recorder.ended - started, 2)
    rows = read_rows(args.output_dir / METRICS)
    part.update(rc=rc, fill=recorder.fills, train_py_fill={k: rows[0][k] for k in ("fill_s", "fill_source")
                                                            if rows and k in rows[0]})
    if rc != 0:
        part["error"] = f"train.py returned {rc} after {len(rows)} epochs (see answer.log)"
    elif "train" not in recorder.fills:
        rc, part["error"] = 1, ("train.py did not build its training cache through build_loader('cache', ...): the run "
                                "was not over CelebA-sized resident splits, and its figures are not kept")
        rows = []
    if not rows:
        part.setdefault("error", "train.py wrote no metrics")
        report.merge(args.json, args.key, part)
        print(f"error: {part['error']}", file=sys.stderr)
        return rc or 1
    parsed = train.parse_args(argv)
    batch = parsed.batch_size
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if parsed.device == "auto" else parsed.device)
    compiled = resolve_compile(parsed.compile, device, resolve_amp(parsed.amp, device)[0])[0]
    epochs, source = epoch_parts(recorder, rows)
    compile_s, how, where = compile_seconds(recorder, rows, epochs, batch, sizes["train"])
    setup_s = setup_seconds(recorder, compile_s, where)
    final_s = sum(s for name, _, _, s in recorder.events if name in ("save_samples", "save_interpolations",
                                                                    "save_weights"))
    run = {"batch_size": batch, "train_images": sizes["train"], "val_images": sizes["val"], "compile_s": compile_s,
           "compile_where": where, "setup_s": setup_s, "final_s": final_s, "fill": recorder.fills, "epochs": epochs}
    part.update(batch_size=batch, train_images=sizes["train"], val_images=sizes["val"], compile_s=compile_s,
                compile_where=where, setup_s=round(setup_s, 3), tiling_s=round(recorder.tiling_s, 3),
                compiled=compiled, compile_how=how, first_step_s=recorder.first_step_s, final_s=round(final_s, 3), epochs=epochs,
                sources=source, weights=str(args.output_dir / train.WEIGHTS),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                projection=report.project(run))
    if args.compare:
        other = report.read(args.json).get(args.compare)
        part["comparison"] = compare(part, other) if other and other.get("epochs") else {
            "verdict": f"not compared: no finished run under {args.compare!r}"}
    report.merge(args.json, args.key, part)
    p = part["projection"]
    print(f"projection: {p['epochs']} epochs of CelebA in {p['total_s']:.1f} s: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in p["parts_s"].items()))
    for e in epochs:
        print(f"epoch {e['epoch']}: wall {e['wall_s']:.2f} s = steps {e['steps_s']:.2f} + evaluation {e['eval_s']:.2f} "
              f"+ checkpoint {e['checkpoint_s']:.2f} + pictures {e['figures_s']:.2f} + other {e['other_s']:.2f}")
    if "comparison" in part:
        print(f"--cuda-graph on against off: {part['comparison']['verdict']}")
    if rc != 0:  # the epochs that finished are measured and projected all the same
        print(f"error: {part['error']}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
