"""SIG (Barni, Kallas, Tondi, "A new backdoor attack in CNNs by training set corruption without label poisoning",
ICIP 2019, arXiv 1902.11237; spec: docs/specs/sig.md). A clean-label attack: a faint horizontal sinusoid is added
to some training images of the target class only, their labels kept, so the network learns the sinusoid as a
feature of that class; at test time the same sinusoid on any image sends it there.

    v_j = fl32(delta sin(2 pi j f / W)),  x' = trunc(clip(x + v, 0, 255)),  the same v in every row and channel.

    python attack/sig.py --save_folder_name sig_demo

pratio is a fraction of the attacker's whole training set, drawn from the target class (BackdoorBench's reading):
BackdoorBench's 0.1 poisons the whole class 0 of CIFAR-10 and cannot run where the class is smaller (CIFAR-100,
GTSRB, Tiny, MNIST): there the attack stops with the largest pratio that fits.
"""
import numpy as np
import torch

from utils.attack import Training, attack_config, run_attack
from utils.config import Opt, in_range
from utils.data import dataset_info
from utils.engine.evaluate import predict
from utils.errors import UserError, run_main
from utils.registry import register
from utils.triggers import AdditiveTrigger

OPTIONS = [
    Opt("sig_delta", float, 40.0, "amplitude of the training sinusoid, 0-255 units", check=in_range(0, lo_open=True)),
    Opt("sig_delta_test", float, None, "amplitude of the test sinusoid (default: sig_delta)",
        check=in_range(0, lo_open=True)),
    Opt("sig_f", float, 6.0, "periods of the sinusoid across the image width", check=in_range(0, lo_open=True)),
]


def sinusoid(shape, delta: float, f: float) -> torch.Tensor:
    """The pattern (C, H, W), float32: delta sin(2 pi j f / W) over the columns j = 0..W-1, computed in float64 as
    numpy does, then rounded to float32 as BackdoorBench stores it; the same in every row and channel."""
    c, h, w = shape
    v = (delta * np.sin(2 * np.pi * np.arange(w, dtype=np.float64) * f / w)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(v, (c, h, w))))


def make_trigger(cfg):
    shape = dataset_info(cfg["dataset"]).shape
    test_delta = cfg["sig_delta"] if cfg["sig_delta_test"] is None else cfg["sig_delta_test"]
    trigger = AdditiveTrigger(sinusoid(shape, cfg["sig_delta"], cfg["sig_f"]), sinusoid(shape, test_delta, cfg["sig_f"]))
    return trigger, {"source": "sinusoid", "sig_delta": cfg["sig_delta"], "sig_delta_test": test_delta,
                     "sig_f": cfg["sig_f"]}


def target_class_accuracy(ctx):
    """Clean accuracy on the test images of the target class: the only class whose training images changed."""
    t = ctx.cfg["attack_target"]
    sets = ctx.eval_sets
    keep = sets.y_test == t
    pred, _ = predict(ctx.model, sets.x_test[keep], ctx.precision, ctx.cfg["eval_batch_size"])
    return {"test_acc_target_class": (pred == t).float().mean().item()}


@register("sig", "attack", paper="Barni et al., ICIP 2019", needs=("dataset",), options=OPTIONS,
          summary="SIG: clean-label, a horizontal sinusoid on target-class training images, labels kept")
def configure(argv=None):
    """Every setting resolved and checked and the trigger made, nothing written (the sweep checks its jobs with this)."""
    cfg, args = attack_config("sig", OPTIONS, argv, __doc__)
    if cfg["attack_label_trans"] != "all2one":
        raise UserError("SIG is a clean-label attack on one target class: attack_label_trans must be all2one")
    return cfg, args, *make_trigger(cfg)


def main(argv=None):
    cfg, args, trigger, meta = configure(argv)
    training = lambda ctx: Training(evaluate=lambda: target_class_accuracy(ctx), show=("test_acc_target_class",))
    return run_attack("sig", cfg, args, trigger, meta, training=training, clean_label=True)


if __name__ == "__main__":
    run_main(main)
