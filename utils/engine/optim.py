"""Optimisers and learning-rate schedules of conventions §5."""
import torch

from utils.errors import UserError


def fused(params) -> dict:
    """The optimiser's keyword for fused kernels where the parameters are on a GPU (one kernel for every tensor:
    the same update up to rounding, conventions §14). On a CPU torch's default per-tensor loop is kept, so CPU
    results stay bit-identical to earlier records."""
    return {"fused": True} if params and all(p.is_cuda for p in params) else {}


def make_optimizer(params, cfg):
    name, params = cfg["client_optimizer"], list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["sgd_momentum"], weight_decay=cfg["wd"],
                               **fused(params))
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["wd"], amsgrad=cfg["amsgrad"], **fused(params))
    raise UserError(f"client_optimizer '{name}' unknown; allowed: sgd, adam")


def make_scheduler(optimizer, cfg):
    name = cfg["lr_scheduler"]
    if name == "CosineAnnealingLR":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["cos_t_max"], eta_min=cfg["eta_min"])
    if name == "ReduceLROnPlateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg["plateau_factor"],
                                                          patience=cfg["plateau_patience"])
    if name == "MultiStepLR":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg["steplr_milestones"]),
                                                    gamma=cfg["steplr_gamma"])
    if name == "none":
        return None
    raise UserError(f"lr_scheduler '{name}' unknown; allowed: CosineAnnealingLR, ReduceLROnPlateau, MultiStepLR, none")


def set_lr(optimizer, lr):
    """A method's own schedule: every group at lr."""
    for g in optimizer.param_groups:
        g["lr"] = lr


def scheduler_step(scheduler, train_loss=None):
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(train_loss)
    else:
        scheduler.step()
