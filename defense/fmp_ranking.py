"""FMP's ranking (docs/specs/fmp.md §4 steps 1-4): every convolutional feature map scored by the accuracy on the
one-step FGSM image that moves that map alone, from one traced forward pass. The rest of the method (selection,
pruning, fine-tuning) is defense/fmp.py."""
import torch
from torch import nn

from models.preact_resnet import PreActBlock
from utils.engine.device import to_device
from utils.engine.evaluate import eval_mode
from utils.errors import UserError
from utils.stages import Recorder


# --- 1. the convolutions, in forward order, and what is ranked for each ------------------------------------

def ranked_outputs(model, x, as_block_output=False):
    """[(name, module, output)] of every Conv2d in forward order (utils/stages.Recorder), and the names of those
    never called. as_block_output: for each PreAct block's conv2, the block's output (conv2 + shortcut) stands in
    for conv2's own, which is what the original ranks after its in-place residual add (spec §5, defect 11)."""
    names = {m: n for n, m in model.named_modules()}
    blocks = [names[m] for m in model.modules() if isinstance(m, PreActBlock)] if as_block_output else []
    with Recorder(model, kind=nn.Conv2d) as convs, Recorder(model, blocks) as outs:
        model(x)
    block_out = {n: out for n, _, out in outs.outputs()}
    ranked = [(n, m, block_out.get(n[:-len(".conv2")], out) if n.endswith(".conv2") else out)
              for n, m, out in convs.outputs()]
    return ranked, convs.uncalled


@torch.no_grad()
def conv_layers(model, x):
    """[(name, module, out_channels)] of every Conv2d in forward order, and the names of those never called."""
    with eval_mode(model):
        ranked, uncalled = ranked_outputs(model, x)
    return [(n, m, m.out_channels) for n, m, _ in ranked], uncalled


# --- 2. random start and the per-map FGSM step ----------------------------------------------------------

def random_start(x, alpha, gen):
    """x0 = clip(x + alpha * sign(U(-alpha, alpha)), 0, 1): one independent +-alpha per pixel."""
    u = (to_device(torch.rand(x.shape, generator=gen, device=gen.device), x.device) * 2 - 1) * alpha
    return (x + alpha * torch.sign(u)).clamp(0, 1)


def map_gradients(out, clean, x0, channels, mode="loop"):
    """Gradients w.r.t. x0 of L_c = mean_{b,h,w} (F_c(x0) - F_c(x))^2 for each channel c, from the graph that
    produced `out` = F(x0) (retained). Returns (len(channels), *x0.shape)."""
    if mode == "loop":
        grads = [torch.autograd.grad((out[:, c] - clean[:, c]).pow(2).mean(), x0, retain_graph=True)[0]
                 for c in channels]
        return torch.stack(grads)
    # dL_c / dF = 2 (F_c(x0) - F_c(x)) / (B H W) on channel c, zero elsewhere; one batched VJP for all of them
    b, _, h, w = out.shape
    diff = (out.detach() - clean) * (2.0 / (b * h * w))
    ch = torch.as_tensor(channels, device=out.device)
    seeds = torch.zeros((len(channels),) + tuple(out.shape), dtype=out.dtype, device=out.device)
    seeds[torch.arange(len(channels), device=out.device), :, ch] = diff[:, ch].transpose(0, 1)
    return torch.autograd.grad(out, x0, seeds, retain_graph=True, is_grads_batched=True)[0]


def fgsm_step(x0, grads, eps):
    """x_adv = clip(x0 + eps * sign(g), 0, 1), one per gradient: an ascent step, no projection onto a ball."""
    return (x0.unsqueeze(0) + eps * grads.sign()).clamp(0, 1)


@torch.no_grad()
def correct_counts(model, x_adv, y):
    """How many of each map's B crafted images are still classified correctly: one stacked eval forward (fp32)."""
    k, b = x_adv.shape[:2]
    logits = model(x_adv.reshape(k * b, *x_adv.shape[2:]))
    return (logits.float().argmax(1).view(k, b) == y.unsqueeze(0)).sum(1)


class frozen_parameters:
    """Parameters do not require grad inside: the traced graph then only keeps what d/dx0 needs."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def rank_feature_maps(model, x, y, x0, eps, mode="loop", chunk=16, as_block_output=False):
    """Score every feature map of every Conv2d: accuracy on the FGSM image that moves that one map.
    The clean maps F(x) come from one no-grad forward, F(x0) from one traced forward; every map's gradient
    is taken from that one graph. All in fp32, whatever --amp says: the scores are multiples of 1/B with many
    ties, and lower precision flips the selection (spec §5, defect 13). Returns [(name, module, scores (C,)
    float64)] in forward order."""
    b = len(y)
    with eval_mode(model), frozen_parameters(model):  # BN on running statistics, nothing updated
        with torch.no_grad():
            clean_calls, _ = ranked_outputs(model, x, as_block_output)
        clean = [out for _, _, out in clean_calls]
        x0 = x0.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            traced, _ = ranked_outputs(model, x0, as_block_output)
        if [n for n, _, _ in traced] != [n for n, _, _ in clean_calls]:
            raise UserError("the convolutions ran in a different order on the clean and the perturbed pass")
        result = []
        for (name, module, out), cl in zip(traced, clean):
            correct = torch.zeros(out.shape[1], dtype=torch.int64, device=out.device)
            for start in range(0, out.shape[1], chunk):
                chans = list(range(start, min(start + chunk, out.shape[1])))
                x_adv = fgsm_step(x0.detach(), map_gradients(out, cl, x0, chans, mode), eps)
                correct[start:start + len(chans)] = correct_counts(model, x_adv, y)
            result.append((name, module, correct.double().cpu() / b))
        del traced, clean
    return result
