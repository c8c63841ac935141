"""The benchmarks: throughput.py in its quickest form (every row there, measured or skipped with a reason),
the GPU check rehearsed on the CPU from a fresh clone (benchmarks/rehearse.sh: every stage, at its
CPU sizes), a benchmark stopped mid-row keeping the rows it finished, the CUDA tests' marker, and the
40-epoch projection that benchmarks/report.py and benchmarks/celeba_epochs.py make.

No test asserts a speed: timings on a shared 2-core machine say nothing about the code.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.step import native_bf16_cpu, resolve_compile

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_reports_every_row(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--quick", "--synthetic", "96", "--batch-size", "16",
         "--workers", "1", "--steps", "1", "--repeats", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    env = results["env"]
    assert env["device"] == "cpu" and env["batch_size"] == 16 and env["num_images"] == 96
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


# ----------------------------------------------------------------------------- the GPU check, rehearsed

RESULT_FILES = ["answer.log", "bench.log", "results.json", "setup.log", "smoke.log", "summary.txt", "tests.log",
                "throughput.json"]


def check_limits(out):
    """What the GPU machine sends back: at most 8 plain files, none over 16 MiB, plain names, no folder."""
    entries = list(out.iterdir())
    assert len(entries) <= 8, sorted(p.name for p in entries)
    for path in entries:
        assert path.is_file() and not path.is_symlink(), path
        assert path.stat().st_size <= 16 << 20, path
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name), path


def test_the_rehearsal_runs_the_device_call_from_a_fresh_clone_and_returns_the_answer_in_eight_files(tmp_path):
    """benchmarks/rehearse.sh: the committed tree cloned, .whl/ made there by make_wheels.sh, an interpreter
    with torch and none of the project's packages (webdataset, simplejpeg, TorchCodec come from the wheels,
    DALI not at all), the device call's command line with DEVICE=cpu. Every stage runs (the CUDA tests,
    selected by their marker, skip); the benchmark is cut by its cap and keeps the rows finished before;
    what comes back fits the device's limits, and summary.txt's first line is the answer. The benchmark
    runs rehearse.sh's short form to its end (a benchmark stopped by a cap is the next test's)."""
    out = tmp_path / "back"
    settings = ("PYTHONPATH", "OUT", "STAGES", "BUDGET_S", "SMOKE_S", "ANSWER_S", "WARM_S", "GRAPH_S", "TESTS_S",
                "BENCH_S", "IMAGES", "EPOCHS", "WARM_EPOCHS", "RESIDENT_TRAIN", "RESIDENT_VAL", "TRAIN_ARGS",
                "SMOKE_ARGS", "BENCH_ARGS", "INSTALL", "WHEELS", "DEVICE", "PYTHON")
    env = {k: v for k, v in os.environ.items() if k not in settings}  # the developer's own settings stay out
    result = subprocess.run(["bash", "benchmarks/rehearse.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                            env={**env, "TORCH_PYTHON": sys.executable, "TMPDIR": str(tmp_path)},
                            timeout=900)
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    assert "rehearsal: 8 files came back" in result.stdout and "left out" not in said, said
    assert sorted(p.name for p in out.iterdir()) == RESULT_FILES
    check_limits(out)
    assert re.search(r"python3 = \S+/python/bin/python3", result.stdout), said  # the stand-in, first on PATH
    setup = (out / "setup.log").read_text()
    assert re.search(r"^webdataset \d", setup, re.M) and re.search(r"^simplejpeg \d", setup, re.M), setup
    assert re.search(r"^nvidia\.dali missing", setup, re.M), "the stand-in interpreter sees DALI: " + setup
    results = json.loads((out / "results.json").read_text())
    summary = (out / "summary.txt").read_text().splitlines()

    from benchmarks.report import PARTS
    answer, warm, graph = results["answer"], results["warm"], results["graph"]
    projection = answer["projection"]
    parts = projection["parts_s"]
    assert list(parts) == list(PARTS)
    assert all(v >= 0 for k, v in parts.items() if k != "other")
    for key in ("fill_train", "fill_val", "write", "steps", "evaluation", "checkpoints", "pictures"):
        assert parts[key] > 0, key
    assert projection["total_s"] == pytest.approx(sum(parts.values()), abs=0.01)
    assert projection["epochs"] == 40 and projection["train_images"] == 162_770
    assert len(answer["epochs"]) == 2 and answer["train_images"] == 64 and answer["batch_size"] == 16
    for epoch in answer["epochs"]:
        split = sum(epoch[k] for k in ("steps_s", "eval_s", "checkpoint_s", "figures_s", "other_s"))
        assert epoch["wall_s"] == pytest.approx(split, abs=0.01) and epoch["steps_s"] > 0
    # the answer decoded the shards' real JPEGs (160-odd training images of the 200, not the tiles) and wrote
    # the decoded file; the warm and graph runs loaded it, and say so
    assert 64 < answer["fill"]["train"]["images"] < 200 and answer["fill"]["train"]["seconds"] > 0
    assert answer["fill"]["train"]["source"] == "decoded" and answer["fill"]["train"]["write_s"] > 0
    assert answer["compile_where"] == "epoch 1"
    for run in (warm, graph):
        assert {f["source"] for f in run["fill"].values()} == {"loaded"}, run["fill"]
        assert "write_s" not in run["fill"]["train"] and run["projection"]["parts_s"]["write"] == 0
    assert graph["comparison"]["agrees"], graph["comparison"]

    total, warm_total = projection["total_s"], warm["projection"]["total_s"]
    assert summary[0].startswith(f"40 CelebA epochs: {total:.1f} s cold, {warm_total:.1f} s warm (steps "), summary
    assert summary[0].endswith(" on CPU, batch 16 (not the seed 128)"), summary[0]
    assert all(f"{name} " in summary[1] for name in ("setup", "fill train", "write", "compile", "steps", "evaluation",
                                                       "checkpoints", "pictures"))
    assert any("train " in line and "decoded" in line for line in summary if line.startswith("  answer run's fills"))
    assert any("loaded from the decoded file" in line for line in summary if line.startswith("  warm run's fills"))
    graph_line = "  --cuda-graph on: steps only, each later epoch: graphed "
    assert any(line.startswith(graph_line) for line in summary), summary
    for stage in ("install", "shards", "smoke", "answer", "warm", "graph", "tests", "bench"):
        assert any(line.startswith(stage) and " ok " in line for line in summary), (stage, summary)
    assert "every stage ok" in summary[-1]

    smoke = results["smoke"]
    assert smoke["failed"] == [] and smoke["decoder"]["name"] in ("torchcodec", "torchvision")
    assert smoke["decode"]["mean_abs_difference"] < 1.0 and smoke["step"]["ms_per_step"] > 0
    assert smoke["step"]["compile"] is False  # the answer's compile is the machine's first
    tests = (out / "tests.log").read_text()
    assert " -m cuda " in tests and " -k " not in tests
    assert re.search(r"\d+ skipped, \d+ deselected", tests) and " failed" not in tests  # no CUDA here: each skips

    # The benchmark's short form: every row of its loaders, measured or skipped with a reason, in a JSON that parses.
    bench = json.loads((out / "throughput.json").read_text())
    assert "interrupted" not in bench and bench["env"]["device"] == "cpu" and bench["env"]["no_compile"], bench
    for section in ("train_step", "loaders", "end_to_end"):
        assert all("img_per_s" in row or row["skipped"] for row in bench[section].values()), bench[section]
    assert all("img_per_s" in bench[section][name] for section in ("loaders", "end_to_end") for name in ("torch", "cache"))
    assert bench["train_step"]["seed"]["img_per_s"] > 0


def test_a_stopped_benchmark_keeps_the_rows_it_finished(faces_dir, tmp_path):
    """gpu_check.sh stops a stage at its cap with SIGINT: throughput.py then writes the rows it finished, names
    the one it was in, and exits 130. Its 10 s windows (--steps 1000 is cut down to fit one) leave the
    signal time to land inside the second row, sent once the first is in the JSON."""
    out = tmp_path / "throughput.json"
    proc = subprocess.Popen([sys.executable, "benchmarks/throughput.py", "--images", str(faces_dir), "--limit", "48",
                             "--no-compile", "--loaders", "torch", "--batch-size", "16", "--workers", "1",
                             "--steps", "1000", "--repeats", "1", "--json", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if "img_per_s" in json.loads(out.read_text())["train_step"].get("seed", {}):
                    break
            except (OSError, ValueError, KeyError):
                pass  # not written yet, or being replaced
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        said, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, said[-3000:]
    bench = json.loads(out.read_text())
    assert bench["interrupted"].startswith("step "), bench  # stopped in the training-step rows, after the seed's
    assert bench["train_step"]["seed"]["img_per_s"] > 0
    finished = [row for section in ("train_step", "loaders", "end_to_end") for row in bench[section].values()
                if "img_per_s" in row]
    assert all(row["ms_per_step"] > 0 and row["runs_img_per_s"] for row in finished if "ms_per_step" in row)
    assert f"STOPPED during {bench['interrupted']}: the rows below finished before it" in said, said[-3000:]
    assert f"(stopped during {bench['interrupted']})" in said


def test_no_answer_names_the_stage_that_failed_and_its_log(tmp_path):
    from benchmarks import report
    header = "gpu_check 2026-12-05 16:35:02 UTC | device cuda | stages smoke,answer,warm | budget 360s"
    failed = [header, "install  ok         1s", "env      python 3.12.3 | torch 2.11.0+cu130",
              "shards   ok         4s", "answer   FAILED    12s  (exit 1; see answer.log)"]
    assert report.answer_line({}, failed) == "no answer: answer failed, see answer.log"
    env = [header, "env      FAILED (exit 1; see setup.log): error: DEVICE is cuda but torch sees no GPU"]
    assert report.answer_line({}, env) == "no answer: env failed, see setup.log"
    assert report.answer_line({}, [header, "shards   ok  4s"]) == "no answer: answer did not finish, see answer.log"
    bench_only = [header.replace("smoke,answer,warm", "bench")]
    assert report.answer_line({}, bench_only) == "no answer: the answer stage is not in STAGES=bench"
    results, stages = tmp_path / "results.json", tmp_path / "stages.txt"
    stages.write_text("\n".join(failed) + "\n")
    report.merge(results, "answer", {"error": "train.py returned 1 after 0 epochs (see answer.log)"})
    report.write_summary(results, stages, tmp_path / "summary.txt")
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert lines[:2] == ["no answer: answer failed, see answer.log",
                         "  train.py returned 1 after 0 epochs (see answer.log)"]


def test_the_carried_wheels_are_the_versions_the_suite_runs():
    """benchmarks/wheels.txt pins what make_wheels.sh downloads; they must be the versions installed here."""
    from importlib.metadata import version
    pins = [line.split("==") for line in (ROOT / "benchmarks" / "wheels.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert {name for name, _ in pins} == {"webdataset", "braceexpand", "simplejpeg", "torchcodec", "POT"}
    assert {name: version(name) for name, _ in pins} == dict(pins)


def test_cuda_tests_are_chosen_by_their_marker_and_each_needs_cuda_or_pins_the_cpu(tmp_path):
    """Every test marked `cuda` (the GPU check's tests stage runs `pytest -m cuda`) is skipped here, where
    there is no GPU, with a reason that names CUDA, unless it pins --device cpu; the stage selects by the
    marker, never by name matching, and names every file that holds such a test (DALI's only where DALI
    is installed there)."""
    report = tmp_path / "cuda.xml"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                             f"--junitxml={report}", "tests/"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import xml.etree.ElementTree as ET
    cases = ET.parse(report).getroot().iter("testcase")
    files = set()
    count = 0
    for case in cases:
        count += 1
        path = ROOT / (case.get("classname").replace(".", "/") + ".py")
        files.add(path.name)
        skipped = case.find("skipped")
        if skipped is not None:
            assert "CUDA" in skipped.get("message", ""), (case.get("name"), skipped.get("message"))
        else:
            name = case.get("name").split("[")[0]
            body = re.search(rf"\ndef {name}\(.*?(?=\n(?:def |@|class )|\Z)", path.read_text(), re.S).group(0)
            assert '"--device", "cpu"' in body, f"{name} is marked cuda, ran here and does not pin --device cpu"
    assert count >= 15
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert re.search(r"pytest .*\n?.* -m cuda ", script) and not re.search(r"pytest[^\n]*\n?[^\n]* -k ", script)
    named = set(re.findall(r"tests/(test_\w+\.py)", script))
    assert files <= named, f"CUDA tests in files the tests stage does not run: {sorted(files - named)}"


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


def test_the_compile_is_counted_once_wherever_it_happened():
    """Inside epoch 1 (the ordinary step compiles on its first call) epoch 1's steps hold it: taken out of
    them, added as its own part. Before epoch 1 (--cuda-graph on warms up and captures first, and
    metrics.jsonl's first row has compile_s) epoch 1's steps do not hold it: added, nothing taken out."""
    from benchmarks.report import project
    k = (162_770 // 128) / (162_770 // 10 // 128)
    later = 39 * 1.1 * k
    inside = project(measured_run(compile_where="epoch 1"))["parts_s"]
    assert inside["compile"] == 20.0 and inside["steps"] == pytest.approx(1.0 * k + later, abs=1e-3)
    before = measured_run(compile_where="before epoch 1")
    before["epochs"][0]["steps_s"] = 1.0  # what epoch 1's steps take when the compile ran before it
    before = project(before)["parts_s"]
    assert before["compile"] == 20.0 and before["steps"] == pytest.approx(inside["steps"], abs=1e-3)
    # the same measured epoch 1 read the other way: the 20 s are counted in the steps and as the compile
    twice = project(measured_run(compile_where="before epoch 1"))["parts_s"]
    assert twice["steps"] - inside["steps"] == pytest.approx(20.0 * k, abs=1e-3)


def test_the_fill_counts_its_start_once_and_a_loaded_fill_is_reported_as_loaded():
    from benchmarks.report import fill_note, project
    run = measured_run()
    # 1.0 s to the first batch of 256, then 2,744 more in 2.0 s; the decoded file written in 0.3 s
    run["fill"]["train"] = {"images": 3000, "seconds": 3.0, "cached": True, "source": "decoded",
                            "first_batch_s": 1.0, "first_batch_images": 256, "write_s": 0.3}
    run["fill"]["val"] = {"images": 400, "seconds": 0.01, "cached": True, "source": "loaded"}
    parts = project(run)["parts_s"]
    assert parts["fill_train"] == pytest.approx(1.0 + (162_770 - 256) * 2.0 / 2744, abs=1e-3)
    assert parts["fill_train"] < 162_770 * 3.0 / 3000  # not the start-up counted 54 times
    assert parts["write"] == pytest.approx(0.3 * 162_770 / 3000, abs=1e-3)
    assert parts["fill_val"] == pytest.approx(19_867 * 0.01 / 400, abs=1e-3)
    assert "(loaded from the decoded file)" in fill_note(run["fill"]["val"])
    assert "1.00 s to the first batch, then 1,372 img/s" in fill_note(run["fill"]["train"])


def test_the_summary_starts_with_the_answer_cold_and_warm(tmp_path):
    from benchmarks import report
    results = tmp_path / "results.json"
    cold, warm = measured_run(), measured_run(compile_s=3.0)
    warm["epochs"][0]["steps_s"] = 4.0  # its first step compiled from inductor's caches
    warm["fill"] = {"train": {"images": 3000, "seconds": 0.05, "cached": True, "source": "loaded"},
                    "val": {"images": 400, "seconds": 0.01, "cached": True, "source": "loaded"}}
    report.merge(results, "answer", {"projection": report.project(cold), "device": "NVIDIA H200", "fill": cold["fill"],
                                     "compile_where": "epoch 1"})
    report.merge(results, "warm", {"projection": report.project(warm), "fill": warm["fill"]})
    graphed = measured_run(compile_where="before epoch 1")
    for epoch in graphed["epochs"][1:]:
        epoch["steps_s"] /= 2
    report.merge(results, "graph", {"projection": report.project(graphed),
                                    "comparison": {"verdict": "validation loss within 0.10%"}})
    stages = tmp_path / "stages.txt"
    stages.write_text("smoke    ok        40s\n")
    report.write_summary(results, stages, tmp_path / "summary.txt")
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    total, warm_total = report.project(cold)["total_s"], report.project(warm)["total_s"]
    assert warm_total < total
    assert lines[0].startswith(f"40 CelebA epochs: {total:.1f} s cold, {warm_total:.1f} s warm (steps ")
    assert "fill 32.1 s cold, " in lines[0] and "compile 20.0 s cold, 3.0 s warm" in lines[0]
    assert lines[0].endswith(" on NVIDIA H200, batch 128")
    assert lines[1].startswith("  cold = setup 0.0 s + fill train 27.1 s + fill val 5.0 s + write 0.0 s + "
                               "compile 20.0 s")
    assert lines[2].startswith("  warm = ")
    graph = [line for line in lines if line.startswith("  --cuda-graph on: steps only")]
    assert graph and "(2.00x the default's speed)" in graph[0] and "within 0.10%" in graph[0], lines
    assert lines[-1].startswith("smoke")


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
    recorder.first_step_started = 0.5  # inside epoch 1
    assert ce.compile_seconds(recorder, old, epochs, 32, 256) == (pytest.approx(3.0 - 8.0 / 8),
                                                                  "the first step's time less a later step's", "epoch 1")
    recorder.first_step_started = -4.0  # a warm-up before epoch 1 (--cuda-graph on) took the first step
    assert ce.compile_seconds(recorder, old, epochs, 32, 256)[2] == "before epoch 1"
    new = [{**old[0], "eval_s": 0.45, "checkpoint_s": 0.35, "figures_s": 0.25, "compile_s": 2.5},
           {**old[1], "eval_s": 0.55, "checkpoint_s": 0.36, "figures_s": 0.26}]
    epochs, source = ce.epoch_parts(recorder, new)
    assert source == {"eval_s": "metrics.jsonl", "checkpoint_s": "metrics.jsonl", "figures_s": "metrics.jsonl",
                      "steps_s": "metrics.jsonl"}
    assert (epochs[0]["eval_s"], epochs[0]["checkpoint_s"], epochs[0]["figures_s"]) == (0.45, 0.35, 0.25)
    assert ce.compile_seconds(recorder, new, epochs, 32, 256) == (2.5, "metrics.jsonl compile_s", "before epoch 1")


def test_gpu_check_scripts_parse():
    for script in ("benchmarks/gpu_check.sh", "benchmarks/make_wheels.sh", "benchmarks/rehearse.sh"):
        result = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
