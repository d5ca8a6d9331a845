"""Poisoned data sets, built once per run as uint8 tensors (conventions §7), and the defender's clean subset (§8).

Everything here is a pure function of (clean dataset, trigger, indices): a record stores the indices and the
trigger, and the loader rebuilds the same tensors bit for bit.
"""
import hashlib
import math
from dataclasses import dataclass, field

from typing import Optional

import torch

from utils.errors import UserError


def tensor_sha256(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().cpu().numpy().tobytes()).hexdigest()


RESERVE_HINT = "lower the ratio, or make the attack with a larger --reserve_ratio"


def class_balanced_draw(pool: torch.Tensor, labels: torch.Tensor, per_class: int, num_classes: int,
                        gen: torch.Generator, rule: str = "random", what: str = "clean subset",
                        hint: str = RESERVE_HINT) -> torch.Tensor:
    """per_class indices of every class from `pool` (training indices), without replacement, sorted.

    rule 'random': uniform within each class; 'first': the first per_class of each class in dataset order.
    A class with too few samples is an error naming both numbers (no silent truncation)."""
    pool = torch.as_tensor(pool, dtype=torch.int64).sort().values
    chosen = []
    for c in range(num_classes):
        members = pool[labels[pool] == c]
        if len(members) < per_class:
            raise UserError(f"{what}: class {c} has {len(members)} samples available but {per_class} are requested; "
                            f"{hint}")
        if rule == "first":
            chosen.append(members[:per_class])
        else:
            chosen.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


def uniform_draw(pool: torch.Tensor, n: int, gen: torch.Generator, what: str = "clean subset") -> torch.Tensor:
    pool = torch.as_tensor(pool, dtype=torch.int64).sort().values
    if len(pool) < n:
        raise UserError(f"{what}: {n} samples requested but only {len(pool)} are available; {RESERVE_HINT}")
    return pool[torch.randperm(len(pool), generator=gen)[:n]].sort().values


def attack_labels(y: torch.Tensor, label_trans: str, target: int, shift: int, num_classes: int) -> torch.Tensor:
    if label_trans == "all2one":
        return torch.full_like(y, target)
    return (y + shift) % num_classes


@dataclass
class PoisonPlan:
    """What the attack decided: everything needed to rebuild the poisoned sets (stored in poison.json)."""
    label_trans: str           # all2one | all2all
    target: int                # all2one target t
    shift: int                 # all2all shift s
    reserve_indices: torch.Tensor
    poison_indices: torch.Tensor
    clean_label: bool = False  # poisoned samples drawn from the target class only, labels kept (SIG, LC)
    seed: int = 0              # the seed of the generators a random trigger draws from
    # given per sample instead of derived from label_trans (a record imported from another toolkit: WaNet's noise
    # samples keep their true label); aligned with poison_indices and bd_test_indices
    poison_labels: Optional[torch.Tensor] = None
    bd_test_indices: Optional[torch.Tensor] = None
    bd_test_labels: Optional[torch.Tensor] = None
    # an attack that controls training (utils/per_batch.py): training samples altered by the trigger's cross
    # transform (WaNet's noise, BppAttack's negatives, Input-Aware's cross-trigger samples), true labels kept
    cross_indices: Optional[torch.Tensor] = None
    per_batch: Optional[dict] = None    # how batches were poisoned, in words and numbers (poison.json)

    def labels(self, y, k):
        return attack_labels(y, self.label_trans, self.target, self.shift, k)


def draw_reserve(y_train, num_classes, reserve_ratio, reserve_rule, seed):
    """(reserve indices, the attacker's pool: every other index, sorted)."""
    from utils.seeding import generator
    n = len(y_train)
    reserve = torch.empty(0, dtype=torch.int64)
    if reserve_ratio > 0:
        per_class = math.floor(n * reserve_ratio / num_classes)
        reserve = class_balanced_draw(torch.arange(n), y_train, per_class, num_classes,
                                      generator(seed, "reserve"), reserve_rule, what="reserve")
    in_reserve = torch.zeros(n, dtype=torch.bool)
    in_reserve[reserve] = True
    return reserve, torch.arange(n)[~in_reserve]


def plan_poison(y_train, num_classes, pratio, p_num, label_trans, target, shift, reserve_ratio, reserve_rule,
                seed, clean_label=False) -> PoisonPlan:
    """Which training samples are held out for the defender and which are poisoned. pratio is a fraction of the
    attacker's training set; with clean_label the poisoned samples are drawn from its target-class samples only
    (their labels already are the target)."""
    from utils.seeding import generator
    n = len(y_train)
    reserve, pool = draw_reserve(y_train, num_classes, reserve_ratio, reserve_rule, seed)
    n_p = int(p_num) if p_num else math.floor(pratio * len(pool) + 0.5)
    if n_p <= 0:
        raise UserError(f"pratio {pratio} of {len(pool)} training samples poisons no sample; raise pratio or set p_num")
    if clean_label:
        if label_trans != "all2one":
            raise UserError("a clean-label attack poisons target-class samples: it needs attack_label_trans all2one")
        pool = pool[y_train[pool] == target]
        if n_p > len(pool):
            raise UserError(f"{n_p} poisoned samples requested but the target class {target} has {len(pool)} in the "
                            f"attacker's training set; lower pratio (at most {len(pool) / (n - len(reserve)):.4f}) or p_num")
    if n_p > len(pool):
        raise UserError(f"p_num {n_p} exceeds the {len(pool)} samples of the attacker's training set")
    poison = pool[torch.randperm(len(pool), generator=generator(seed, "poison_indices"))[:n_p]].sort().values
    return PoisonPlan(label_trans, int(target), int(shift), reserve, poison, bool(clean_label), int(seed))


@dataclass
class PoisonedData:
    """The poisoned training set (all N training positions; the attacker trains on `train_indices`) and the
    clean and poisoned test sets. Images uint8 (N, C, H, W)."""
    x_train: torch.Tensor         # poisoned images in place, clean elsewhere
    y_train: torch.Tensor         # attack labels for poisoned samples, true labels elsewhere
    y_train_true: torch.Tensor
    poison_indicator: torch.Tensor  # 1 for poisoned, 0 otherwise
    train_indices: torch.Tensor   # the attacker's training set: every index not in the reserve
    reserve_indices: torch.Tensor
    x_train_clean: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_bd_test: torch.Tensor
    y_bd_test: torch.Tensor       # attack labels
    y_bd_test_true: torch.Tensor
    bd_test_indices: torch.Tensor
    num_classes: int
    cross_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    x_cross_test: Optional[torch.Tensor] = None   # every test image through the trigger's cross transform, true labels

    def digests(self) -> dict:
        out = {"train_labels_sha256": tensor_sha256(self.y_train_true),
               "poisoned_train_sha256": tensor_sha256(self.x_train),
               "poisoned_test_sha256": tensor_sha256(self.x_bd_test)}
        if self.x_cross_test is not None:
            out["cross_test_sha256"] = tensor_sha256(self.x_cross_test)
        return out

    def altered(self) -> torch.Tensor:
        """Training indices whose image the attack changed: poisoned, or cross samples (true label kept)."""
        mask = self.poison_indicator.bool().clone()
        mask[self.cross_indices] = True
        return mask


def build_poisoned_data(dataset, trigger, plan: PoisonPlan) -> PoisonedData:
    """The trigger (utils/triggers.py's protocol) applied to the planned training samples and to the test samples
    of conventions §9, each with its indices and a generator derived from the plan's seed."""
    from utils.seeding import generator
    k = dataset.num_classes
    x, y = dataset.x_train, dataset.y_train
    idx = plan.poison_indices
    x_p, y_p = x.clone(), y.clone()
    x_p[idx] = trigger.apply(x[idx], idx, generator(plan.seed, "trigger_train"), train=True)
    y_p[idx] = plan.labels(y[idx], k) if plan.poison_labels is None else plan.poison_labels
    indicator = torch.zeros(len(y), dtype=torch.int64)
    indicator[idx] = 1
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[plan.reserve_indices] = False
    cross = plan.cross_indices if plan.cross_indices is not None else torch.empty(0, dtype=torch.int64)
    if len(cross):   # images altered, labels kept; the partners or sources come from the attacker's pool
        x_p[cross] = trigger.cross(x, cross, torch.arange(len(y))[keep], generator(plan.seed, "trigger_cross_train"),
                                   train=True)
    x_cross_test = None
    if hasattr(trigger, "cross"):
        every = torch.arange(len(dataset.y_test))
        x_cross_test = trigger.cross(dataset.x_test, every, every, generator(plan.seed, "trigger_cross_test"), train=False)
    # all2one: every non-target test sample; all2all: every test sample (BackdoorBench uses pratio 1 there)
    bd_idx = (plan.bd_test_indices if plan.bd_test_indices is not None
              else torch.nonzero(dataset.y_test != plan.target).flatten() if plan.label_trans == "all2one"
              else torch.arange(len(dataset.y_test)))
    return PoisonedData(
        x_train=x_p, y_train=y_p, y_train_true=y, poison_indicator=indicator,
        train_indices=torch.arange(len(y))[keep], reserve_indices=plan.reserve_indices, x_train_clean=x,
        x_test=dataset.x_test, y_test=dataset.y_test,
        x_bd_test=trigger.apply(dataset.x_test[bd_idx], bd_idx, generator(plan.seed, "trigger_test"), train=False),
        y_bd_test=plan.labels(dataset.y_test[bd_idx], k) if plan.bd_test_labels is None else plan.bd_test_labels,
        y_bd_test_true=dataset.y_test[bd_idx],
        bd_test_indices=bd_idx, num_classes=k, cross_indices=cross, x_cross_test=x_cross_test)


def read_index_file(path, n: int) -> torch.Tensor:
    """A file of training indices, one a line (index.txt's format), each in 0..n-1 and listed once."""
    from utils.io import read_text
    text = read_text(path, "index file")
    try:
        idx = torch.tensor([int(w) for w in text.split()], dtype=torch.int64)
    except ValueError as e:
        raise UserError(f"index file {path}: {e}; it must list one training index per line") from None
    if len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
        raise UserError(f"index file {path} must list indices in 0..{n - 1}")
    if len(idx.unique()) != len(idx):
        raise UserError(f"index file {path} lists {len(idx) - len(idx.unique())} indices more than once; "
                        "list each training index once")
    return idx


def defender_clean_subset(data: PoisonedData, ratio: float, balanced: bool, seed: int, index_file=None):
    """The defender's clean data (conventions §8): (indices, source). Images are data.x_train_clean[indices]
    and labels data.y_train_true[indices]."""
    from utils.seeding import generator
    n, k = len(data.y_train_true), data.num_classes
    if index_file:
        idx = read_index_file(index_file, n)
        poisoned = idx[data.altered()[idx]]
        if len(poisoned):
            print(f"warning: {len(poisoned)} indices of {index_file} were poisoned (or cross samples) in the attacker's training set "
                  f"(their clean originals are used): {poisoned[:20].tolist()}{' ...' if len(poisoned) > 20 else ''}")
        return idx, "index_file"
    if len(data.reserve_indices):
        pool, source = data.reserve_indices, "reserve"
    else:   # cross samples keep their label but not their image: not clean either
        pool, source = data.train_indices[~data.altered()[data.train_indices]], "unpoisoned"
    g = generator(seed, "clean_subset")
    size = math.floor(n * ratio / k) if balanced else math.floor(n * ratio)
    if size == 0:
        raise UserError(f"a clean-data ratio of {ratio} of {n} training samples gives no sample"
                        f"{' per class' if balanced else ''}; raise it to at least {(k if balanced else 1) / n:.2g}")
    if balanced:
        idx = class_balanced_draw(pool, data.y_train_true, size, k, g)
    else:
        idx = uniform_draw(pool, size, g)
    return idx, source
