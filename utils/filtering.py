"""What the poisoned-sample filters share (Activation Clustering, Spectral Signatures): the attacked model's
representations of the attacker's training set, the removed set written once and read back on --resume (a resumed
run never scores again: a device switch could reorder near ties), its figures against the ground truth, and the
retraining of a fresh model on what is kept (utils/retrain.py). The ground truth (which samples were poisoned) is
read for the figures only, never for a decision."""
import hashlib
import json

import torch

from utils.defense import finish_defense, open_defense
from utils.detection import detection_metrics
from utils.engine.augment import to_unit
from utils.engine.evaluate import eval_mode
from utils.engine.loop import Phase, fit
from utils.errors import UserError
from utils.io import read_json, read_text
from utils.retrain import RECIPE_KEYS, attack_recipe, retrain
from utils.stages import Recorder

REMOVED_FILE = "removed.txt"


@torch.no_grad()
def representations(model, x_uint8, layer="features", batch_size=1024) -> torch.Tensor:
    """R(x) for every image, fp32, eval mode, un-augmented, on the CPU: the penultimate vector (`features`) or a
    stage's output flattened channel-major."""
    out = []
    with eval_mode(model), torch.autocast(x_uint8.device.type, enabled=False):
        for i in range(0, len(x_uint8), batch_size):
            x = to_unit(x_uint8[i:i + batch_size]).contiguous()
            if layer == "features":
                out.append(model.features(x).float().flatten(1).cpu())
            else:
                with Recorder(model, [layer]) as rec:
                    model(x)
                out.append(rec[layer].float().flatten(1).cpu())
    return torch.cat(out)


def check_layer(model, layer):
    if layer != "features" and layer not in model.stages():
        raise UserError(f"--layer {layer}: the model has no such stage; use `features` (the penultimate vector) or "
                        f"one of {', '.join(model.stages())}")


def removal_figures(removed: torch.Tensor, poisoned: torch.Tensor) -> dict:
    """Counts of the removed set against the ground truth."""
    return {"n_removed": int(removed.sum()), "n_removed_poisoned": int((removed & poisoned).sum()),
            "n_poisoned": int(poisoned.sum()), "n_poisoned_left": int((poisoned & ~removed).sum())}


def write_removed(run, removed_indices: torch.Tensor):
    """removed.txt (training indices, one a line) and its SHA-256 in config.yaml, before any retraining."""
    text = "".join(f"{i}\n" for i in removed_indices.tolist())
    run.write_file(REMOVED_FILE, text)
    run.update_meta(removed_sha256=hashlib.sha256(text.encode()).hexdigest())


def read_kept(run, train_indices: torch.Tensor) -> torch.Tensor:
    """The kept mask over train_indices from removed.txt, refused when its digest is not the recorded one."""
    path = run.path / REMOVED_FILE
    text = read_text(path, "record file")
    recorded = run.meta.get("removed_sha256") or run.recorded.get("removed_sha256")   # this session's or, resumed, the first's
    if hashlib.sha256(text.encode()).hexdigest() != recorded:
        raise UserError(f"{path} is not the file this run wrote (its SHA-256 differs from config.yaml's "
                        "removed_sha256): run again without --resume")
    if "removed_sha256" not in run.meta:
        run.update_meta(removed_sha256=recorded)
    removed = torch.tensor([int(v) for v in text.split()], dtype=torch.int64)
    return ~torch.isin(train_indices, removed)


def detect_phase(ctx, name: str, detect) -> Phase:
    """One step: detect() -> (removed: bool mask over data.train_indices, scores: one per training sample, higher =
    more suspicious, extras: summary entries). Writes removed.txt, detection_scores.csv, <name>.json with the
    detection figures, and returns the row."""
    data = ctx.data

    def step(_):
        removed, scores, extras = detect()
        poisoned = data.poison_indicator[data.train_indices].bool()
        write_removed(ctx.run, data.train_indices[removed.cpu()])
        ctx.run.write_file("detection_scores.csv", "score,label,flagged\n" + "".join(
            f"{s:.8g},{int(p)},{int(r)}\n" for s, p, r in zip(scores.tolist(), poisoned.tolist(), removed.tolist())))
        figures = {**detection_metrics(scores, poisoned, removed), **removal_figures(removed.cpu(), poisoned),
                   **extras}
        ctx.run.write_file(f"{name}.json", json.dumps(figures, indent=1, default=float))
        print(f"{name}: removed {figures['n_removed']} of {len(removed)} training samples, "
              f"{figures['n_removed_poisoned']} of {figures['n_poisoned']} poisoned ones; AUROC "
              f"{figures['det_auroc']:.4f}, TPR@5%FPR {figures['det_tpr_at_fpr_0.05']:.4f}")
        return {"lr": None, "train_loss": None, "train_acc": None}
    return Phase("detect", 1, step, dict, label="detection, step", start=0, eval_every=0)


def run_filter(name: str, cfg: dict, args, detect):
    """A filter's whole run: open the defense record, detect(ctx, attacked_model) in one resumable step, retrain a
    fresh model on what is kept with the attack's recipe (each override a recorded deviation), finish the record."""
    ctx = open_defense(name, cfg, args)
    try:
        attacked = ctx.attacked_model()
        recipe = attack_recipe(ctx.record, {k: cfg[k] for k in RECIPE_KEYS})
        ctx.run.update_meta(retrain_recipe=recipe)
        retrain_phase, state, model = retrain(ctx, lambda: read_kept(ctx.run, ctx.data.train_indices), recipe)
        rows = fit(ctx.run, [detect_phase(ctx, name, lambda: detect(ctx, attacked)), retrain_phase], state)
        result = read_json(ctx.run.path / f"{name}.json", "record file")
        return finish_defense(ctx, rows, ctx.plain_payload(model), {**result, "epochs": recipe["epochs"]},
                              carry=("train_asr_bd_only",))
    finally:
        ctx.run.close()
