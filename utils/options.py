"""Option groups that several methods share, declared once: device and precision, the training recipe, the
defender's clean subset. A method takes a group with its own defaults (the spec's values)."""
from utils.config import Opt, in_range
from utils.engine.device import COMPILE_MODES, device_check

SCHEDULERS = ("CosineAnnealingLR", "ReduceLROnPlateau", "MultiStepLR", "none")


def auto_bool(v):
    """auto, or true / false (YAML booleans too)."""
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("auto", "true", "false", "1", "0", "yes", "no"):
        return "auto" if s == "auto" else s in ("true", "1", "yes")
    raise ValueError("expected auto, true or false")


def milestones(v):
    """Counts of completed epochs: a YAML list, one integer, or '40' / '40,60' on the command line."""
    items = v.strip("[] ").replace(",", " ").split() if isinstance(v, str) else [v] if isinstance(v, int) else v
    if isinstance(v, bool) or not all(str(w).isdigit() for w in items):
        raise ValueError("expected a list of epoch counts (>= 0), e.g. [40] or 40,60")
    return sorted(int(w) for w in items)


def compile_choice(v):
    """false, true (the mode chosen for the device) or one of torch.compile's mode names."""
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("true", "false", "1", "0", "yes", "no"):
        return s in ("true", "1", "yes")
    if s in COMPILE_MODES:
        return s
    raise ValueError(f"expected true, false or a mode: {', '.join(COMPILE_MODES)}")


def device_options():
    return [
        Opt("device", str, "auto", "auto, cpu, cuda or cuda:<i>", check=device_check),
        Opt("amp", auto_bool, "auto", "mixed precision: auto (on a GPU: bf16, or fp16 where the card has no bf16; on a "
            "CPU: whichever of fp32 and bf16 a short timed probe finds faster for this model), true or false (fp32, "
            "never TF32)"),
        Opt("channels_last", auto_bool, "auto", "channels_last memory format: auto (on a GPU: on; on a CPU: the "
            "probe's choice), true or false"),
        Opt("compile", compile_choice, False, "torch.compile the model (true: the mode chosen for the device, or a "
            "mode name); falls back to eager where compile is unavailable"),
        Opt("deterministic", bool, True, "bitwise reproducible kernels (false: cudnn.benchmark and non-deterministic "
            "GPU kernels, faster)"),
        Opt("checkpoint_every", int, 1, "write the --resume checkpoint every N epochs (and after the last)",
            check=in_range(1)),
        Opt("eval_batch_size", int, 1024, "evaluation batch size", check=in_range(1)),
    ]


def recipe_options(epochs=100, batch_size=128, lr=0.01, optimizer="sgd", momentum=0.9, wd=5e-4,
                   scheduler="CosineAnnealingLR", cos_t_max=100, drop_last=True):
    """The supervised training recipe of conventions §5 (BackdoorBench's optimiser and scheduler factory);
    drop_last=None: the method always drops the last batch and offers no choice."""
    return [
        Opt("epochs", int, epochs, "training epochs", check=in_range(1)),
        Opt("batch_size", int, batch_size, "training batch size", check=in_range(1)),
        *([Opt("drop_last", bool, drop_last, "drop the last incomplete batch")] if drop_last is not None else []),
        Opt("lr", float, lr, "initial learning rate", check=in_range(0, lo_open=True)),
        Opt("client_optimizer", str, optimizer, "optimiser", choices=("sgd", "adam")),
        Opt("sgd_momentum", float, momentum, "SGD momentum", check=in_range(0, 1)),
        Opt("wd", float, wd, "weight decay", check=in_range(0)),
        Opt("amsgrad", bool, True, "Adam's AMSGrad variant (BackdoorBench's Adam uses it)"),
        Opt("lr_scheduler", str, scheduler, "schedule, stepped once per epoch", choices=SCHEDULERS),
        Opt("cos_t_max", int, cos_t_max, "T_max of the cosine schedule (BackdoorBench: 100 whatever the epochs)",
            check=in_range(1)),
        Opt("eta_min", float, 0.0, "lowest learning rate of the cosine schedule", check=in_range(0)),
        Opt("plateau_factor", float, 0.1, "ReduceLROnPlateau: factor of each reduction",
            check=in_range(0, 1, lo_open=True, hi_open=True)),
        Opt("plateau_patience", int, 10, "ReduceLROnPlateau: epochs without improvement of the training loss before "
            "a reduction", check=in_range(0)),
        Opt("steplr_milestones", milestones, [100, 200, 300, 400], "MultiStepLR: completed epochs after which the lr "
            "is multiplied by steplr_gamma (BackdoorBench's WaNet, Input-Aware and BppAttack value)"),
        Opt("steplr_gamma", float, 0.1, "MultiStepLR: factor at each milestone", check=in_range(0, 1, lo_open=True)),
    ]


def clean_subset_options(ratio=0.05, ratio_key="ratio", balanced=None, what="clean subset"):
    """The defender's clean data (conventions §8): its size, optionally class balance, and an index file instead of
    the draw. balanced=None: the method has no choice there."""
    opts = [Opt(ratio_key, float, ratio, f"{what} as a fraction of the training set", check=in_range(0, 1, lo_open=True))]
    if balanced is not None:
        opts.append(Opt("balanced", bool, balanced, "class-balanced draw (false: uniform)"))
    opts.append(Opt("index", str, None, "a file of training indices, one a line, used instead of the draw"))
    return opts
