"""The static-buffer training step (model/step.py StaticStep), --cuda-graph, --figures-every and the
per-epoch timings.

On the CPU the static-buffer step runs uncaptured: the same op sequence as the CUDA graph, checked bit
for bit against the loader-fed TrainStep. The tests marked `cuda` run where a GPU is present (the GPU
check runs this file) and compare the captured graph with that uncaptured step.
"""

import json
import math

import pytest
import torch

import train
from conftest import no_host_sync
from model import VariationalAutoEncoder
from model.step import StaticStep, TrainStep, choose_step, make_optimizer
from pipeline import build_loader

BATCH = 16
FAST = ["--batch-size", "32", "--workers", "1", "--no-compile"]


def cuda(test):
    """A CUDA-only test: marked `cuda` (benchmarks/gpu_check.sh selects these with -m cuda), skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@pytest.fixture(scope="module")
def cached_train(shards):
    """The train split in the resident cache on the CPU, flips on: 193 images, 12 steps of 16."""
    return build_loader("cache", shards, "train", BATCH, "cpu", workers=1, seed=3, source="torch")


def make(device, amp="off", compile=False, seed=0):
    torch.manual_seed(seed)
    model = VariationalAutoEncoder().to(device, memory_format=torch.channels_last)
    return model, TrainStep(model, make_optimizer(model.parameters(), 3e-4, device), device, amp=amp, compile=compile)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def ordinary_epochs(step, loader, epochs):
    """Today's cache-fed training: the loader's batches into TrainStep, the sums as train_one_epoch keeps them."""
    sums = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        total = torch.zeros(4)
        for images in loader:
            total += torch.stack(step(images))
        sums.append(total)
    return sums


def static_epochs(static, epochs):
    sums = []
    for epoch in range(epochs):
        static.set_epoch(epoch)
        for _ in range(static.steps):
            static()
        sums.append(static.sums.clone())
    return sums


def test_the_uncaptured_static_step_is_todays_step_bit_for_bit(cached_train, warmup=2):
    """Two epochs of 12 steps, flips on, the same seeds: the same batches, flips and noise reach the same
    ops, so the weights, Adam's state and each epoch's sums are equal to the bit. With a warm-up (what
    precedes a capture) the warm-up steps are undone: weights, Adam's state and the generator."""
    assert cached_train.flip and len(cached_train) == 12
    model_a, step_a = make("cpu")
    model_b, step_b = make("cpu")
    assert all(torch.equal(a, b) for a, b in zip(weights(model_a), weights(model_b)))
    torch.manual_seed(1)
    expected = ordinary_epochs(step_a, cached_train, 2)
    torch.manual_seed(1)
    static = StaticStep(step_b, cached_train.resident(), capture=False, warmup=warmup)
    assert not static.graphed and static.compile_seconds > 0
    got = static_epochs(static, 2)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(weights(model_a), weights(model_b)))
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        sa, sb = step_a.optimizer.state[p], step_b.optimizer.state[q]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(static.position, torch.tensor([12]))
    with pytest.raises(RuntimeError, match=r"the epoch's 12 steps are taken: call set_epoch\(\)"):
        static()  # a 13th step would gather past the plan's last row
    moved = not torch.equal(weights(model_a)[0], make("cpu")[0].encoder[0].weight)
    assert moved


def test_the_static_step_takes_only_a_training_split_of_the_cache(shards):
    evaluation = build_loader("cache", shards, "val", BATCH, "cpu", workers=1, source="torch")
    with pytest.raises(ValueError, match="training CachedLoader"):
        evaluation.resident()


def run(shards, out, *extra):
    return train.main(train.parse_args(["--data-path", str(shards), "--output-dir", str(out), *FAST, *extra]))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b):
    a, b = torch.load(a / "vae_celeba.pth"), torch.load(b / "vae_celeba.pth")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.flag_effect("train.py", "--cuda-graph")
def test_cuda_graph_on_a_cpu_says_so_in_one_line_and_trains_alike(shards, tmp_path, capsys):
    """On a CPU --cuda-graph on cannot capture: one line says so, and the static-buffer step runs through
    train.py uncaptured, giving the ordinary step's weights and losses bit for bit. Pinned to the CPU: on
    a GPU machine --device auto would be CUDA, where the graph captures."""
    cpu = ["--device", "cpu", "--epochs", "1", "--cache", "on"]
    assert run(shards, tmp_path / "off", *cpu, "--cuda-graph", "off") == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith(("--cuda-graph", "cuda graph"))]
    assert run(shards, tmp_path / "on", *cpu, "--cuda-graph", "on") == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("--cuda-graph", "cuda graph"))]
    assert said == ["--cuda-graph on: the device is cpu, which has no CUDA graphs; the same static-buffer step "
                    "runs uncaptured"]
    assert same_weights(tmp_path / "off", tmp_path / "on")
    (a,), (b,) = rows(tmp_path / "off"), rows(tmp_path / "on")
    assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]


def test_cuda_graph_on_without_the_cache_runs_the_ordinary_step_and_says_why(shards, cached_train):
    _, step = make("cpu")
    assert choose_step("on", step, None, ddp=False, report=pytest.fail) == (
        step, "--cuda-graph on: the train split streams from its loader, and the graph gathers its batches from "
              "the resident cache (--cache on); the ordinary step runs")
    assert choose_step("auto", step, cached_train.resident(), ddp=False, report=pytest.fail) == (step, None)


@pytest.mark.flag_effect("train.py", "--figures-every")
def test_figures_every_draws_every_nth_epoch_and_the_last(shards, tmp_path):
    # --cache-file off: earlier tests' runs may have left the session's shards a decoded file to load
    assert run(shards, tmp_path, "--epochs", "3", "--figures-every", "2", "--cache-file", "off") == 0
    drawn = sorted(p.name for p in tmp_path.glob("reconstructions_epoch*.png"))
    assert drawn == ["reconstructions_epoch2.png", "reconstructions_epoch3.png"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    timed = rows(tmp_path)
    assert [r["epoch"] for r in timed] == [1, 2, 3]
    # The per-epoch timings: every row has them; the first row of the run has the fill.
    for r in timed:
        for key in ("seconds", "eval_s", "figures_s", "checkpoint_s"):
            assert math.isfinite(r[key]) and r[key] >= 0, key
        assert r["eval_s"] > 0
    assert timed[0]["checkpoint_s"] == 0 and all(r["checkpoint_s"] > 0 for r in timed[1:])
    assert set(timed[0]["fill_s"]) == {"train", "val"} and all(v > 0 for v in timed[0]["fill_s"].values())
    assert timed[0]["fill_source"] == {"train": "decoded", "val": "decoded"}
    assert "fill_s" not in timed[1] and "compile_s" not in timed[0]  # nothing compiled before epoch 1


def test_a_failed_picture_stops_training_in_one_line_at_the_next_epoch(shards, tmp_path, monkeypatch, capsys):
    """The drawing thread's error reaches the training thread as one line, which points to the last
    checkpoint; the run does not mark itself finished."""
    def broken(rows, path):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr("model.figures.save_curves", broken)
    assert train.run(["--data-path", str(shards), "--output-dir", str(tmp_path), *FAST, "--epochs", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot write {tmp_path / 'curves.png'} (No space left on device); the last "
                              f"good checkpoint, {tmp_path / 'checkpoint.pt'} (epoch 1), is untouched")
    assert len([line for line in err if line.startswith("error")]) == 1
    assert not (tmp_path / "vae_celeba.pth").exists()


def test_inductor_keeps_its_compiled_graphs_on_disk():
    """Compile once per machine: inductor's FX graph cache and AOTAutograd's cache, on by default in the
    torch this project runs (docs/cuda-paths.md); a torch that turned them off would recompile every run."""
    assert torch._inductor.config.fx_graph_cache
    assert torch._functorch.config.enable_autograd_cache


# ----------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def cuda_cache(shards):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return build_loader("cache", shards, "train", BATCH, "cuda", workers=1, seed=3, source="torch")


def twenty_steps(static):
    """Epoch 0 whole (12 steps), then 8 steps of epoch 1 with no host synchronisation; the sums of both."""
    static.set_epoch(0)
    for _ in range(static.steps):
        static()
    first = static.sums.clone()
    static.set_epoch(1)  # one host-to-device copy of the plan, before the epoch's steps
    torch.cuda.synchronize()
    with no_host_sync():
        for _ in range(8):
            static()
    return first, static.sums.clone()


# Tolerance: the graph replays the kernels the uncaptured step launches, on the same weights, batches
# and Philox offsets, so they differ only where a kernel is not deterministic (cuDNN's backward
# reductions); Adam turns a sign flip of a near-zero gradient into a full step of that weight, so the
# bound is on the whole weight vector: 1% of the distance the 20 steps moved it, and the loss sums to
# 1e-3 (fp32) or 1e-2 (bf16, fp16) of their value.
@cuda
@pytest.mark.parametrize("amp, compile", [("off", False), ("fp16", False), ("bf16", True)],
                         ids=["fp32", "fp16 + GradScaler", "bf16 compiled"])
def test_the_graphed_step_matches_the_uncaptured_one_after_20_steps(cuda_cache, amp, compile):
    assert cuda_cache.flip and len(cuda_cache) == 12
    torch._dynamo.reset()
    start = weights(make("cuda", amp, compile)[0])
    runs = {}
    for capture in (False, True):
        model, step = make("cuda", amp, compile)
        torch.manual_seed(1)
        static = StaticStep(step, cuda_cache.resident(), capture=capture, report=pytest.fail)
        assert static.graphed == capture, static.why
        runs[capture] = model, step, twenty_steps(static)
    (ref, ref_step, ref_sums), (got, got_step, got_sums) = runs[False], runs[True]
    flat = lambda m: torch.cat([p.detach().flatten().float() for p in m.parameters()])  # noqa: E731
    moved = (flat(ref) - torch.cat([w.flatten().float() for w in start])).norm()
    assert moved > 0
    assert (flat(got) - flat(ref)).norm() <= 0.01 * moved
    for a, b in zip(ref_sums, got_sums):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-3 if amp == "off" else 1e-2, atol=0)
    if amp == "fp16":  # the scale lives in the graph: it must tell the same story as the eager one's
        assert got_step.scaler.get_scale() == ref_step.scaler.get_scale()
    torch._dynamo.reset()


@cuda
def test_a_failed_capture_is_one_line_and_the_step_trains_uncaptured(cuda_cache):
    """A host read inside the captured step (not capturable) makes the capture fail: one reported line,
    the warm-up undone, and the epoch trains uncaptured to the weights of a step that never tried."""
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    start = flat(make("cuda")[0])
    ref_model, ref_step = make("cuda")
    torch.manual_seed(1)
    ref = StaticStep(ref_step, cuda_cache.resident(), capture=False)
    model, step = make("cuda")
    real = step.forward_loss

    def reads_the_loss(images):
        out = real(images)
        if torch.cuda.is_current_stream_capturing():
            out.loss.item()
        return out
    step.forward_loss = reads_the_loss
    said = []
    torch.manual_seed(1)
    static = StaticStep(step, cuda_cache.resident(), capture=True, report=said.append)
    assert not static.graphed and len(said) == 1 and said[0].startswith("cuda graph: capture failed ("), said
    assert all(not group["capturable"] for group in step.optimizer.param_groups)
    for runner in (ref, static):
        runner.set_epoch(0)
        for _ in range(runner.steps):
            runner()
    moved = (flat(ref_model) - start).norm()
    assert (flat(model) - flat(ref_model)).norm() <= 0.01 * moved
    torch.testing.assert_close(static.sums, ref.sums, rtol=1e-3, atol=0)


@cuda
def test_a_failed_capture_puts_back_the_stream_it_found(cuda_cache):
    """torch.cuda.graph's __exit__ raises from capture_end() before it restores the current stream: after
    the fallback the stream that was current before the capture (here a stream of the test's own, not the
    default one) is current again, not the capture's side stream (docs/cuda-paths.md, section 12)."""
    _, step = make("cuda")
    real = step.forward_loss

    def reads_the_loss(images):
        out = real(images)
        if torch.cuda.is_current_stream_capturing():
            out.loss.item()
        return out
    step.forward_loss = reads_the_loss
    mine = torch.cuda.Stream()
    with torch.cuda.stream(mine):
        static = StaticStep(step, cuda_cache, capture=True, report=lambda line: None)
        assert not static.graphed
        assert torch.cuda.current_stream() == mine, "the capture's side stream is still current"
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


@cuda
def test_train_py_graphs_and_compiles_once_over_epochs(shards, tmp_path, capsys):
    """train.py on CUDA with --cuda-graph on over three epochs: the capture succeeds, nothing compiles
    again after the first epoch (error_on_recompile), the first row has compile_s apart."""
    torch._dynamo.reset()
    args = train.parse_args(["--data-path", str(shards), "--output-dir", str(tmp_path), "--batch-size", str(BATCH),
                             "--workers", "1", "--epochs", "3", "--device", "cuda", "--cache", "on",
                             "--cuda-graph", "on"])
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "cuda graph: captured" in out, out
    timed = rows(tmp_path)
    assert len(timed) == 3 and timed[0]["compile_s"] > 0 and timed[0]["fill_source"]["train"]
    assert timed[-1]["train_loss"] < timed[0]["train_loss"]
    torch._dynamo.reset()
