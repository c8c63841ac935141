"""The CUDA paths, where a GPU is present: each one against the CPU path that the rest of the suite tests.

Every test here is skipped without CUDA, with the reason; docs/cuda-paths.md says what each one checks
and which kernel or document decides it. benchmarks/gpu_check.sh runs this file on a GPU machine.
"""


import numpy as np
import pytest
import torch

import train
from conftest import no_host_sync
from model import VariationalAutoEncoder
from model.step import TrainStep, make_optimizer
from pipeline import build_loader

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BATCH = 16
CUDA = torch.device("cuda")
# Mean absolute difference (0..255) between a loader's CUDA batches and its CPU batches, averaged over
# the images. On the CPU both sides decode with libjpeg-turbo; on CUDA nvJPEG upsamples chroma its own
# way (libjpeg-turbo's simple upsampling against its default: 0.15 on these faces, measured on the CPU)
# and rounds its IDCT and colour conversion differently, and the torch loader's GPU resize runs in
# float32 (0.13 from the CPU's uint8 kernel, tests/test_loader.py). A window one pixel off gives 3 or
# more, a mirrored image about 16.
CUDA_BOUND = 1.0


def by_key(loader):
    return {k: image for images, keys in loader for k, image in zip(keys, images)}


def mean_difference(a: dict, b: dict, flip=False) -> float:
    assert a.keys() == b.keys() and a
    return float(np.mean([(a[k].float().cpu() - (b[k].flip(-1) if flip else b[k]).float().cpu()).abs().mean()
                          for k in a]))


def check_batches_on_cuda(loader):
    images, _ = next(iter(loader))
    assert images.device.type == "cuda" and images.dtype == torch.uint8 and images.shape == (BATCH, 3, 64, 64)
    assert images.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- loaders


def test_torch_loader_on_cuda_gives_the_cpu_images(shards):
    """nvJPEG decode, crop, float32 resize and rounding on the GPU against the workers' libjpeg-turbo path;
    with gpu_decode=False the workers' batches only travel to the GPU, so they are equal bit for bit."""
    cpu = by_key(build_loader("torch", shards, "val", BATCH, "cpu", workers=2, with_keys=True))
    gpu_loader = build_loader("torch", shards, "val", BATCH, CUDA, workers=2, with_keys=True)
    assert gpu_loader.gpu_decode
    check_batches_on_cuda(gpu_loader)
    gpu = by_key(gpu_loader)
    assert mean_difference(gpu, cpu) < CUDA_BOUND
    assert mean_difference(gpu, cpu, flip=True) > 5 * CUDA_BOUND, "the bound must tell a mirrored image"
    copied = by_key(build_loader("torch", shards, "val", BATCH, CUDA, workers=2, with_keys=True, gpu_decode=False))
    assert all(torch.equal(copied[k].cpu(), cpu[k]) for k in cpu)


def test_torch_loader_flips_on_cuda_as_on_the_cpu(shards):
    """Training batches: the same flips from the same seed, whether the workers or the GPU apply them."""
    cpu = by_key(build_loader("torch", shards, "train", BATCH, "cpu", workers=2, with_keys=True))
    gpu = by_key(build_loader("torch", shards, "train", BATCH, CUDA, workers=2, with_keys=True))
    assert mean_difference(gpu, cpu) < CUDA_BOUND


def test_device_decode_does_not_wait_for_queued_training_work(shards):
    """The decoders synchronise their stream with the host; the loader gives them a side stream, so a
    batch comes back while work queued before it on the current stream is still running."""
    loader = build_loader("torch", shards, "train", BATCH, CUDA, workers=2)
    batches = iter(loader)
    next(batches)  # workers started, decoder made, the prefetch queue filling
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time, standing for a queued training step
    images = next(batches)
    still_running = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_running, "the decode waited for the work queued on the current stream"
    assert images.float().std() > 10  # and the batch is real pictures


def test_the_torchvision_fallback_decode_leaves_queued_reads_alone(faces_dir):
    """torchvision's decode_jpeg allocates its outputs on the current stream and writes them from a pool
    stream of its own (pytorch/vision#9606). Blocks freed while reductions over them are still queued
    behind a long kernel must not be overwritten before those reductions run: each must still read
    the value its tensor was filled with."""
    from pipeline.torch_loader import _torchvision_decode
    jpeg = next(iter(sorted(faces_dir.iterdir()))).read_bytes()
    data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
    (probe,) = _torchvision_decode([data], CUDA)
    shape, n = probe.shape, 8
    stream = torch.cuda.Stream()
    wrong = 0
    with torch.cuda.stream(stream):
        for round_ in range(10):
            tensors = [torch.full(shape, 1 + k, dtype=torch.uint8, device=CUDA) for k in range(n)]
            torch.cuda.synchronize()
            torch.cuda._sleep(50_000_000)  # tens of milliseconds of queued GPU work
            sums = [t.sum(dtype=torch.int64) for t in tensors]  # queued behind the sleep
            del tensors  # freed in stream order: the allocator may hand these blocks out at once
            images = _torchvision_decode([data] * n, CUDA)
            stream.synchronize()
            wrong += sum(int(s) != (1 + k) * probe.numel() for k, s in enumerate(sums))
            assert all(torch.equal(image, probe) for image in images)
    assert wrong == 0, f"{wrong} reductions read pixels the decoder wrote into their freed blocks"


def test_dali_mixed_pipeline_gives_the_cpu_images(shards):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")
    cpu = by_key(build_loader("dali", shards, "val", BATCH, "cpu", with_keys=True))
    gpu_loader = build_loader("dali", shards, "val", BATCH, CUDA, with_keys=True)
    check_batches_on_cuda(gpu_loader)
    gpu = by_key(gpu_loader)
    assert mean_difference(gpu, cpu) < CUDA_BOUND
    assert mean_difference(gpu, cpu, flip=True) > 5 * CUDA_BOUND


# ----------------------------------------------------------------------------- the training step


def make_step(amp, compile, seed=0, compile_mode=None):
    torch.manual_seed(seed)
    model = VariationalAutoEncoder().to(CUDA, memory_format=torch.channels_last)
    return model, TrainStep(model, make_optimizer(model.parameters(), 3e-4, CUDA), CUDA, amp=amp, compile=compile,
                            compile_mode=compile_mode)


def faces(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g).to(
        CUDA, memory_format=torch.channels_last)


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def test_compiled_bf16_step_matches_eager_and_does_not_sync():
    """Same weights, batch and noise (fallback_random: the compiled graph draws the eager way): the
    losses agree to bf16 precision and the gradients point the same way. After its first call the
    compiled step runs without a host synchronisation."""
    torch._dynamo.reset()
    eager_model, eager = make_step("bf16", compile=False)
    compiled_model, compiled = make_step("bf16", compile=True)
    x = faces()
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(1)
        a = eager(x)
        torch.manual_seed(1)
        b = compiled(x)
    for name, u, v in zip(a._fields, a, b):
        assert torch.isfinite(u) and torch.isfinite(v)
        # KL is small at initialisation and sums bf16 encoder outputs: it gets the looser bound
        assert v.item() == pytest.approx(u.item(), rel=5e-2 if name == "kl" else 1e-2), name
    grads = [(p.grad, q.grad) for p, q in zip(eager_model.parameters(), compiled_model.parameters())]
    assert cosine(torch.cat([g.flatten() for g, _ in grads]), torch.cat([g.flatten() for _, g in grads])) > 0.99
    assert min(cosine(g, h) for g, h in grads) > 0.9
    with no_host_sync():
        for _ in range(3):
            out = compiled(x)
    assert all(torch.isfinite(t) for t in out)


def test_fp16_with_the_grad_scaler_takes_two_steps_without_host_sync():
    """fp16 autocast, GradScaler and fused Adam: the scaler hands the optimizer its inf flag on the device,
    so neither step reads it on the host (a first step, outside the check, lets cuDNN pick its kernels).
    A step with inf gradients is skipped and halves the scale: the optimizer's step count and the scale
    must tell the same story, and the weights move in a step that counts."""
    model, step = make_step("fp16", compile=False)
    assert step.scaler.is_enabled() and step.optimizer.defaults["fused"]
    step(faces(seed=0))
    before = [p.detach().clone() for p in model.parameters()]
    counted = step.optimizer.state[next(model.parameters())]["step"].item()
    batches = [faces(seed=i) for i in (1, 2)]  # made here: their copy to the GPU is a blocking one
    with no_host_sync():
        losses = [torch.stack(step(x)) for x in batches]
    assert all(torch.isfinite(loss).all() for loss in losses)
    taken = step.optimizer.state[next(model.parameters())]["step"].item()
    skipped = 3 - taken
    assert 0 <= skipped <= 3 and step.scaler.get_scale() == 2.0 ** 16 * 0.5 ** skipped
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert moved == (taken > counted)
    assert taken > 0, "three fp16 steps in a row overflowed: the loss scale does not come down"


def test_cuda_graphs_capture_the_step():
    """The benchmark's compile-cudagraphs row: forward, loss and backward replay as CUDA graphs (no skip),
    a new graph generation starts after each backward, and each step's statistics are read before the
    next replay overwrites them."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    skips = counters["inductor"]["cudagraph_skips"]
    _, step = make_step("bf16", compile=True, compile_mode="reduce-overhead")
    stats = [torch.stack(step(faces(seed=i % 2))) for i in range(6)]
    assert counters["inductor"]["cudagraph_skips"] == skips, "inductor did not graph the step"
    assert all(torch.isfinite(s).all() for s in stats)
    assert not torch.equal(stats[-1], stats[-2]), "two batches gave the same statistics"
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- train.py on CUDA


def test_an_epoch_with_a_partial_evaluation_batch_compiles_once(shards, tmp_path):
    """train.py's defaults on CUDA (torch loader decoding on the GPU, bf16, compile, fused Adam) over two
    epochs whose evaluation ends on a partial batch: two graphs (the training step's and evaluation's,
    whose batch size is dynamic), no graph break, no recompilation."""
    val = build_loader("torch", shards, "val", BATCH, "cpu", workers=0)
    assert val.num_samples % BATCH, "the validation split must end on a partial batch"
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    args = train.parse_args(["--data-path", str(shards), "--output-dir", str(tmp_path), "--batch-size", str(BATCH),
                             "--workers", "2", "--epochs", "2", "--device", "cuda"])
    assert args.compile is None and args.amp == "auto"  # the defaults, resolved on CUDA
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert train.main(args) == 0
    assert counters["stats"]["unique_graphs"] == 2 and counters["frames"]["ok"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and (tmp_path / "vae_celeba.pth").exists()


def test_ddp_over_nccl_with_compile(tmp_path):
    """One rank of DDP over NCCL, compiled: DDP's forward breaks the graph (docs/cuda-paths.md) and
    DDPOptimizer compiles the model inside it. With one rank the all-reduced gradients are the local
    ones: after each step they must point where the plain compiled step's do, and the losses agree."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch._dynamo.reset()
    plain_model, plain = make_step("bf16", compile=True)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        torch.manual_seed(0)
        raw = VariationalAutoEncoder().to(CUDA, memory_format=torch.channels_last)
        ddp = TrainStep(DistributedDataParallel(raw), make_optimizer(raw.parameters(), 3e-4, CUDA), CUDA,
                        amp="bf16", compile=True)
        with torch._inductor.config.patch(fallback_random=True):
            for i in range(2):
                torch.manual_seed(10 + i)
                a = plain(faces(seed=i))
                torch.manual_seed(10 + i)
                b = ddp(faces(seed=i))
                assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-2)
                grads = [(p.grad, q.grad) for p, q in zip(plain_model.parameters(), raw.parameters())]
                assert all(g is not None and h is not None for g, h in grads), "DDP left a gradient unset"
                assert cosine(torch.cat([g.flatten() for g, _ in grads]),
                              torch.cat([h.flatten() for _, h in grads])) > 0.99
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def test_the_background_checkpoint_copies_through_pinned_memory_what_the_gpu_holds(tmp_path):
    """CheckpointWriter on CUDA: pinned buffers, copies that the host does not wait for, and a written
    checkpoint whose every tensor equals the device's at the moment of save, though training went on."""
    from run.checkpoint import CheckpointWriter, checkpoint_state, rng_state

    torch.manual_seed(0)
    model = VariationalAutoEncoder(z_dim=16).to(CUDA)
    optimizer = make_optimizer(model.parameters(), 3e-4, CUDA)
    step = TrainStep(model, optimizer, CUDA, amp="bf16")
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, device=CUDA)
    step(images)
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    writer = CheckpointWriter(tmp_path / "checkpoint.pt")
    writer.save(checkpoint_state(model, optimizer, step.scaler, 1, {}, 1, [rng_state(CUDA)]))
    assert all(b.is_pinned() for b in writer.buffers.values())
    for _ in range(3):
        step(images)  # changes the weights in place while the writer works
    writer.wait()
    writer.raise_failure()
    saved = torch.load(tmp_path / "checkpoint.pt")
    assert all(torch.equal(saved["model"][k], expected[k]) for k in expected)
    assert saved["rng"][0]["cuda"] is not None
