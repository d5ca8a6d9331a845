"""Device and precision: which device a run uses, and mixed precision / channels_last on it."""
import contextlib

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
    elif spec != "cpu":
        raise UserError(f"device '{spec}' unknown; allowed: auto, cpu, cuda, cuda:<i>")
    return torch.device(spec)


def device_check(v):
    return None if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()) else \
        "allowed: auto, cpu, cuda, cuda:<i>"


class Precision:
    """Mixed precision where the hardware has it: bf16 autocast on CPUs with bf16, bf16 (or fp16 with a gradient
    scaler) on CUDA. Losses are computed by callers in fp32 (logits are cast with .float())."""

    def __init__(self, device: torch.device, amp: bool, channels_last: bool):
        self.device = device
        self.channels_last = channels_last
        self.dtype = None
        if amp:
            if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
                self.dtype = torch.bfloat16
            elif device.type == "cuda":
                self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    @property
    def description(self):
        return f"{self.dtype or 'fp32'}{' + channels_last' if self.channels_last else ''}"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare_model(self, model):
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

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
