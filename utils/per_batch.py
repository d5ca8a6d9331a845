"""Attacks that control training (WaNet, Input-Aware, BppAttack) poison each batch as it is drawn: the first n_bd
positions of a batch get the trigger and the attack label, the next n_cross become cross samples (WaNet's noise
warps, BppAttack's negatives, Input-Aware's cross-trigger images) that keep their true label, the rest stay clean.

This module holds what the three share: the per-batch count rule, the epoch that trains on such batches and splits
its figures by kind, and the record's representative poisoned training set. Which samples a batch poisons changes
every epoch, so no fixed set is what the model trained on; because the shuffle and count streams are seeded, the
positions the *last* epoch poisons are known before training, and those are the ones the record lists (each
rebuilt without augmentation, as a uint8 image): the set a defense gets is the last epoch's draw, which the
training epoch checks when it gets there.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from utils.engine.epoch import batch_indices, train_epoch_supervised
from utils.engine.loop import GeneratorState
from utils.engine.optim import scheduler_step
from utils.errors import UserError
from utils.poison import PoisonPlan, draw_reserve
from utils.seeding import generator

CLEAN, POISONED, CROSS = 0, 1, 2


def batch_count(ratio: float, b: int, gen: torch.Generator) -> int:
    """n = int(ratio * b) (Python's truncation of the float product: 0.1 * 128 -> 12); below one, 1 with
    probability ratio * b, else 0, one draw from gen (BackdoorBench's generalize_to_lower_pratio)."""
    v = ratio * b
    if v >= 1:
        return int(v)
    return int(torch.rand((), generator=gen).item() < v)


@dataclass
class PerBatch:
    """counts(b, gen) -> (n_bd, n_cross) for a batch of b samples, its random draws (if any) from the generator
    named `stream`; epochs: how many epochs draw batches from the 'shuffle' stream; rule: the rule in words."""
    counts: Callable[[int, torch.Generator], tuple]
    stream: str
    epochs: int
    rule: str

    def generator(self, seed):
        return generator(seed, self.stream)


def last_epoch_positions(n: int, batch_size: int, drop_last: bool, seed: int, per_batch: PerBatch):
    """Positions (into the attacker's pool) that the last epoch poisons and makes cross samples: the seeded
    shuffle and count streams replayed, one permutation and one count per batch and epoch, as training draws them."""
    shuffle, count = generator(seed, "shuffle"), per_batch.generator(seed)
    for _ in range(per_batch.epochs):
        bd, cross = [], []
        for idx in batch_indices(n, batch_size, shuffle, shuffle=True, drop_last=drop_last):
            n_bd, n_cr = per_batch.counts(len(idx), count)
            bd.append(idx[:n_bd])
            cross.append(idx[n_bd:n_bd + n_cr])
    return torch.cat(bd).sort().values, torch.cat(cross).sort().values


def refuse_p_num(cfg, attack="this attack"):
    """A per-batch attack has no fixed number of poisoned samples: --p_num is refused (at configure time too)."""
    if cfg.get("p_num"):
        raise UserError(f"{attack} poisons a fraction of every batch: p_num does not apply; set --pratio")


def plan_per_batch(y_train, num_classes, cfg, per_batch: PerBatch) -> PoisonPlan:
    """The record's poison plan for a per-batch attack: the reserve as every attack draws it, the poisoned and
    cross training indices of the last epoch (module docstring)."""
    refuse_p_num(cfg)
    reserve, pool = draw_reserve(y_train, num_classes, cfg["reserve_ratio"], cfg["reserve_rule"], cfg["random_seed"])
    bd, cross = last_epoch_positions(len(pool), cfg["batch_size"], cfg["drop_last"], cfg["random_seed"], per_batch)
    if len(bd) == 0:
        raise UserError(f"pratio {cfg['pratio']} with batch_size {cfg['batch_size']} poisons no sample in the last "
                        "epoch; raise pratio")
    full = per_batch.counts(cfg["batch_size"], torch.Generator().manual_seed(0))
    note = {"poisoning": "per_batch", "rule": per_batch.rule, "full_batch": {"n_bd": full[0], "n_cross": full[1]},
            "representative_set": "poison_indices and cross_indices are the samples the last training epoch poisons "
                                  "and makes cross samples (the seeded streams replayed); their images are the "
                                  "trigger applied without augmentation and rounded to uint8; cross samples are redrawn "
                                  "from the seed 'trigger_cross_train', not the noise of the training batch; every "
                                  "training sample was poisoned in some epoch, so none is an unseen clean sample "
                                  "(make the attack with --reserve_ratio for that)"}
    return PoisonPlan(cfg["attack_label_trans"], int(cfg["attack_target"]), int(cfg["attack_label_shift_amount"]),
                      reserve, pool[bd], False, int(cfg["random_seed"]), cross_indices=pool[cross], per_batch=note)


def per_batch_epoch(ctx, per_batch: PerBatch, count_gen, make_batch, desc="train", extra_loss=None, after_step=None):
    """One epoch over the attacker's pool: make_batch(idx, n_bd, n_cross) -> (x float, labels) builds each
    batch (trigger, cross samples, augmentation); CE on it, one step. Returns the epoch's row (the figures split by
    kind: clean, poisoned against the attack label and the true one, cross against the true label) and the
    positions it poisoned and made cross samples."""
    kinds, labels, marks = [], [], {POISONED: [], CROSS: []}
    dev = ctx.x_clean.device

    def batch(idx):
        n_bd, n_cr = per_batch.counts(len(idx), count_gen)
        x, y = make_batch(idx, n_bd, n_cr)
        k = torch.zeros(len(idx), dtype=torch.int64, device=dev)
        k[:n_bd], k[n_bd:n_bd + n_cr] = POISONED, CROSS
        kinds.append(k)
        labels.append(y)
        marks[POISONED].append(idx[:n_bd])
        marks[CROSS].append(idx[n_bd:n_bd + n_cr])
        return x, y

    lr = ctx.optimizer.param_groups[0]["lr"]
    stats, order, preds = train_epoch_supervised(ctx.model, ctx.x_clean, ctx.y_true, ctx.optimizer, ctx.precision,
                                                 ctx.shuffle_gen, ctx.cfg["batch_size"], ctx.cfg["drop_last"], None,
                                                 desc=desc, extra_loss=extra_loss, after_step=after_step,
                                                 make_batch=batch)
    scheduler_step(ctx.scheduler, stats["train_loss"])
    kinds, labels, y_true = torch.cat(kinds), torch.cat(labels), ctx.y_true[order]
    right, true_right = preds == labels, preds == y_true
    hits, n = [], []
    for kind, ok in ((CLEAN, right), (POISONED, right), (POISONED, true_right), (CROSS, true_right)):
        m = kinds == kind
        hits.append((m & ok).sum())
        n.append(m.sum())
    hits, n = torch.stack(hits).float(), torch.stack(n).float()
    acc, asr, ra, cross = (hits / n).tolist()
    counts = n.tolist()
    row = {"lr": lr, "train_loss": stats["train_loss"], "train_acc": right.float().mean().item(),
           "train_acc_clean_only": acc, "train_asr_bd_only": asr, "train_ra_bd_only": ra,
           "train_cross_acc_only": cross, "n_bd_epoch": int(counts[1]), "n_cross_epoch": int(counts[3])}
    where = {k: torch.cat(v).sort().values.cpu() for k, v in marks.items()}
    return row, where


def check_last_epoch(ctx, where):
    """The last epoch drew what the record says a defense gets (plan_per_batch): a mismatch is a bug, never data."""
    tr = ctx.data.train_indices    # sorted: a dataset index's position in the pool is its rank there
    want_bd = torch.searchsorted(tr, ctx.data.poison_indicator.nonzero().flatten())
    want_cr = torch.searchsorted(tr, ctx.data.cross_indices)
    if not (torch.equal(where[POISONED], want_bd) and torch.equal(where[CROSS], want_cr)):
        raise RuntimeError("the last epoch poisoned other samples than the record's representative set lists")


def per_batch_state(count_gen) -> dict:
    return {"count_gen": GeneratorState(count_gen)}
