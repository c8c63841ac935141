"""The cache's fill: decoding a split against loading its decoded file, and the decoding fill's settings.

    python benchmarks/fill.py --data-path dataset/synthetic/shards --repeats 5

Each repeat deletes the decoded file, fills the split by decoding (which writes the file), then fills
it again by loading the file; prints each time and the medians, and the load as a share of the
decoding fill. `--workers` and `--batch-size` (the decoding pass's) take several values to compare decoding fills;
CPU is the process's and its finished workers' CPU time, which other load on the machine changes less
than the wall time.
"""

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline import build_loader  # noqa: E402


def cpu_seconds() -> float:
    """User and system CPU time of this process and of its finished children (the loader's workers)."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def fill(args, workers, batch_size, mode):
    started, cpu = time.perf_counter(), cpu_seconds()
    made = build_loader("cache", args.data_path, args.split, batch_size, args.device, workers=workers,
                        source=args.loader, cache_file=mode, fill_batch_size=batch_size).cache
    made.cpu_s = cpu_seconds() - cpu
    return made, time.perf_counter() - started


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default="dataset/synthetic/shards")
    p.add_argument("--split", default="train")
    p.add_argument("--loader", default="torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--batch-size", type=int, nargs="+", default=[256], help="of the decoding pass (fill_batch_size)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.data_path} {args.split}, "
          f"{args.loader} loader on {args.device}")
    for workers in args.workers:
        for batch_size in args.batch_size:
            decoded, loaded, cpu = [], [], []
            for _ in range(args.repeats):
                for old in Path(args.data_path).glob("decoded-*.u8"):
                    old.unlink()
                made, wall = fill(args, workers, batch_size, "auto")
                assert made.source == "decoded"
                again, wall_again = fill(args, workers, batch_size, "auto")
                assert again.source == "loaded" and torch.equal(again.images, made.images)
                decoded.append((made.seconds, wall))
                cpu.append(made.cpu_s)
                loaded.append((again.seconds, wall_again))
            fill_s = statistics.median(s for s, _ in decoded)
            load_s = statistics.median(s for s, _ in loaded)
            print(f"workers {workers} batch {batch_size}: {len(made):,} images, decoding fill "
                  f"{fill_s:.3f} s (each {', '.join(f'{s:.3f}' for s, _ in decoded)}; build_loader "
                  f"{statistics.median(w for _, w in decoded):.3f} s with the write; CPU {statistics.median(cpu):.2f} s), load {load_s * 1000:.1f} ms "
                  f"(each {', '.join(f'{s * 1000:.1f}' for s, _ in loaded)}; build_loader "
                  f"{statistics.median(w for _, w in loaded) * 1000:.1f} ms): {load_s / fill_s:.1%} of the fill")


if __name__ == "__main__":
    main()
