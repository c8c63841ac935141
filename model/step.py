"""One optimisation step, shared by train.py and benchmarks/throughput.py so both run the same work.

    optimizer = make_optimizer(model.parameters(), lr=3e-4, device=device)
    step = TrainStep(model, optimizer, device, amp="bf16", channels_last=True, compile=True)
    stats = step(images)  # uint8 (B, 3, 64, 64) batch -> VAELoss of detached tensors, no host sync

    graphed = StaticStep(step, cached_train_loader.resident(), capture=True)  # warms up, captures one graph
    graphed.set_epoch(epoch)  # the epoch's rows and flips into its static plan; sums and position to zero
    for _ in range(graphed.steps):
        graphed()             # one step: a graph replay (or the same ops uncaptured)
    graphed.sums              # (4,) device tensor: the VAELoss fields summed over the epoch's steps so far
    for sums in step.epoch(loader, epoch): ...  # either step, as train.py runs them: the sums after each step
"""

import os
import platform
import shutil
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Callable, Iterator, Protocol

import torch
from torch.amp.grad_scaler import _refresh_per_optimizer_state

from common.cli import first_line
from model.loss import BETA, VAELoss, vae_loss

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def native_bf16_cpu() -> str | None:
    """The instruction set that makes bf16 fast on this CPU, or None.

    Only bf16 arithmetic units count: avx512_bf16 (AMD Zen 4+, Intel Cooper Lake+) or AMX tiles
    (Intel Sapphire Rapids+), as cpuinfo reports them through torch. oneDNN's own bf16 check
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) is not used: it also says yes on plain AVX-512,
    where bf16 is emulated and the step runs several times slower than fp32.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # not measured on other CPUs: stay in fp32
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return None


def resolve_compile(compile: bool | None, device, amp: str) -> tuple[bool, str]:
    """train.py's --compile made concrete: (on, why). Given, it is kept. Left out: on for CUDA; on a CPU
    with bf16 autocast when inductor finds its C++ compiler, where it made the step reliably faster for a
    cold compile that is small beside 40 CelebA epochs; off in fp32 on a CPU, where its gain varied from
    run to run and was not reliable. benchmarks/RESULTS.md has the figures."""
    if compile is not None:
        return compile, "as asked"
    device = torch.device(device)
    if device.type == "cuda":
        return True, "CUDA"
    if device.type == "cpu" and amp == "bf16":
        compiler = os.environ.get("CXX", "g++")  # what inductor calls to build its CPU kernels
        if shutil.which(compiler) is None:
            return False, f"no C++ compiler ({compiler}) for inductor's CPU kernels"
        return True, "bf16 on this CPU"
    return False, "fp32 on a CPU, where it does not pay"


def resolve_amp(amp: str, device) -> tuple[str, str]:
    """`--amp auto` made concrete for `device`: (bf16 | fp16 | off, why)."""
    device = torch.device(device)
    if amp != "auto":
        return amp, "as asked"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU computes bf16"
        return "off", "this GPU has no bf16 (fp16 with a GradScaler is --amp fp16)"
    if device.type == "cpu":
        found = native_bf16_cpu()
        if found:
            return "bf16", f"this CPU computes bf16 natively ({found})"
        return "off", "this CPU has no native bf16 (avx512_bf16 or AMX), where bf16 runs slower than fp32"
    return "off", f"no mixed precision chosen for {device.type}"


def make_optimizer(params, lr: float, device) -> torch.optim.Adam:
    """Adam; on CUDA its fused kernel, which torch documents as the fastest, and which takes the
    GradScaler's scale and inf flag as device tensors: the fp16 step then never reads them on the host
    (the unfused path calls .item() on the inf flag every step)."""
    fused = torch.device(device).type == "cuda" or None
    optimizer = torch.optim.Adam(params, lr=lr, fused=fused)

    def keep_this_kernel(optimizer):
        # A checkpoint's param groups carry the choice of the machine that saved it, which load_state_dict
        # restores: a CPU checkpoint would turn fused off on CUDA, where GradScaler still hands the step its
        # scale (as `_step_supports_amp_scaling` says) and the unfused step refuses it.
        for group in optimizer.param_groups:
            group["fused"] = fused
            # StaticStep turns capturable on for its capture; the run that saved it may have graphed, this
            # one may not (on a CPU capturable refuses to step).
            group["capturable"] = optimizer.defaults["capturable"]
            for p in group["params"] if fused else ():
                state = optimizer.state.get(p, {})
                if "step" in state:  # the fused kernel reads the step count on the device, in float32
                    state["step"] = state["step"].to(p.device, torch.float32)

    optimizer.register_load_state_dict_post_hook(keep_this_kernel)
    return optimizer


def to_float(images: torch.Tensor, memory_format=torch.channels_last) -> torch.Tensor:
    """uint8 batch -> float in [0, 1], converted on the device at the last moment (4x less to move)."""
    return images.to(memory_format=memory_format).float().div_(255)


class TrainStep:
    def __init__(self, model, optimizer, device, *, amp: str = "off", channels_last: bool = True,
                 compile: bool = False, compile_mode: str | None = None, beta: float = BETA):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, not {amp!r}")
        device = torch.device(device)
        self.model, self.optimizer, self.beta, self.device = model, optimizer, beta, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        dtype = AMP_DTYPES[amp]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        # The forward and the loss are compiled together; backward follows through AOTAutograd.
        self.compiled = compile
        self.compile_seconds = None  # the warm-up before epoch 1, which StaticStep times; this step has none
        self.forward_loss = torch.compile(self._forward_loss, mode=compile_mode) if compile else self._forward_loss

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        return to_float(images, self.memory_format)

    def _forward_loss(self, images: torch.Tensor) -> VAELoss:
        x = self.to_input(images)
        with self.autocast():
            x_hat, mu, logvar = self.model(x)
        return vae_loss(x_hat, x, mu, logvar, self.beta)  # fp32, outside autocast

    def __call__(self, images: torch.Tensor) -> VAELoss:
        out = self.forward_loss(images)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return VAELoss(*(t.detach() for t in out))

    def epoch(self, loader, epoch: int) -> Iterator[torch.Tensor]:
        """Steps over the batches of `loader` (set to `epoch` by its owner); yields after each step the
        VAELoss fields summed so far, a (4,) tensor on the device (read it and the host waits)."""
        sums = torch.zeros(len(VAELoss._fields), device=self.device)
        for images in loader:
            sums += torch.stack(self(images))
            yield sums


# ----------------------------------------------------------------------------- the static-buffer step

CAPTURE_WARMUP = 3  # eager steps before capture, as in PyTorch's whole-network example (cuDNN's and
# inductor's choices, AccumulateGrad's buffers and Adam's state are all made before the graph is)


class Resident(Protocol):
    """A training split resident on the device, handed over by the cache (pipeline/cache.py's
    CachedLoader.resident()): `steps` batches of `batch_size` per epoch, their `plan(epoch)` (rows and
    flip coins on the CPU, as the loader draws them) and `gather(rows, flips)`, the loader's own batch."""
    batch_size: int
    steps: int
    flip: bool
    plan: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]

    def gather(self, rows: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor: ...


class StaticStep:
    """TrainStep over a resident cache with every tensor at a fixed address, so that on CUDA the whole
    step -- gather, flips, forward, fp32 loss, backward, fused Adam, the loss sums -- is one CUDA graph.

    Per epoch, `set_epoch` copies the resident split's plan (its rows and flip coins for the epoch, drawn
    on the CPU from (seed, epoch) as the loader draws them) into a static (steps, B) buffer on the device.
    Each step reads its row of the plan at a device-side position counter, gathers the batch from the
    cache with the loader's own `gather`, runs `train_step` (whose reparameterisation noise comes from the
    default generator, which a capture registers and each replay advances), adds the VAELoss fields
    into `sums` and advances the counter: the host does nothing but launch. Uncaptured (CPU, DDP, or
    a capture that failed) it runs the same ops, so its steps equal the loader-fed TrainStep's bit for
    bit on the CPU, where they are tested.

    `capture`: warm up and capture a CUDA graph (CUDA only; a failed capture is reported in one line
    through `report` and the step runs uncaptured). `warmup`: eager steps first, by default
    CAPTURE_WARMUP before a capture, else 1 when the step is compiled (its compile), else none. They
    are undone -- weights, Adam's and the GradScaler's state, the random generators -- so training
    starts from where it stood. `compile_seconds` is how long the warm-up and capture took (None without
    them); `graphed` says whether replays run, `why` says so in words. `steps` calls per `set_epoch`.
    """

    def __init__(self, train_step: TrainStep, resident: Resident, *, capture: bool, warmup: int | None = None,
                 report=print, epoch: int = 0):
        self.train_step, self.resident, self.device = train_step, resident, train_step.device
        self.batch_size, self.steps = resident.batch_size, resident.steps
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        shape = (self.steps, self.batch_size)
        self.rows = torch.zeros(shape, dtype=torch.int64, device=self.device)
        self.flips = torch.zeros(shape, dtype=torch.bool, device=self.device) if resident.flip else None
        self.position = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.sums = torch.zeros(len(VAELoss._fields), device=self.device)
        self.graph, self.compile_seconds, self.why = None, None, "uncaptured"
        self.set_epoch(epoch)
        if warmup is None:
            warmup = CAPTURE_WARMUP if capture else 1 if train_step.compiled else 0
        if capture or warmup:
            started = time.perf_counter()
            stream = torch.cuda.Stream(self.device) if capture else None
            saved = self._snapshot()
            self._warm_up(warmup, stream)
            self._restore(saved)
            if capture:
                current = torch.cuda.current_stream(self.device)
                try:
                    self._capture(stream)
                    self.why = "captured: each step is one CUDA graph replay"
                except Exception as exn:  # noqa: BLE001 -- any failure to capture leaves the eager step
                    # torch.cuda.graph's __exit__ raises from capture_end() before it puts the stream back,
                    # and a failed capture_begin() never reaches __exit__: the capture's side stream would
                    # stay current for the rest of the run (docs/cuda-paths.md, section 12).
                    torch.cuda.set_stream(current)
                    self.graph = None
                    for group in train_step.optimizer.param_groups:
                        group["capturable"] = train_step.optimizer.defaults["capturable"]
                    self._restore(saved)
                    self.why = (f"capture failed ({type(exn).__name__}: {first_line(exn)}); the same step runs "
                                "uncaptured")
                    report(f"cuda graph: {self.why}")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_seconds = time.perf_counter() - started
        self.set_epoch(epoch)

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def set_epoch(self, epoch: int) -> None:
        """The plan of `epoch` into the static buffers (one copy each, before the epoch's steps); the
        position and the sums back to zero."""
        rows, flips = self.resident.plan(epoch)
        self.rows.copy_(rows.view(self.rows.shape))
        if self.flips is not None:
            self.flips.copy_(flips.view(self.flips.shape))
        self.position.zero_()
        self.sums.zero_()
        self.taken = 0  # steps since, counted on the host: past the plan's last row the gather would fault

    def _step(self) -> None:
        rows = self.rows.index_select(0, self.position).view(-1)
        flips = None if self.flips is None else self.flips.index_select(0, self.position).view(-1)
        out = self.train_step(self.resident.gather(rows, flips))
        self.sums += torch.stack(out)
        self.position += 1

    def __call__(self) -> None:
        if self.taken == self.steps:
            raise RuntimeError(f"the epoch's {self.steps} steps are taken: call set_epoch() for the next epoch")
        self.taken += 1
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def epoch(self, loader, epoch: int) -> Iterator[torch.Tensor]:
        """TrainStep.epoch's face: the `steps` of `epoch` (the loader's batches are gathered here, so
        `loader` is not read); yields `sums` after each step."""
        self.set_epoch(epoch)
        for _ in range(self.steps):
            self()
            yield self.sums

    # ------------------------------------------------------------------------- warm-up and capture

    def _warm_up(self, steps: int, stream) -> None:
        steps = min(steps, self.steps)
        if stream is None:
            for _ in range(steps):
                self._step()
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # PyTorch's rule: warm up on the side stream that captures
            for _ in range(steps):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _capture(self, stream) -> None:
        optimizer = self.train_step.optimizer
        for group in optimizer.param_groups:
            group["capturable"] = True  # fused Adam computes alike either way; step() refuses capture without it
        optimizer.zero_grad(set_to_none=True)  # backward in the capture makes the grads, in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self._step()
        self.graph = graph

    def _snapshot(self) -> dict:
        """What the warm-up changes, to put back in place (the graph keeps these tensors' addresses)."""
        step = self.train_step
        state = {p: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for p, s in step.optimizer.state.items()}
        scaler = step.scaler
        scale = None
        if scaler.is_enabled() and getattr(scaler, "_scale", None) is not None:
            scale = (scaler._scale.clone(), scaler._growth_tracker.clone())
        return {"params": [p.detach().clone() for p in step.model.parameters()], "state": state,
                "scale": scale, "cpu_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    @torch.no_grad()
    def _restore(self, saved: dict) -> None:
        step = self.train_step
        for p, value in zip(step.model.parameters(), saved["params"]):
            p.copy_(value)
            p.grad = None
        for p, state in step.optimizer.state.items():
            before = saved["state"].get(p)
            for k, v in state.items():
                if torch.is_tensor(v):  # state made by the warm-up goes back to what a first step makes: zeros
                    v.copy_(before[k]) if before is not None else v.zero_()
        scaler = step.scaler
        if scaler.is_enabled():
            if getattr(scaler, "_scale", None) is not None:
                if saved["scale"] is not None:
                    scaler._scale.copy_(saved["scale"][0])
                    scaler._growth_tracker.copy_(saved["scale"][1])
                else:
                    scaler._scale.fill_(scaler._init_scale)
                    scaler._growth_tracker.fill_(scaler._init_growth_tracker)
            # A capture that failed part-way may leave the scaler between unscale and update.
            scaler._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)
        torch.set_rng_state(saved["cpu_rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)


def choose_step(mode: str, train_step: TrainStep, resident: Resident | None, ddp: bool, report):
    """train.py's --cuda-graph made concrete for the train split (`resident`, or None when it streams): the
    step to train with, a StaticStep (captured or not) or `train_step`; and a line saying what runs and
    why (None when nothing needs saying)."""
    if mode != "on":
        return train_step, None
    if resident is None:
        return train_step, ("--cuda-graph on: the train split streams from its loader, and the graph gathers its "
                            "batches from the resident cache (--cache on); the ordinary step runs")
    if train_step.device.type != "cuda":
        return StaticStep(train_step, resident, capture=False), (
            f"--cuda-graph on: the device is {train_step.device.type}, which has no CUDA graphs; the same "
            "static-buffer step runs uncaptured")
    if ddp:
        # PyTorch's CUDA notes ask three things of DDP in a graph: NCCL's async error handling off (the
        # watchdog that --dist-timeout relies on to end a hung job), DDP built on the capture's side stream,
        # and 11 eager DDP steps before the capture. The first costs a guarantee, so it is not done.
        return StaticStep(train_step, resident, capture=False), (
            "--cuda-graph on: not under torchrun, where a graph needs NCCL's async error handling off (the "
            "--dist-timeout watchdog); the same static-buffer step runs uncaptured")
    step = StaticStep(train_step, resident, capture=True, report=report)
    return step, f"cuda graph: {step.why}" if step.graphed else None
