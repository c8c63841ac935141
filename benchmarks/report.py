"""The GPU check's results: one JSON file that each stage adds its part to as it ends, the projection of
40 CelebA epochs made from what the answer stage (cold: the first run on a machine) and the warm stage
(the decoded file present, the compile caches warm) measured, the lines of summary.txt, and the limits
on the files that come back from the machine.

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

from common.celeba import CELEBA_SPLIT  # noqa: E402
from common.files import atomic_write  # noqa: E402

EPOCHS = 40  # the seed's run
SEED_BATCH = 128
# The parts of a projected run, in the order they happen; their sum is the projection.
PARTS = ("setup", "fill_train", "fill_val", "write", "compile", "steps", "evaluation", "checkpoints", "pictures",
         "other")
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

    `run` holds what a stage measured: batch_size, train_images and val_images (the run's resident
    splits), compile_s and compile_where ("epoch 1" when the first step compiled inside epoch 1, "before
    epoch 1" when --cuda-graph's warm-up did), setup_s (train.py's start to epoch 1, less fills, writes
    and a compile before epoch 1), final_s (samples, interpolations and weights after the last epoch),
    fill {split: {images, seconds, cached, source, first_batch_s, first_batch_images, write_s}} and
    epochs, a list of {steps_s, eval_s, checkpoint_s, figures_s, other_s}. Epoch 1 is counted as it ran,
    less the compile only when the compile was inside it; the compile is its own part, so it is counted
    once either way. Each further epoch counts as the median of the run's later epochs. Steps scale with
    the number of training steps, evaluation with the validation images (exact when the run used
    CelebA's counts). A decoded fill is its time to the first batch (the workers' start, once) plus the
    split's other images at the rate measured after that batch; a loaded fill (the decoded file) and the
    file's write scale with the images."""
    if sizes is None:
        sizes = CELEBA_SPLIT
    rows = run["epochs"]
    if not rows:
        raise ValueError("no epoch was measured")
    first, later = rows[0], rows[1:] or rows[:1]
    batch = run["batch_size"]
    k_steps = (sizes["train"] // batch) / max(1, run["train_images"] // batch)
    k_val = sizes["val"] / max(1, run["val_images"])
    compile_s = run.get("compile_s") or 0.0
    in_epoch_1 = run.get("compile_where", "epoch 1") == "epoch 1"

    def each(key, scale=1.0, first_less=0.0):
        return ((first.get(key, 0.0) - first_less) + (epochs - 1) * median(r.get(key) for r in later)) * scale

    fills = run.get("fill", {})
    parts = {
        "setup": run.get("setup_s") or 0.0,
        "fill_train": fill_seconds(fills.get("train"), sizes["train"]),
        "fill_val": fill_seconds(fills.get("val"), sizes["val"]),
        "write": sum(write_seconds(fills.get(split), sizes[split]) for split in ("train", "val")),
        "compile": compile_s,
        "steps": each("steps_s", k_steps, first_less=compile_s if in_epoch_1 else 0.0),
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


def fill_seconds(fill: dict | None, images: int) -> float:
    """A split's fill projected to `images`: see project()."""
    if not fill or not fill.get("cached") or not fill.get("seconds"):
        return 0.0  # streamed: its decoding is inside the evaluation's time
    n, seconds = fill["images"], fill["seconds"]
    first_s, first_n = fill.get("first_batch_s"), fill.get("first_batch_images")
    if fill.get("source", "decoded") == "decoded" and first_s is not None and first_n and n > first_n \
            and seconds > first_s:
        return first_s + (images - first_n) * (seconds - first_s) / (n - first_n)
    return images * seconds / n  # loaded, or one batch: the whole time scales


def write_seconds(fill: dict | None, images: int) -> float:
    """The decoded file's write projected to `images` (12 kB each): 0 where none was written."""
    if not fill or not fill.get("write_s") or not fill.get("images"):
        return 0.0
    return fill["write_s"] * images / fill["images"]


def fill_note(fill: dict) -> str:
    source = fill.get("source", "decoded")
    if source != "decoded":
        how = f"{source} from the decoded file"
    elif fill.get("first_batch_images") and fill["images"] > fill["first_batch_images"] and \
            fill.get("seconds", 0) > fill.get("first_batch_s", 0):
        rate = (fill["images"] - fill["first_batch_images"]) / (fill["seconds"] - fill["first_batch_s"])
        how = f"decoded, {fill['first_batch_s']:.2f} s to the first batch, then {rate:,.0f} img/s"
    else:
        how = "decoded in one batch, its start-up included in the rate"
    return f"{fill['images']:,} images in {fill['seconds']:.2f} s ({how})"


def failed_stage(stage_lines: list[str]) -> tuple[str, str] | None:
    """(stage, log) of the first stage the answer needed that did not pass, from summary's stage lines."""
    for line in stage_lines:
        words = line.split()
        if len(words) >= 2 and words[0] in ("install", "env", "shards", "answer") and \
                any(w.rstrip(":") in ("FAILED", "STOPPED", "skipped") for w in words[1:3]):
            found = re.search(r"see ([A-Za-z0-9._-]+\.log)", line)
            log = found.group(1) if found else {"answer": "answer.log"}.get(words[0], "setup.log")
            return words[0], log
    return None


def answer_line(results: dict, stage_lines: list[str]) -> str:
    """summary.txt's first line: '40 CelebA epochs: X s cold, Y s warm (steps S s, fill F s, ...)', or
    'no answer: STAGE failed, see LOG'."""
    answer, warm = results.get("answer", {}), results.get("warm", {})
    projection = answer.get("projection")
    if not projection:
        failed = failed_stage(stage_lines)
        if failed:
            return f"no answer: {failed[0]} failed, see {failed[1]}"
        header = re.search(r"\| stages (\S+)", stage_lines[0]) if stage_lines else None
        if header and "answer" not in header.group(1).split(","):
            return f"no answer: the answer stage is not in STAGES={header.group(1)}"
        return "no answer: answer did not finish, see answer.log"  # still running, or stopped from outside
    cold, parts = projection["parts_s"], projection
    device = answer.get("device", "this device")
    warm_p = warm.get("projection")
    warm_total = f"{warm_p['total_s']:.1f} s warm" if warm_p else "warm not measured"
    fill = cold["fill_train"] + cold["fill_val"]
    pieces = [f"steps {cold['steps']:.1f} s"]
    if warm_p:
        w = warm_p["parts_s"]
        pieces += [f"fill {fill:.1f} s cold, {w['fill_train'] + w['fill_val']:.1f} s warm",
                   f"decoded-file write {cold['write']:.1f} s", f"compile {cold['compile']:.1f} s cold, "
                   f"{w['compile']:.1f} s warm"]
    else:
        pieces += [f"fill {fill:.1f} s", f"decoded-file write {cold['write']:.1f} s",
                   f"compile {cold['compile']:.1f} s"]
    pieces += [f"{name} {cold[name]:.1f} s" for name in ("setup", "evaluation", "checkpoints", "pictures", "other")]
    batch = parts["batch_size"]
    return (f"{parts['epochs']} CelebA epochs: {parts['total_s']:.1f} s cold, {warm_total} ({', '.join(pieces)}) "
            f"on {device}, batch {batch}{'' if batch == SEED_BATCH else ' (not the seed 128)'}")


def steps_ratio(results: dict) -> str | None:
    """The graphed run's steps against the ordinary run's, per later epoch at CelebA's size: steps only,
    as the two runs' fills (decoded, loaded) and compiles (cold, warm) differ."""
    graph, answer = results.get("graph", {}).get("projection"), results.get("answer", {}).get("projection")
    if not graph or not answer:
        return None
    g, a = graph["per_later_epoch_s"]["steps_s"], answer["per_later_epoch_s"]["steps_s"]
    if not g or not a:
        return None
    return f"steps only, each later epoch: graphed {g:.2f} s, default {a:.2f} s ({a / g:.2f}x the default's speed)"


def projection_lines(results: dict, stage_lines: list[str] = ()) -> list[str]:
    """summary.txt's first lines: the projection in seconds and where the time goes."""
    answer = results.get("answer", {})
    projection = answer.get("projection")
    lines = [answer_line(results, list(stage_lines))]
    if not projection:
        if answer.get("error"):
            lines.append(f"  {answer['error']}")
        return lines
    p, parts = projection, projection["parts_s"]
    lines.append("  cold = " + " + ".join(f"{name.replace('_', ' ')} {parts[name]:.1f} s" for name in PARTS)
                 + f" ({p['train_images']:,} training images)")
    warm = results.get("warm", {}).get("projection")
    if warm:
        lines.append("  warm = " + " + ".join(f"{name.replace('_', ' ')} {warm['parts_s'][name]:.1f} s"
                                               for name in PARTS))
    for key in ("answer", "warm", "graph"):
        fills = results.get(key, {}).get("fill", {})
        if fills:
            lines.append(f"  {key} run's fills: " + "; ".join(f"{split} {fill_note(f)}" for split, f in fills.items()
                                                              if f.get("seconds")))
    steady = p["per_later_epoch_s"]
    rate = f" ({p['steps_img_per_s']:,.0f} img/s)" if p.get("steps_img_per_s") else ""
    lines.append(f"  each epoch after the first: steps {steady['steps_s']:.2f} s{rate}, evaluation "
                 f"{steady['eval_s']:.2f} s, checkpoint {steady['checkpoint_s']:.2f} s, pictures "
                 f"{steady['figures_s']:.2f} s, other {steady['other_s']:.2f} s; from {p['measured_epochs']} "
                 f"epochs of train.py --cache on over {p['scaled_from']['train_images']:,} resident training images")
    for key in ("answer", "warm", "graph"):
        run = results.get(key, {})
        if run.get("projection"):
            state = "off in this run: the first step's warm-up" if run.get("compiled") is False else \
                run.get("compile_how", "")
            lines.append(f"  {key} run's compile: {run['projection']['parts_s']['compile']:.1f} s, "
                         f"{run.get('compile_where') or 'where unknown'} ({state})")
    graph = results.get("graph", {})
    if graph.get("projection"):
        verdict = graph.get("comparison", {}).get("verdict", "not compared")
        lines.append(f"  --cuda-graph on: {steps_ratio(results) or 'steps not compared'}; {verdict}; its whole run "
                     f"{graph['projection']['total_s']:.1f} s, with the fill and compile it had")
    elif graph.get("skipped"):
        lines.append(f"  --cuda-graph: {graph['skipped']}")
    return lines


def write_summary(results_path, stages_path, summary_path) -> None:
    stages = Path(stages_path).read_text() if Path(stages_path).exists() else ""
    text = "\n".join(projection_lines(read(results_path), stages.splitlines())) + "\n\n" + stages
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
