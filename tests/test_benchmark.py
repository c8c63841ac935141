"""benchmarks/throughput.py in its quickest form: every row is there, measured or skipped with a reason.

No test asserts a speed: timings on a shared 2-core machine say nothing about the code.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.step import native_bf16_cpu, resolve_compile

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_reports_every_row(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--quick", "--synthetic", "400", "--batch-size", "16",
         "--workers", "1", "--steps", "1", "--repeats", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    env = results["env"]
    assert env["device"] == "cpu" and env["batch_size"] == 16 and env["num_images"] == 400
    assert env["torch"] and env["dali"] and env["cores"] >= 1

    def check(section, names):
        assert list(results[section]) == names
        for name, row in results[section].items():
            if "skipped" in row:
                assert isinstance(row["skipped"], str) and row["skipped"], f"{section}/{name} skipped without a reason"
            else:
                assert row["img_per_s"] > 0, f"{section}/{name}"
                assert len(row.get("runs_img_per_s", [0, 0])) == 2
        return {name for name, row in results[section].items() if "skipped" not in row}

    names = ["seed", "torch", "torch-cpu-decode", "dali", "cache"]
    assert check("loaders", names) == {"seed", "torch", "dali", "cache"}
    measured = check("train_step", ["seed", "fp32", "channels_last", "bf16", "fp16", "compile", "bf16+compile",
                                    "compile-cudagraphs", "default"])
    # train.py's default on this CPU: bf16 and compiled where it has bf16 units (and a C++ compiler), else
    # fp32 uncompiled; --quick times that one compiled mode and skips the others.
    default = ("bf16+compile" if resolve_compile(None, "cpu", "bf16")[0] else "bf16") if native_bf16_cpu() \
        else "channels_last"
    assert measured == {"seed", "fp32", "channels_last", "bf16", "default", default}
    assert results["train_step"]["default"]["same_as"] == default
    assert all(results["train_step"][m]["ms_per_step"] > 0 for m in measured)
    assert check("end_to_end", names) == {"seed", "torch", "dali", "cache"}
    for name in ("seed", "torch", "dali", "cache"):
        row = results["end_to_end"][name]
        assert row["fraction_of_ceiling"] > 0 and row["projected_40_epochs_s"] > 0
        assert row["mode"] == ("seed" if name == "seed" else "default")
    # The cache's fill is reported apart, and its 40-epoch projection counts one fill pass.
    for section in ("loaders", "end_to_end"):
        row = results[section]["cache"]
        assert row["fill_s"] > 0 and row["fill_img_per_s"] > 0
    row = results["end_to_end"]["cache"]
    projected = 40 * 162_770 / row["img_per_s"] + 162_770 / row["fill_img_per_s"]
    assert row["projected_40_epochs_s"] == pytest.approx(projected)
    assert results["loaders"]["seed"]["vs_seed"] == 1.0
    # the table on stdout carries the same rows
    for name in ("seed", "torch", "dali", "cache", "channels_last", "compile-cudagraphs"):
        assert name in result.stdout
    assert "filled once in " in result.stdout and "(one fill pass included)" in result.stdout
    assert "skipped: " in result.stdout


def test_unknown_loader_is_refused():
    result = subprocess.run([sys.executable, "benchmarks/throughput.py", "--loaders", "seed,tensorflow"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown tensorflow" in result.stderr


def test_gpu_check_runs_every_step_as_a_dry_run_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh with DEVICE=cpu and tiny sizes: the CUDA tests skip, the rest runs, and the
    eight result files are there. On a GPU the same script runs them on CUDA (docs/cuda-paths.md)."""
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "INSTALL": "0", "IMAGES": "120",
           "TRAIN_ARGS": "--batch-size 16 --workers 1 --no-compile",
           "BENCH_ARGS": "--quick --loaders torch --synthetic 64 --batch-size 16 --workers 1 --steps 1 --repeats 1"}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.txt", "env.txt", "install.log", "test_cuda.log", "shards.log", "train.log", "throughput.txt",
         "throughput.json"])
    summary = (out / "summary.txt").read_text()
    for step in ("tests/test_cuda.py", "shards", "train torch", "train dali", "benchmark"):
        assert any(line.startswith(step) and " ok " in line for line in summary.splitlines()), (step, summary)
    assert "skipped" in (out / "test_cuda.log").read_text() and "every step ok" in summary
    assert (out / "train.log").read_text().count('"epoch": 1') == 2  # both runs' metrics.jsonl
    assert json.loads((out / "throughput.json").read_text())["env"]["device"] == "cpu"


def test_gpu_check_scripts_parse():
    for script in ("benchmarks/gpu_check.sh", "benchmarks/make_wheels.sh"):
        result = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
