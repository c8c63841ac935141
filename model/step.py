"""One optimisation step, shared by train.py and benchmarks/throughput.py so both run the same work.

    optimizer = make_optimizer(model.parameters(), lr=3e-4, device=device)
    step = TrainStep(model, optimizer, device, amp="bf16", channels_last=True, compile=True)
    stats = step(images)  # uint8 (B, 3, 64, 64) batch -> VAELoss of detached tensors, no host sync
"""

import os
import platform
import shutil
from contextlib import nullcontext

import torch

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
    with bf16 autocast when inductor finds its C++ compiler, where it made the step 1.17-1.19x faster
    (benchmarks/RESULTS.md; a cold compile took 13-15 s, 0.2% of 40 CelebA epochs there); off in fp32
    on a CPU, where it gained 0-17% over six runs, not a reliable 10%."""
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
