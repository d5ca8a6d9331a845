"""Training machinery shared by every method: device and precision, batched tensor augmentation, optimiser and
scheduler factories, the supervised epoch, evaluation, and the epoch loop with checkpoints and --resume."""
import contextlib
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.errors import UserError
from utils.metrics import accuracy


# --- device and precision ------------------------------------------------------------------------

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


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode inside, its previous mode restored afterwards (also on an error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# --- augmentation on batches -----------------------------------------------------------------------

def random_crop_flip(x: torch.Tensor, gen: torch.Generator, padding: int = 4, flip: bool = False) -> torch.Tensor:
    """RandomCrop(H x W, padding, zero fill) and optionally RandomHorizontalFlip(0.5), independently per sample,
    on a whole float batch. Equivalent to the per-image torchvision transforms, without any per-image loop."""
    b, c, h, w = x.shape
    if padding > 0:
        off = torch.randint(0, 2 * padding + 1, (2, b), generator=gen, device=gen.device).to(x.device)
        xp = F.pad(x, (padding, padding, padding, padding))
        rows = (off[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (off[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = xp[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
               rows, cols]
    if flip:
        m = (torch.rand(b, generator=gen, device=gen.device) < 0.5).to(x.device)
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(255)


# --- optimisers and schedules (conventions §5) --------------------------------------------------------

def make_optimizer(params, cfg):
    name = cfg["client_optimizer"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["sgd_momentum"], weight_decay=cfg["wd"])
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["wd"], amsgrad=cfg.get("amsgrad", True))
    raise UserError(f"client_optimizer '{name}' unknown; allowed: sgd, adam")


def make_scheduler(optimizer, cfg):
    name = cfg["lr_scheduler"]
    if name == "CosineAnnealingLR":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["cos_t_max"], eta_min=cfg.get("eta_min", 0.0))
    if name == "ReduceLROnPlateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.get("ReduceLROnPlateau_factor", 0.1),
                                                          patience=10)
    if name == "none":
        return None
    raise UserError(f"lr_scheduler '{name}' unknown; allowed: CosineAnnealingLR, ReduceLROnPlateau, none")


def scheduler_step(scheduler, train_loss):
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(train_loss)
    else:
        scheduler.step()


# --- batches, training epoch, evaluation --------------------------------------------------------------

def batch_indices(n: int, batch_size: int, gen: torch.Generator, shuffle=True, drop_last=False):
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def progress(iterable, desc, total=None):
    # bars go to stderr and only on a terminal: log.txt and CI logs keep the one line per epoch
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)


def train_epoch_supervised(model, x, y, optimizer, precision: Precision, gen: torch.Generator, batch_size: int,
                           drop_last: bool, augment, desc="train", extra_loss=None, after_step=None):
    """One epoch of cross-entropy training over (x uint8 on device, y). augment(batch_float) -> batch_float.
    Returns mean loss, accuracy, and (order, predictions) so callers can split metrics by sample kind."""
    model.train()
    batches = batch_indices(len(y), batch_size, gen, shuffle=True, drop_last=drop_last)
    total_loss, seen, preds, order = 0.0, 0, [], []
    for idx in progress(batches, desc):
        dev_idx = idx.to(x.device)
        xb = precision.prepare_input(augment(to_unit(x[dev_idx])))
        yb = y[dev_idx]
        with precision.autocast():
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        if extra_loss is not None:
            loss = loss + extra_loss()
        optimizer.zero_grad(set_to_none=True)
        precision.step(loss, optimizer)
        if after_step is not None:
            after_step()
        total_loss += loss.item() * len(idx)
        seen += len(idx)
        preds.append(logits.argmax(1).cpu())
        order.append(idx)
    preds, order = torch.cat(preds), torch.cat(order)
    return {"train_loss": total_loss / max(seen, 1), "train_acc": accuracy(preds, y.cpu()[order])}, order, preds


@torch.no_grad()
def predict(model, x_uint8, precision: Precision, batch_size=1024, labels=None, transform=None):
    """argmax predictions (and mean CE against labels, if given) in eval mode. x may be uint8 or float."""
    preds, loss_sum = [], 0.0
    with eval_mode(model):
        for i in range(0, len(x_uint8), batch_size):
            xb = x_uint8[i:i + batch_size]
            xb = to_unit(xb) if xb.dtype == torch.uint8 else xb
            if transform is not None:
                xb = transform(xb)
            with precision.autocast():
                logits = model(precision.prepare_input(xb)).float()
            if labels is not None:
                loss_sum += F.cross_entropy(logits, labels[i:i + batch_size], reduction="sum").item()
            preds.append(logits.argmax(1))
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)
    return pred, (loss_sum / max(len(x_uint8), 1) if labels is not None else None)


class EvalSets:
    """The clean test set and the poisoned test set, on the evaluation device."""

    def __init__(self, data, device):
        self.x_test, self.y_test = data.x_test.to(device), data.y_test.to(device)
        self.x_bd, self.y_bd = data.x_bd_test.to(device), data.y_bd_test.to(device)
        self.y_bd_true = data.y_bd_test_true.to(device)


def evaluate_backdoor(model, sets: EvalSets, precision: Precision, batch_size=1024, transform=None, prefix=""):
    """C-ACC, ASR and RA (conventions §9), plus the clean and poisoned test losses."""
    pc, clean_loss = predict(model, sets.x_test, precision, batch_size, sets.y_test, transform)
    pb, bd_loss = predict(model, sets.x_bd, precision, batch_size, sets.y_bd, transform)
    return {f"{prefix}clean_test_loss": clean_loss, f"{prefix}bd_test_loss": bd_loss,
            f"{prefix}test_acc": accuracy(pc, sets.y_test), f"{prefix}test_asr": accuracy(pb, sets.y_bd),
            f"{prefix}test_ra": accuracy(pb, sets.y_bd_true)}


# --- the epoch loop with checkpoints -----------------------------------------------------------------

class GeneratorState:
    """Lets a torch.Generator sit in a checkpoint beside models and optimisers."""

    def __init__(self, gen):
        self.gen = gen

    def state_dict(self):
        return {"state": self.gen.get_state()}

    def load_state_dict(self, d):
        self.gen.set_state(d["state"])


def fit(run, epochs: int, train_epoch, evaluate, state: dict, eval_every: int = 1, label="epoch"):
    """Run epochs start..epochs. train_epoch(epoch) -> dict of training stats (including 'lr');
    evaluate() -> dict of test metrics. After every epoch a row goes to metrics.csv and a checkpoint of
    every object in `state` (model, optimiser, scheduler, generators) is written, so --resume continues
    exactly where the run stopped and ends with the same result."""
    start = run.restore_checkpoint(state)
    for epoch in range(start + 1, epochs + 1):
        t0 = time.time()
        stats = train_epoch(epoch)
        do_eval = eval_every > 0 and (epoch % eval_every == 0 or epoch == epochs)
        metrics = evaluate() if do_eval else {}
        row = {"epoch": epoch, "lr": stats.pop("lr", math.nan), "seconds": round(time.time() - t0, 3), **stats, **metrics}
        run.log_epoch(row, label)
        run.save_checkpoint(epoch, state)
    return run.rows
