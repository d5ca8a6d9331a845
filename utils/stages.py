"""Named stages of a model, one recorder for the activations and gradients of any named module, and interventions
that change a module's output.

Every model lists its main stages in forward order (`model.stages()`: name -> module; the ResNets use
BackdoorBench's names conv1, layer1 .. layer4, the compact CNN layer1 .. layer4), and every submodule is reachable
by its dotted name (layer1.0.conv1, layer1.0.bn2). What methods do with them:

    with Recorder(model, ["layer2", "layer3"]) as rec:     # NAD: attention maps of these stages' outputs
        model(x)
    rec["layer3"]                                          # the output, still in the autograd graph
    with Recorder(model, ["layer4"], grads=True) as rec:   # the gradient that reaches a stage's output
        model(x).sum().backward()
    rec.grad["layer4"]
    with Recorder(model, kind=nn.Conv2d) as rec: ...       # FMP: every convolution, in forward order
    with Intervene(model, {"layer4": lambda out: out * mask}):   # Fine-Pruning's channel mask, ANP's neuron
        model(x)                                                 # masks on batch norms, NPD's inserted layer
"""
import torch
from torch import nn

from utils.errors import UserError


def module(model: nn.Module, name: str) -> nn.Module:
    """A stage or any submodule by its dotted name."""
    stages = model.stages() if hasattr(model, "stages") else {}
    if name in stages:
        return stages[name]
    found = dict(model.named_modules()).get(name)
    if found is None:
        raise UserError(f"the model has no stage or module {name!r}; its stages: {', '.join(stages) or 'none'}")
    return found


class Recorder:
    """Forward hooks on the named modules (or on every module of type `kind`): each call's output in forward order,
    and with grads=True the gradient that reaches it in a backward pass. A module called twice in one pass is an
    error (its output would be ambiguous); an output changed in place after its hook is an error when read."""

    def __init__(self, model: nn.Module, names=None, kind=None, grads=False):
        if names is not None:
            self.modules = {module(model, n): n for n in names}
        else:
            self.modules = {m: n for n, m in model.named_modules() if kind is not None and isinstance(m, kind)}
        self.grads = grads
        self.calls, self.grad, self.handles = [], {}, []

    def __enter__(self):
        self.calls, self.grad = [], {}
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, mod, inputs, output):
        name = self.modules[mod]
        if any(c[1] is mod for c in self.calls):
            raise UserError(f"{name} is called more than once in one forward pass; record a module called once")
        self.calls.append((name, mod, output, output._version))
        if self.grads and output.requires_grad:
            output.register_hook(lambda g, name=name: self.grad.__setitem__(name, g))

    def outputs(self):
        """[(name, module, output)] in forward order, checked: an in-place operation after the module would have
        changed what was recorded."""
        for name, _, out, version in self.calls:
            if out._version != version:
                raise UserError(f"the output of {name} is modified in place later in the forward pass; record the "
                                "module whose output is final (or make the following operation out-of-place)")
        return [(name, mod, out) for name, mod, out, _ in self.calls]

    def __getitem__(self, name):
        for n, _, out in self.outputs():
            if n == name:
                return out
        raise KeyError(f"{name} was not called in the recorded forward pass")

    @property
    def uncalled(self):
        called = {c[1] for c in self.calls}
        return [n for m, n in self.modules.items() if m not in called]


class Intervene:
    """Replace the outputs of named modules: {name: fn(output) -> new output} while inside."""

    def __init__(self, model: nn.Module, changes: dict):
        self.changes = {module(model, n): fn for n, fn in changes.items()}
        self.handles = []

    def __enter__(self):
        self.handles = [m.register_forward_hook(lambda mod, i, out, fn=fn: fn(out)) for m, fn in self.changes.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def head_columns(model, channels: int, pruned) -> torch.Tensor:
    """The head's input columns fed by the given channels of the last stage: the pooled features are flattened
    channel-major, feature_dim / C positions per channel, so channel c owns columns P c .. P c + P - 1. Zeroing
    them silences the channels for the head (Fine-Pruning, Neural Cleanse's pruning)."""
    if model.feature_dim % channels:
        raise UserError(f"pruning needs head features laid out per channel of the last stage ({model.feature_dim} "
                        f"features for {channels} channels); this model's head is not")
    per, cols = model.feature_dim // channels, torch.zeros(model.feature_dim, dtype=torch.bool)
    for c in pruned:
        cols[per * int(c): per * (int(c) + 1)] = True
    return cols

