"""PDB's defended model (docs/specs/pdb.md §4, §5, §10; project decision 3): the raw model f wrapped with the defensive
trigger stamp and the inverse of the label shift, so that

    DefendedModel(x) = shift_k(f(stamp(x))),  stamp(x) = x where M is 0, v where M is 1,
    shift_k(z)_i = z_{(i + k) mod K},  hence argmax = h^-1(argmax f(stamp(x))) with h(y) = (y + k) mod K.

This object is what a PDB run evaluates, saves and loads. Its model.pt holds the raw weights under
`inner_state_dict` (no `state_dict` key, so a plain-weights loader refuses it instead of returning the
undefended model) beside the wrapper's settings; utils.model_file.load_defense_model rebuilds it through the
wrapper registered here.

Nothing here clamps: the trigger value 2.0 is outside [0, 1] on purpose and must reach the network.
"""

import torch
from torch import nn

from utils.errors import UserError
from utils.model_file import build_from_file, register_wrapper

TRIGGER_TYPES = {0: "border frame", 1: "top-left square", 2: "dotted border"}
WRAPPER_KEYS = ("trigger_type", "pix_value", "square_size", "border_width", "target_type")


class DefendedModelEditError(UserError, AttributeError):
    """Raised when code reaches for the head or the backbone of a DefendedModel. It is an AttributeError too,
    so `hasattr(model, 'head')` is simply False for a defended model."""


def defensive_mask(shape, trigger_type=1, square_size=7, border_width=1) -> torch.Tensor:
    """The mask M (1, C, H, W), bool, the same on every channel (pdb.md §4)."""
    c, h, w = shape
    m = torch.zeros(h, w, dtype=torch.bool)
    if trigger_type == 1:
        if not 1 <= square_size <= min(h, w):
            raise UserError(f"square_size = {square_size} does not fit {h}x{w} images; allowed: 1..{min(h, w)}")
        m[:square_size, :square_size] = True
    elif trigger_type == 0:
        if not 1 <= border_width <= min(h, w) // 2:
            raise UserError(f"border_width = {border_width} does not fit {h}x{w} images; allowed: 1..{min(h, w) // 2}")
        b = border_width
        m[:b, :] = m[-b:, :] = m[:, :b] = m[:, -b:] = True
    elif trigger_type == 2:
        m[0::2, 0] = m[0::2, w - 1] = True   # even rows on the left and right edges
        m[0, 0::2] = m[h - 1, 0::2] = True   # even columns on the top and bottom edges
    else:
        raise UserError(f"trigger_type = {trigger_type} unknown; allowed: "
                        + ", ".join(f"{k} ({v})" for k, v in TRIGGER_TYPES.items()))
    return m.expand(c, h, w).unsqueeze(0).clone()


def check_shift(target_type: int, num_classes: int):
    if target_type % num_classes == 0:
        raise UserError(f"target_type = {target_type} is a multiple of K = {num_classes}: h(y) = (y + k) mod K would map "
                        "every label to itself and the defensive backdoor would change nothing; use e.g. 1")


class DefendedModel(nn.Module):
    """The raw model `inner` behind the defensive trigger and the inverse label mapping."""

    editable = False   # FST, FMP and any method that edits a head or convolutions must refuse this model

    def __init__(self, inner: nn.Module, input_shape, trigger_type=1, pix_value=2.0, square_size=7, border_width=1,
                 target_type=1):
        super().__init__()
        check_shift(target_type, inner.num_classes)
        self.inner = inner
        self.input_shape = tuple(int(s) for s in input_shape)
        self.trigger_type, self.pix_value = int(trigger_type), float(pix_value)
        self.square_size, self.border_width, self.target_type = int(square_size), int(border_width), int(target_type)
        # rebuilt from the settings on load, so not part of the state dict
        device = next(iter(inner.parameters()), torch.empty(0)).device
        self.register_buffer("mask", defensive_mask(self.input_shape, self.trigger_type, self.square_size,
                                                    self.border_width).to(device), persistent=False)
        k = inner.num_classes
        self.register_buffer("perm", ((torch.arange(k) + self.target_type) % k).to(device), persistent=False)

    # --- the wrapper's three pieces -------------------------------------------------------------------
    def stamp(self, x):
        """x with v written at the mask's pixels; every other pixel bit-identical (masked_fill keeps x's layout)."""
        if not x.is_floating_point():   # a uint8 image cannot hold 2.0 in pixel units (it would become 2/255)
            raise UserError(f"the defended model takes float pixel-space inputs in [0, 1], got {x.dtype}; divide by 255")
        if tuple(x.shape[1:]) != self.input_shape:
            raise UserError(f"the defended model takes inputs of shape {self.input_shape}, got {tuple(x.shape[1:])}")
        return x.masked_fill(self.mask, self.pix_value)

    def unshift(self, z):
        """z'_i = z_{(i + k) mod K}: a permutation of the logits, so argmax z' = h^-1(argmax z)."""
        return z[:, self.perm.to(z.device)]

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in WRAPPER_KEYS}

    # --- the model interface (conventions §2), through the wrapper ----------------------------------------
    def forward(self, x):
        return self.unshift(self.inner(self.stamp(x)))

    def forward_with_features(self, x):
        f = self.inner.features(self.stamp(x))
        return self.unshift(self.inner.head(f)), f

    @property
    def num_classes(self):
        return self.inner.num_classes

    @property
    def feature_dim(self):
        return self.inner.feature_dim

    def _refuse(self, what):
        raise DefendedModelEditError(
            f"{what} of a PDB defended model is not available: the defense lives in its input stamp and output "
            "mapping, and editing the raw model's head or convolutions would bypass it; apply the method to an "
            "attack record instead")

    def __getattr__(self, name):
        # nn.Module looks up submodules here; `head` must fail with a message, not fall through to the raw model's
        if name == "head":
            self._refuse("the head")
        return super().__getattr__(name)

    def head_parameters(self):
        self._refuse("the head parameters")

    def backbone_parameters(self):
        self._refuse("the backbone parameters")

    def extra_repr(self):
        return (f"trigger_type={self.trigger_type} ({TRIGGER_TYPES[self.trigger_type]}), pix_value={self.pix_value}, "
                f"square_size={self.square_size}, border_width={self.border_width}, target_type={self.target_type}")

    # --- model.pt ----------------------------------------------------------------------------------------
    def payload(self, model_name, width, dataset) -> dict:
        """pdb.md §10: the raw weights under `inner_state_dict` (no `state_dict`, no `model`) plus the settings."""
        n = self.inner.normalize
        return {"defense": "pdb", "model_name": model_name, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "width": width, "dataset": dataset,
                "mean": n.mean.flatten().tolist(), "std": n.std.flatten().tolist(),
                **self.settings(), "inner_state_dict": self.inner.state_dict()}


@register_wrapper("pdb")
def rebuild(d: dict, path, device="cpu") -> DefendedModel:
    """A PDB model.pt (weights-only dict) -> the DefendedModel it describes."""
    missing = [k for k in WRAPPER_KEYS if k not in d]
    if missing:
        raise UserError(f"{path} is a PDB model file without {', '.join(missing)}; it is damaged: run the defense again")
    inner = build_from_file(d, path, "inner_state_dict", device)
    return DefendedModel(inner, d["input_shape"], **{k: d[k] for k in WRAPPER_KEYS}).to(device)
