"""Optimisers and learning-rate schedules of conventions §5."""
import torch

from utils.errors import UserError


def make_optimizer(params, cfg):
    name = cfg["client_optimizer"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["sgd_momentum"], weight_decay=cfg["wd"])
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["wd"], amsgrad=cfg["amsgrad"])
    raise UserError(f"client_optimizer '{name}' unknown; allowed: sgd, adam")


def make_scheduler(optimizer, cfg):
    name = cfg["lr_scheduler"]
    if name == "CosineAnnealingLR":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["cos_t_max"], eta_min=cfg["eta_min"])
    if name == "ReduceLROnPlateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg["plateau_factor"],
                                                          patience=cfg["plateau_patience"])
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
