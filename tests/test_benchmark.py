"""The benchmarks: throughput.py in its quickest form (every row there, measured or skipped with a reason),
gpu_check.sh's dry runs on the CPU (the whole check, and a budget that cuts it), and the 40-epoch
projection that benchmarks/report.py and benchmarks/celeba_epochs.py make.

No test asserts a speed: timings on a shared 2-core machine say nothing about the code.
"""

import json
import os
import re
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


# ----------------------------------------------------------------------------- benchmarks/gpu_check.sh, dry runs

RESULT_FILES = ["answer.log", "bench.log", "results.json", "setup.log", "smoke.log", "summary.txt", "tests.log",
                "throughput.json"]
DRY_RUN = {  # every stage on the CPU, at sizes that keep the whole check to a few minutes on 2 cores; the
    # GPU's caps and budget would stop stages on a busy 2-core machine, where only the script is tested
    "DEVICE": "cpu", "INSTALL": "0", "BUDGET_S": "1500", "SMOKE_S": "600", "ANSWER_S": "600", "GRAPH_S": "600",
    "BENCH_S": "600", "TESTS_S": "600", "IMAGES": "200", "EPOCHS": "2", "RESIDENT_TRAIN": "128", "RESIDENT_VAL": "32",
    "TRAIN_ARGS": "--batch-size 32 --workers 1 --no-compile",
    "SMOKE_ARGS": "--batch-size 32 --workers 1 --decode 32 --steps 2 --no-compile",
    "BENCH_ARGS": "--quick --no-compile --loaders torch,cache --batch-size 16 --workers 1 --steps 1 --repeats 2",
}


def gpu_check(out, **settings):
    env = {**os.environ, "PYTHON": sys.executable, **DRY_RUN, **settings}
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def check_limits(out):
    """What the GPU machine sends back: at most 8 plain files, none over 16 MiB, plain names, no folder."""
    entries = list(out.iterdir())
    assert len(entries) <= 8, sorted(p.name for p in entries)
    for path in entries:
        assert path.is_file() and not path.is_symlink(), path
        assert path.stat().st_size <= 16 << 20, path
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name), path


def test_the_dry_run_of_the_gpu_check_returns_the_projection_by_part_in_eight_files(tmp_path):
    """benchmarks/gpu_check.sh with DEVICE=cpu: every stage runs (the CUDA tests skip), within the limits on
    what comes back, and the first lines of summary.txt are the 40-epoch projection that results.json holds
    with each part. On a GPU the same script runs the same stages on CUDA (docs/cuda-paths.md)."""
    out = tmp_path / "out"
    result = gpu_check(out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == RESULT_FILES
    check_limits(out)
    results = json.loads((out / "results.json").read_text())
    summary = (out / "summary.txt").read_text().splitlines()

    answer = results["answer"]
    projection = answer["projection"]
    parts = projection["parts_s"]
    assert list(parts) == ["fill_train", "fill_val", "compile", "steps", "evaluation", "checkpoints", "pictures",
                           "other"]
    assert all(v >= 0 for k, v in parts.items() if k != "other")
    assert parts["fill_train"] > 0 and parts["fill_val"] > 0 and parts["steps"] > 0 and parts["evaluation"] > 0
    assert parts["checkpoints"] > 0 and parts["pictures"] > 0
    assert projection["total_s"] == pytest.approx(sum(parts.values()), abs=0.01)
    assert projection["epochs"] == 40 and projection["train_images"] == 162_770
    assert len(answer["epochs"]) == 2 and answer["train_images"] == 128 and answer["batch_size"] == 32
    for epoch in answer["epochs"]:
        split = sum(epoch[k] for k in ("steps_s", "eval_s", "checkpoint_s", "figures_s", "other_s"))
        assert epoch["wall_s"] == pytest.approx(split, abs=0.01) and epoch["steps_s"] > 0
    # the fills were measured on the shards' real JPEGs (160-odd training images of the 200), not the tiles
    assert 128 < answer["fill"]["train"]["images"] < 200 and answer["fill"]["train"]["seconds"] > 0

    assert summary[0].startswith("40 CelebA epochs (162,770 training images, batch 32, not the seed 128) on ")
    assert summary[0].endswith(f"{projection['total_s']:.1f} s projected")
    assert all(f"{name} " in summary[1] for name in ("fill train", "compile", "steps", "evaluation", "checkpoints",
                                                       "pictures"))
    for stage in ("shards", "smoke", "answer", "bench", "tests"):
        assert any(line.startswith(stage) and " ok " in line for line in summary), (stage, summary)
    graph = [line for line in summary if line.startswith("graph")]
    assert graph and (" ok " in graph[0] or "skipped" in graph[0]), summary
    assert "every stage ok" in summary[-1]

    smoke = results["smoke"]
    assert smoke["failed"] == [] and smoke["decoder"]["name"] in ("torchcodec", "torchvision")
    assert smoke["decode"]["mean_abs_difference"] < 1.0 and smoke["step"]["ms_per_step"] > 0
    bench = json.loads((out / "throughput.json").read_text())
    assert "interrupted" not in bench and bench["env"]["device"] == "cpu" and bench["env"]["no_compile"]
    for section in ("train_step", "loaders", "end_to_end"):
        assert bench[section] and all("img_per_s" in row or row.get("skipped") for row in bench[section].values())
    assert "img_per_s" in bench["end_to_end"]["cache"] and "img_per_s" in bench["train_step"]["default"]
    tests = (out / "tests.log").read_text()
    assert re.search(r"\d+ skipped", tests) and " failed" not in tests  # no CUDA here: every CUDA test skips


def test_a_budget_that_cuts_the_benchmark_keeps_the_rows_finished_before(tmp_path):
    """The budget runs out in the middle of the benchmark: the stage is stopped with SIGINT, the rows
    measured before the cut are in a JSON that parses, and summary.txt says which stage stopped.
    Each training row here takes two 10 s windows (--steps 1000 is cut down to fit one), so with 50 to
    60 s for the stage the cut falls after the first row and long before the last."""
    out = tmp_path / "out"
    result = gpu_check(out, STAGES="bench", BUDGET_S="70", BENCH_S="150",
                       BENCH_ARGS="--no-compile --batch-size 16 --workers 1 --steps 1000 --repeats 2")
    assert result.returncode != 0, result.stdout + result.stderr
    check_limits(out)
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("40 CelebA epochs: not projected: the answer stage did not finish")
    assert re.search(r"^bench +STOPPED .*what it finished is kept", summary, re.M), summary
    assert re.search(r"stopped during (step|loader|end to end) ", summary), summary
    bench = json.loads((out / "throughput.json").read_text())
    assert bench["interrupted"], bench
    assert bench["train_step"]["seed"]["img_per_s"] > 0  # the first row, finished before the cut
    finished = [row for section in ("train_step", "loaders", "end_to_end") for row in bench[section].values()
                if "img_per_s" in row]
    assert "img_per_s" not in bench["end_to_end"].get("cache", {}), "the cut came after the last row"
    assert all(row["ms_per_step"] > 0 and row["runs_img_per_s"] for row in finished if "ms_per_step" in row)
    assert "STOPPED during " in (out / "bench.log").read_text()


# ----------------------------------------------------------------------------- the projection and its report


def measured_run(**changes):
    run = {"batch_size": 128, "train_images": 162_770 // 10, "val_images": 19_867, "compile_s": 20.0, "final_s": 1.0,
           "fill": {"train": {"images": 3000, "seconds": 0.5, "cached": True},
                    "val": {"images": 400, "seconds": 0.1, "cached": True}},
           "epochs": [{"steps_s": 21.0, "eval_s": 0.5, "checkpoint_s": 0.3, "figures_s": 0.2, "other_s": 0.1},
                      {"steps_s": 1.0, "eval_s": 0.2, "checkpoint_s": 0.2, "figures_s": 0.1, "other_s": 0.0},
                      {"steps_s": 1.2, "eval_s": 0.4, "checkpoint_s": 0.2, "figures_s": 0.1, "other_s": 0.0}]}
    run.update(changes)
    return run


def test_the_projection_adds_every_part_for_40_epochs():
    from benchmarks.report import project
    p = project(measured_run())
    parts = p["parts_s"]
    k = (162_770 // 128) / (162_770 // 10 // 128)  # the run held a tenth of CelebA's training images
    assert parts["fill_train"] == pytest.approx(162_770 / 6000, abs=1e-3)
    assert parts["fill_val"] == pytest.approx(19_867 / 4000, abs=1e-3)
    assert parts["compile"] == 20.0
    assert parts["steps"] == pytest.approx(((21.0 - 20.0) + 39 * 1.1) * k, abs=1e-3)  # epoch 1 less the compile
    assert parts["evaluation"] == pytest.approx(0.5 + 39 * 0.3, abs=1e-3)
    assert parts["checkpoints"] == pytest.approx(0.3 + 39 * 0.2, abs=1e-3)
    assert parts["pictures"] == pytest.approx(0.2 + 39 * 0.1 + 1.0, abs=1e-3)
    assert p["total_s"] == pytest.approx(sum(parts.values()), abs=1e-2)
    # a split left streaming has no fill: its decoding is inside the evaluation
    streamed = measured_run()
    streamed["fill"]["val"]["cached"] = False
    assert project(streamed)["parts_s"]["fill_val"] == 0


def test_the_summary_starts_with_the_projection_in_seconds(tmp_path):
    from benchmarks import report
    results = tmp_path / "results.json"
    report.merge(results, "answer", {"projection": report.project(measured_run()), "device": "NVIDIA H200"})
    report.merge(results, "graph", {"skipped": "train.py has no --cuda-graph flag yet"})
    stages = tmp_path / "stages.txt"
    stages.write_text("smoke    ok        40s\n")
    report.write_summary(results, stages, tmp_path / "summary.txt")
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    total = report.project(measured_run())["total_s"]
    assert lines[0] == f"40 CelebA epochs (162,770 training images, batch 128) on NVIDIA H200: {total:.1f} s projected"
    assert lines[1].startswith("  = fill train 27.1 s + fill val 5.0 s + compile 20.0 s + steps ")
    assert "--cuda-graph: train.py has no --cuda-graph flag yet" in lines[3] and lines[-1].startswith("smoke")


def test_fit_cuts_large_files_and_names_what_would_not_come_back(tmp_path):
    from benchmarks.report import fit
    big = tmp_path / "bench.log"
    big.write_bytes(b"head\n" + b"x" * 5000 + b"\ntail\n")
    assert fit(tmp_path, max_bytes=1000) == []
    text = big.read_bytes()
    assert len(text) <= 1000 and text.startswith(b"head\n") and text.endswith(b"\ntail\n") and b"left out" in text
    for i in range(8):
        (tmp_path / f"f{i}.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = fit(tmp_path, max_bytes=1000)
    assert any("10 files" in p for p in problems) and any("bad name.txt" in p for p in problems)


def test_durations_keep_their_seconds():
    from benchmarks.throughput import fmt_duration
    assert [fmt_duration(s) for s in (8.44, 30, 95, 750, 10_440)] == ["8.4 s", "30 s", "95 s", "12.5 min", "2.9 h"]


def test_the_epoch_split_prefers_train_pys_own_figures():
    """metrics.jsonl's eval_s, checkpoint_s, figures_s and compile_s where train.py records them (a later
    version does), the benchmark's own timers where it does not."""
    import benchmarks.celeba_epochs as ce
    recorder = ce.Recorder({"train": 256, "val": 64})
    recorder.epoch_starts, recorder.ended = [0.0, 10.0], 20.0
    recorder.events = [("evaluate", 0, 8.0, 0.5), ("save_checkpoint", 0, 9.0, 0.4), ("save_reconstructions", 0, 8.5, 0.2),
                       ("save_curves", 0, 8.7, 0.1), ("evaluate", 1, 18.0, 0.6), ("save_samples", 1, 19.5, 0.3)]
    recorder.first_step_s = 3.0
    old = [{"epoch": 1, "seconds": 7.0}, {"epoch": 2, "seconds": 8.0}]
    epochs, source = ce.epoch_parts(recorder, old)
    assert source["eval_s"] == "benchmark timers" and epochs[0]["figures_s"] == pytest.approx(0.3)
    assert epochs[0]["wall_s"] == 10.0 and epochs[1]["wall_s"] == 9.5  # the last ends where the samples start
    assert epochs[0]["other_s"] == pytest.approx(10.0 - 7.0 - 0.5 - 0.4 - 0.3)
    assert ce.compile_seconds(recorder, old, epochs, 32, 256) == (pytest.approx(3.0 - 8.0 / 8),
                                                                  "the first step's time less a later step's")
    new = [{**old[0], "eval_s": 0.45, "checkpoint_s": 0.35, "figures_s": 0.25, "compile_s": 2.5},
           {**old[1], "eval_s": 0.55, "checkpoint_s": 0.36, "figures_s": 0.26}]
    epochs, source = ce.epoch_parts(recorder, new)
    assert source == {"eval_s": "metrics.jsonl", "checkpoint_s": "metrics.jsonl", "figures_s": "metrics.jsonl",
                      "steps_s": "metrics.jsonl"}
    assert (epochs[0]["eval_s"], epochs[0]["checkpoint_s"], epochs[0]["figures_s"]) == (0.45, 0.35, 0.25)
    assert ce.compile_seconds(recorder, new, epochs, 32, 256) == (2.5, "metrics.jsonl compile_s")


def test_gpu_check_scripts_parse():
    for script in ("benchmarks/gpu_check.sh", "benchmarks/make_wheels.sh"):
        result = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
