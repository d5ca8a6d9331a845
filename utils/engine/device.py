"""Device and precision: which device a run uses, mixed precision / channels_last / torch.compile on it, and
moving CPU-drawn tensors (random draws, indices) onto it without a host sync."""
import contextlib
import shutil

import torch

from utils.errors import UserError


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {spec} requested but CUDA is not available here; use --device cpu or auto")
        idx = int(spec.split(":")[1]) if ":" in spec else 0
        if idx >= torch.cuda.device_count():
            raise UserError(f"device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(idx)   # synchronize, the bf16 check and new tensors then act on this card
        return torch.device("cuda", idx)
    if spec != "cpu":
        raise UserError(f"device '{spec}' unknown; allowed: auto, cpu, cuda, cuda:<i>")
    return torch.device(spec)


def device_check(v):
    return None if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()) else \
        "allowed: auto, cpu, cuda, cuda:<i>"


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A tensor made on the CPU (a random draw, a batch of indices) on `device`. To a GPU the copy goes from pinned
    memory without blocking, so the host does not wait for the queued kernels (a plain .to() would, every step)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def cpu_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cuda_low_precision() -> torch.dtype:
    """bf16 where the current card (pick_device made it current) computes it natively, Ampere and later; fp16 with a
    gradient scaler otherwise. is_bf16_supported() alone also answers True through emulation on older cards (T4,
    RTX 20xx), whose cuDNN has no bf16 convolutions."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(device, choice):
    """--compile true: CUDA graphs on a GPU (a ResNet-18 step at batch 128 is bound by kernel launches there),
    inductor's default on a CPU. A mode name chooses it."""
    if choice is True:
        return "reduce-overhead" if device.type == "cuda" else "default"
    return choice


def compile_unavailable(device):
    """Why torch.compile cannot run here, or None: a tiny function compiled and run on the device tells."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "no C++ compiler (g++) on this machine, which inductor needs on a CPU"
    try:
        f = torch.compile(lambda t: t * 2 + 1, dynamic=False)
        f(torch.ones(4, device=device))
    except Exception as e:   # a missing toolchain shows up as anything from ImportError to a backend failure
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    return None


class Precision:
    """How the model runs: bf16 autocast on CPUs with bf16, bf16 (or fp16 with a gradient scaler) on CUDA, or plain
    fp32 (never TF32); channels_last; optionally torch.compile. Losses are computed by callers in fp32 (logits are
    cast with .float()). amp and channels_last are resolved booleans (utils/engine/probe.py decides 'auto')."""

    def __init__(self, device: torch.device, amp: bool, channels_last: bool, compile=False):
        self.device = device
        self.channels_last = bool(channels_last)
        self.dtype = None
        if amp:
            if device.type == "cpu" and cpu_bf16():
                self.dtype = torch.bfloat16
            elif device.type == "cuda":
                self.dtype = cuda_low_precision()
        # plain fp32 means fp32: torch would otherwise run cuDNN convolutions in TF32 on Ampere and later
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.compile = None
        if compile:
            why = compile_unavailable(device)
            if why:
                print(f"warning: --compile: torch.compile is unavailable here ({why}); running eager")
            else:
                self.compile = compile_mode(device, compile)

    @property
    def description(self):
        return (f"{self.dtype or 'fp32'}{' + channels_last' if self.channels_last else ''}"
                f"{f' + compile ({self.compile})' if self.compile else ''}")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare_model(self, model):
        """On the device, in the memory format, and compiled in place (its state_dict keeps its keys). Static shapes:
        a new batch shape compiles a graph of its own, so evaluation pads its last batch (utils/engine/evaluate.py)."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            model.compile(mode=self.compile, dynamic=False)
        return model

    def prepare_input(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    # checkpoints hold the fp16 gradient scaler's state, so that --resume equals an uninterrupted run there too
    def state_dict(self):
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, d):
        if self.scaler is not None and d.get("scaler"):
            self.scaler.load_state_dict(d["scaler"])

    def step(self, loss, optimizer):
        """backward + optimiser step (with the fp16 scaler where there is one)."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()
