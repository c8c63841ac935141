"""The GPU check's results: one JSON file that each stage adds its part to as it ends, the projection of
40 CelebA epochs made from what the answer stage measured, the lines of summary.txt, and the limits on
the files that come back from the machine.

    python benchmarks/report.py summary RESULTS.json STAGES.txt SUMMARY.txt   # projection first, then stages
    python benchmarks/report.py fit OUTDIR                                    # at most 8 files of 16 MiB
    python benchmarks/report.py bench throughput.json                         # its rows, in one line
    python benchmarks/report.py skip-graph RESULTS.json        # status 0: skipped, train.py has no --cuda-graph

Imports neither torch nor numpy: benchmarks/gpu_check.sh calls it after every stage.
"""

import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.files import atomic_write  # noqa: E402

EPOCHS = 40  # the seed's run
SEED_BATCH = 128
# The parts of a projected run, in the order they happen; their sum is the projection.
PARTS = ("fill_train", "fill_val", "compile", "steps", "evaluation", "checkpoints", "pictures", "other")
MAX_FILES, MAX_BYTES = 8, 16 << 20  # what comes back from the GPU machine
NO_CUDA_GRAPH = "train.py --help lists no --cuda-graph flag"
NAME = re.compile(r"[A-Za-z0-9._-]+")


# ----------------------------------------------------------------------------- the results file


def read(path) -> dict:
    """The results so far; {} when the file is missing or was cut short (a stage killed mid-write cannot
    leave it so, as every write is atomic, but a file from elsewhere might)."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def merge(path, key: str, value) -> dict:
    """results[key] = value, written atomically: a stage that is stopped leaves the file as it was."""
    results = read(path)
    results[key] = value
    atomic_write(path, (json.dumps(results, indent=1) + "\n").encode())
    return results


# ----------------------------------------------------------------------------- the projection


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else 0.0


def project(run: dict, sizes: dict[str, int] | None = None, epochs: int = EPOCHS) -> dict:
    """Seconds that `epochs` epochs of train.py over splits of `sizes` (CelebA's) take, from one measured run.

    `run` holds what the answer stage measured: batch_size, train_images and val_images (the run's
    resident splits), compile_s, final_s (samples, interpolations and weights after the last epoch),
    fill {split: {images, seconds, cached}} (the fill's own decode of the JPEG shards) and epochs, a list
    of {steps_s, eval_s, checkpoint_s, figures_s, wall_s}. Epoch 1 is counted as it ran (minus the
    compile, reported apart); each further epoch as the median of the run's later epochs. Steps scale
    with the number of training steps, evaluation with the validation images (exact when the run used
    CelebA's counts); fills are the split's images at the fill's measured rate."""
    if sizes is None:
        from prep.shard import CELEBA_SPLIT
        sizes = CELEBA_SPLIT
    rows = run["epochs"]
    if not rows:
        raise ValueError("no epoch was measured")
    first, later = rows[0], rows[1:] or rows[:1]
    batch = run["batch_size"]
    k_steps = (sizes["train"] // batch) / max(1, run["train_images"] // batch)
    k_val = sizes["val"] / max(1, run["val_images"])
    compile_s = run.get("compile_s") or 0.0

    def each(key, scale=1.0, first_less=0.0):
        return ((first.get(key, 0.0) - first_less) + (epochs - 1) * median(r.get(key) for r in later)) * scale

    def fill(split):
        part = run.get("fill", {}).get(split)
        if not part or not part.get("cached") or not part.get("seconds"):
            return 0.0  # streamed: its decoding is inside the evaluation's time
        return sizes[split] / (part["images"] / part["seconds"])

    parts = {
        "fill_train": fill("train"),
        "fill_val": fill("val"),
        "compile": compile_s,
        "steps": each("steps_s", k_steps, first_less=compile_s),
        "evaluation": each("eval_s", k_val),
        "checkpoints": each("checkpoint_s"),
        "pictures": each("figures_s") + run.get("final_s", 0.0),
        "other": each("other_s"),
    }
    steady = {key: median(r.get(key) for r in later) for key in ("steps_s", "eval_s", "checkpoint_s", "figures_s",
                                                                    "other_s", "wall_s")}
    steady["steps_s"] *= k_steps
    steady["eval_s"] *= k_val
    return {
        "epochs": epochs, "batch_size": batch, "train_images": sizes["train"], "val_images": sizes["val"],
        "total_s": round(sum(parts.values()), 3), "parts_s": {k: round(v, 3) for k, v in parts.items()},
        "per_later_epoch_s": {k: round(v, 4) for k, v in steady.items()},
        "steps_img_per_s": round(sizes["train"] // batch * batch / steady["steps_s"], 1) if steady["steps_s"] else None,
        "measured_epochs": len(rows), "scaled_from": {"train_images": run["train_images"],
                                                      "val_images": run["val_images"]},
    }


def projection_lines(results: dict) -> list[str]:
    """summary.txt's first lines: the projection in seconds and where the time goes."""
    answer = results.get("answer", {})
    projection = answer.get("projection")
    device = results.get("smoke", {}).get("versions", {}).get("device_name") or answer.get("device", "this device")
    if not projection:
        why = answer.get("error") or "the answer stage did not finish (see answer.log)"
        return [f"40 CelebA epochs: not projected: {why}"]
    p, parts = projection, projection["parts_s"]
    batch = p["batch_size"]
    lines = [f"{p['epochs']} CelebA epochs ({p['train_images']:,} training images, batch {batch}"
             f"{'' if batch == SEED_BATCH else f', not the seed 128'}) on {device}: {p['total_s']:.1f} s projected"]
    lines.append("  = " + " + ".join(f"{name.replace('_', ' ')} {parts[name]:.1f} s" for name in PARTS))
    fills = answer.get("fill", {})
    if fills:
        lines.append("  fills at the rate measured on the shards' JPEGs: " + ", ".join(
            f"{split} {f['images'] / f['seconds']:,.0f} img/s ({f.get('source', 'decoded')}, {f['images']:,} images)"
            for split, f in fills.items() if f.get("seconds")))
    steady = p["per_later_epoch_s"]
    rate = f" ({p['steps_img_per_s']:,.0f} img/s)" if p.get("steps_img_per_s") else ""
    lines.append(f"  each epoch after the first: steps {steady['steps_s']:.2f} s{rate}, evaluation "
                 f"{steady['eval_s']:.2f} s, checkpoint {steady['checkpoint_s']:.2f} s, pictures "
                 f"{steady['figures_s']:.2f} s, other {steady['other_s']:.2f} s; from {p['measured_epochs']} "
                 f"epochs of train.py --cache on over {p['scaled_from']['train_images']:,} resident training images")
    smoke_step = results.get("smoke", {}).get("step", {})
    if answer.get("compiled") is False:
        lines.append(f"  compile: off in this run; {parts['compile']:.1f} s is the first step's warm-up")
    elif smoke_step.get("compile") and smoke_step.get("first_call_s") is not None:
        lines.append(f"  compile: {parts['compile']:.1f} s in the run ({answer.get('compile_how', '')}), with inductor's "
                     f"on-disk caches as the smoke stage's first compiled step ({smoke_step['first_call_s']:.1f} s) "
                     "left them")
    graph = results.get("graph", {})
    if graph.get("projection"):
        verdict = graph.get("comparison", {}).get("verdict", "not compared")
        lines.append(f"  with --cuda-graph on: {graph['projection']['total_s']:.1f} s projected; {verdict}")
    elif graph.get("skipped"):
        lines.append(f"  --cuda-graph: {graph['skipped']}")
    return lines


def write_summary(results_path, stages_path, summary_path) -> None:
    stages = Path(stages_path).read_text() if Path(stages_path).exists() else ""
    text = "\n".join(projection_lines(read(results_path))) + "\n\n" + stages
    atomic_write(summary_path, text.encode())


# ----------------------------------------------------------------------------- what comes back


def fit(folder, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES) -> list[str]:
    """Keeps `folder` within the limits on what comes back: files cut to `max_bytes` (the head and the
    tail kept, a line between them says how much was left out); returns the problems left (too many
    files, a folder inside, a name with other characters), which the caller reports."""
    problems = []
    entries = sorted(Path(folder).iterdir())
    for path in entries:
        if not NAME.fullmatch(path.name):
            problems.append(f"{path.name!r}: a name with characters other than letters, digits, '.', '_', '-'")
        if path.is_symlink() or not path.is_file():
            problems.append(f"{path.name}: not a plain file")
            continue
        size = path.stat().st_size
        if size > max_bytes:
            keep = max_bytes // 2 - 256
            data = path.read_bytes()
            marker = f"\n[... {size - 2 * keep:,} bytes left out to keep this file under {max_bytes:,} ...]\n"
            atomic_write(path, data[:keep] + marker.encode() + data[-keep:])
    if len(entries) > max_files:
        problems.append(f"{len(entries)} files, more than the {max_files} that come back")
    return problems


def bench_line(path) -> str:
    """One line on benchmarks/throughput.py's JSON: the rows measured in each section, and where it stopped."""
    results = read(path)
    if not results:
        return f"{Path(path).name}: missing or not JSON"
    counts = []
    for section in ("train_step", "loaders", "end_to_end"):
        rows = results.get(section, {})
        measured = sum("img_per_s" in row for row in rows.values())
        counts.append(f"{section} {measured} measured, {sum('skipped' in row for row in rows.values())} skipped")
    stopped = f"; stopped during {results['interrupted']}" if results.get("interrupted") else "; complete"
    return f"{Path(path).name}: " + ", ".join(counts) + stopped


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"] and len(argv) == 2:
        print(bench_line(argv[1]))
        return 0
    if argv[:1] == ["skip-graph"] and len(argv) == 2:
        # The answer run found no --cuda-graph: the graph stage is recorded as skipped without starting torch.
        if read(argv[1]).get("answer", {}).get("has_cuda_graph") is not False:
            return 1
        merge(argv[1], "graph", {"skipped": NO_CUDA_GRAPH})
        print(NO_CUDA_GRAPH)
        return 0
    if argv[:1] == ["summary"] and len(argv) == 4:
        write_summary(*argv[1:])
        return 0
    if argv[:1] == ["fit"] and len(argv) == 2:
        problems = fit(argv[1])
        for problem in problems:
            print(f"results: {problem}", file=sys.stderr)
        return 1 if problems else 0
    print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
