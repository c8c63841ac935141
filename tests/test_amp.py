"""Mixed precision: what `--amp auto` picks on each kind of device, and bf16 training quality on the CPU."""

import json

import pytest
import torch

import train
from model import step
from model.step import native_bf16_cpu, resolve_amp, resolve_compile


@pytest.fixture
def cpu_kind(monkeypatch):
    """Pretend to be a CPU with the given bf16 units (or none) and architecture."""
    def pretend(avx512_bf16=False, amx=False, machine="x86_64"):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(step.platform, "machine", lambda: machine)
    return pretend


@pytest.mark.parametrize("avx512_bf16, amx, machine, expected", [
    (True, False, "x86_64", "bf16"),   # AMD Zen 4, Intel Cooper Lake
    (False, True, "x86_64", "bf16"),   # Intel Sapphire Rapids
    (True, True, "AMD64", "bf16"),
    (False, False, "x86_64", "off"),   # AVX2 or plain AVX-512: bf16 would be emulated, slower than fp32
    (False, False, "aarch64", "off"),  # not measured there
])
def test_auto_picks_bf16_only_on_cpus_with_bf16_units(cpu_kind, avx512_bf16, amx, machine, expected):
    cpu_kind(avx512_bf16, amx, machine)
    amp, why = resolve_amp("auto", "cpu")
    assert amp == expected
    assert ("natively" in why) == (expected == "bf16") and why


def test_an_explicit_choice_is_kept(cpu_kind):
    cpu_kind(avx512_bf16=False)
    assert resolve_amp("bf16", "cpu")[0] == "bf16"
    cpu_kind(avx512_bf16=True)
    assert resolve_amp("off", "cpu")[0] == "off"


def test_the_first_line_of_a_run_says_which_and_why(cpu_kind, shards, tmp_path, capsys):
    cpu_kind(avx512_bf16=False)
    assert train.main(train.parse_args(["--data-path", str(shards), "--output-dir", str(tmp_path), "--epochs", "1",
                                        "--batch-size", "32", "--workers", "0", "--no-compile"])) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("device cpu") and "amp off (this CPU has no native bf16" in first


@pytest.mark.flag_effect("train.py", "--amp")
@pytest.mark.skipif(native_bf16_cpu() is None, reason="this CPU has no bf16 units, where --amp auto stays off")
def test_bf16_training_on_the_cpu_matches_fp32_quality(shards, tmp_path):
    """Same seed, same data: bf16 autocast ends within 1% of fp32's validation negative ELBO (measured 0.5%
    apart after 90 steps; the two runs' weights differ, so this compares two trainings, not one)."""
    finals = {}
    for amp in ("off", "bf16"):
        out = tmp_path / amp
        assert train.main(train.parse_args(["--data-path", str(shards), "--output-dir", str(out), "--epochs", "3",
                                            "--batch-size", "8", "--workers", "0", "--amp", amp,
                                            "--no-compile"])) == 0
        finals[amp] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["val_neg_elbo"]
    assert finals["bf16"] == pytest.approx(finals["off"], rel=0.01)
    assert finals["bf16"] != finals["off"]  # two precisions, not one run twice


@pytest.mark.parametrize("device, amp, compiler, expected", [
    ("cuda", "bf16", None, True),
    ("cpu", "bf16", "/usr/bin/g++", True),   # measured 1.19x faster than bf16 alone (benchmarks/RESULTS.md)
    ("cpu", "bf16", None, False),            # inductor could not build its CPU kernels
    ("cpu", "off", "/usr/bin/g++", False),   # fp32: too little gained to pay for compiling
])
def test_compile_default_follows_device_and_precision(monkeypatch, device, amp, compiler, expected):
    monkeypatch.setattr(step.shutil, "which", lambda name: compiler)
    on, why = resolve_compile(None, device, amp)
    assert on is expected and why
    assert resolve_compile(not expected, device, amp) == (not expected, "as asked")
