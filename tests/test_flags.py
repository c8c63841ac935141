"""Every numeric flag of train.py, prep/shard.py and benchmarks/throughput.py is checked while the flags
are parsed: a bad value is one line from argparse (exit code 2), before anything runs or is created."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

import train
from prep import shard
from run.recovery import rerun

ROOT = Path(__file__).resolve().parents[1]


def benchmark_parse_args(argv):
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(argv)


SCRIPTS = {"train.py": train.parse_args, "shard.py": shard.parse_args, "throughput.py": benchmark_parse_args}

BAD = [
    ("train.py", "--batch-size", "0", "a whole number of at least 1"),
    ("train.py", "--batch-size", "-5", "a whole number of at least 1"),
    ("train.py", "-b", "eight", "expected a whole number, not 'eight'"),
    ("train.py", "--epochs", "0", "a whole number of at least 1"),
    ("train.py", "--epochs", "-1", "a whole number of at least 1"),
    ("train.py", "--workers", "-1", "a whole number of at least 0"),
    ("train.py", "--z-dim", "0", "a whole number of at least 1"),
    ("train.py", "--lr", "0", "must be above 0"),
    ("train.py", "--lr", "nan", "expected a finite number"),
    ("train.py", "--lr", "inf", "expected a finite number"),
    ("train.py", "--beta", "-0.5", "must be at least 0"),
    ("train.py", "--seed", "-1", "from 0 to 4294967295"),
    ("train.py", "--seed", "4294967296", "from 0 to 4294967295"),
    ("shard.py", "--shard-size", "0", "a whole number of at least 1"),
    ("shard.py", "--workers", "0", "a whole number of at least 1"),
    ("shard.py", "--synthetic", "0", "a whole number of at least 1"),
    ("shard.py", "--synthetic", "-3", "a whole number of at least 1"),
    ("shard.py", "--quality", "101", "from 1 to 100"),
    ("shard.py", "--seed", "-2", "from 0 to 4294967295"),
    ("throughput.py", "--batch-size", "0", "a whole number of at least 1"),
    ("throughput.py", "--workers", "-1", "a whole number of at least 0"),
    ("throughput.py", "--repeats", "0", "a whole number of at least 1"),
    ("throughput.py", "--steps", "0", "a whole number of at least 1"),
    ("throughput.py", "--synthetic", "0", "a whole number of at least 1"),
    ("throughput.py", "--limit", "-1", "a whole number of at least 0"),
]


@pytest.mark.parametrize("script, flag, value, reason", BAD, ids=[f"{s} {f} {v}" for s, f, v, _ in BAD])
def test_a_bad_number_is_one_line_from_argparse(script, flag, value, reason, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the scripts' default folders are relative: none may appear
    with pytest.raises(SystemExit) as exc:
        SCRIPTS[script]([flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(r"\S+: error: argument ", err)  # the program's name, as run
    assert flag in err and reason in err and err.endswith(" --help)\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script, argv", [
    ("train.py", ["--workers", "0", "--beta", "0", "--seed", "4294967295"]),
    ("shard.py", ["--quality", "100", "--synthetic", "1", "--seed", "0"]),
    ("throughput.py", ["--limit", "0", "--workers", "0"]),
])
def test_the_edges_of_each_range_are_accepted(script, argv):
    args = SCRIPTS[script](argv)
    for flag, value in zip(argv[::2], argv[1::2]):
        assert getattr(args, flag[2:].replace("-", "_")) == float(value)


def test_flags_that_only_make_sense_together(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--resume-force"])
    assert "--resume-force goes with --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", "--overwrite"])
    assert "not allowed with argument --resume" in capsys.readouterr().err


def test_an_unwritable_json_path_is_refused_before_the_benchmark_runs(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit) as exc:
        benchmark_parse_args(["--json", str(a_file / "results.json")])
    assert exc.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err


def test_the_next_command_is_made_from_the_flags_as_parsed(tmp_path):
    """Abbreviated and short flags count as the flags they are: --overw is --overwrite, and the command a
    stopped run prints keeps the others, in the order given, and replaces the ones it changes."""
    out = tmp_path / "out"
    args = train.parse_args(["--data-path", "shards", "-b", "8", "--output-dir", str(out), "--overw", "--no-flip",
                             "--lr", "1e-3", "--epo", "2"])
    assert rerun(args, start_over=True) == shlex.join(["python", "train.py", "--data-path", "shards", "--batch-size",
                                                       "8", "--output-dir", str(out), "--no-flip", "--lr", "0.001",
                                                       "--epochs", "2", "--overwrite"])
    resume = rerun(args, out / "checkpoint.pt", extra=("--resume-force", "--lr", "0.0001"))
    assert resume == shlex.join(
        ["python", "train.py", "--data-path", "shards", "--batch-size", "8", "--output-dir", str(out), "--no-flip",
         "--epochs", "2", "--resume", "--resume-force", "--lr", "0.0001"])
    # Both commands parse back into this run's settings, with --overwrite or --resume as they say.
    for command, changed in ((rerun(args, start_over=True), {}),
                             (resume, {"overwrite": False, "resume": str(out / "checkpoint.pt"), "resume_force": True,
                                       "lr": 1e-4})):
        again = vars(train.parse_args(shlex.split(command)[2:]))
        assert {k: v for k, v in again.items() if k != "given"} == {
            **{k: v for k, v in vars(args).items() if k != "given"}, **changed}
