"""LF, the low-frequency universal trigger (Zeng, Park, Mao, Jia, "Rethinking the Backdoor Attacks' Triggers: A
Frequency Perspective", ICCV 2021, arXiv 2104.03413; spec: docs/specs/lf.md). Patch and blend triggers are full of
high frequencies that a spectral detector finds. LF searches a smooth, image-wide pattern instead: a universal
adversarial perturbation of a clean model, pushed towards the target class by targeted DeepFool steps and passed
through a strong Gaussian low-pass filter after every update, min-max normalised to [0, 0.2] (at most 51 grey
levels), until it alone changes the clean model's decision on 20 % of the images. It is then an ordinary
dirty-label additive trigger: x' = trunc(clip(x + P, 0, 255)), P = 255 v, on the poisoned training images
(relabelled) and on the test images.

    python attack/lf.py --save_folder_name lf_demo
    python attack/lf.py --lowFrequencyPatternPath cifar10_preactresnet18_0_255.npy --dataset cifar10   (an import)

Two resources under record/resources/ (utils/resources.py), found or built: the clean model
(clean_model_<dataset>_<model>_s<seed>, utils/clean_model.py) and the pattern searched on it
(lf_<dataset>_<model>_t<target>_s<seed>: tensors.safetensors with v and P, passes.csv, pattern.png, log.txt). The
attack record keeps P itself, so every poisoned image is rebuilt from the record alone.
"""
import csv
import io
import time
from pathlib import Path

import numpy as np
import torch

from models import MODELS
from utils.attack import attack_config, run_attack
from utils.clean_model import clean_model
from utils.config import Opt, in_range, spec_deviations
from utils.data import dataset_info, load_dataset
from utils.engine.augment import to_unit
from utils.engine.device import pick_device
from utils.errors import UserError, run_main
from utils.io import atomic_write_bytes, atomic_write_text
from utils.lf_pattern import SearchSettings, pattern_png, search_pattern, taps
from utils.poison import tensor_sha256
from utils.registry import register
from utils.resources import data_identity, obtain, resource_options, resource_root, resource_seed, save_tensors
from utils.seeding import generator, set_determinism
from utils.triggers import AdditiveTrigger, file_sha256

SEARCH_OPTIONS = [
    Opt("lf_num_images", int, 100, "M: training images the pattern is searched on (BackdoorBench: 100, hard-coded)",
        check=in_range(1)),
    Opt("lf_eval_split", str, "train", "where the fooling rate is measured: training images not searched on, or the "
        "test split (BackdoorBench's intent)", choices=("train", "test")),
    Opt("lf_eval_per_class", int, 10, "evaluation images per class", check=in_range(1)),
    Opt("lf_delta", float, 0.8, "delta: the search stops once the fooling rate reaches 1 - delta",
        check=in_range(0, 1, lo_open=True, hi_open=True)),
    Opt("lf_max_iter_uni", int, 50, "max_iter_uni: passes over the search images at most", check=in_range(1)),
    Opt("lf_plateau_passes", int, 5, "stop when the fooling rates of the last this many passes span less than "
        "lf_plateau_tol", check=in_range(2)),
    Opt("lf_plateau_tol", float, 0.01, "see lf_plateau_passes", check=in_range(0)),
    Opt("lf_overshoot", float, 0.02, "overshoot: DeepFool's eta", check=in_range(0)),
    Opt("lf_max_iter_df", int, 200, "max_iter_df: DeepFool iterations per image at most", check=in_range(1)),
    Opt("lf_sigma", float, 6.0, "sig: the Gaussian's sigma in pixels; the window has 5 sigma taps",
        check=lambda v: None if taps(v) else "allowed: 5 * lf_sigma an integer >= 2 (the window's taps)"),
    Opt("lf_max_value", float, 0.2, "xi: the pattern spans exactly [0, xi] in [0, 1] pixel units (0.2: 51 levels)",
        check=in_range(0, 1, lo_open=True)),
    Opt("lf_keep", str, "last", "the pattern returned: the last (BackdoorBench) or the one of the pass with the "
        "highest fooling rate (the authors)", choices=("last", "best")),
    Opt("lf_source_model", str, None, "architecture of the clean model searched on (default: model, at model_width; "
        "another one at its own width: a transfer study)", choices=tuple(MODELS)),
]
OPTIONS = [
    *SEARCH_OPTIONS,
    Opt("lowFrequencyPatternPath", str, None, "import a BackdoorBench .npy pattern ((H, W, C), (1, H, W, C) or "
        "(H, W); 0-255 units) instead of searching one; no resource is used"),
    Opt("lf_pattern_scale", float, 1.0, "factor on the imported pattern (BackdoorBench's float files in [0, 0.2]: "
        "255)", check=in_range(0, lo_open=True)),
    *resource_options(),
]


# --- the imported pattern (spec §2) --------------------------------------------------------------------------------

def import_pattern(path, shape, scale: float):
    """P (C, H, W) float32 = fl32(a * scale) from a .npy file in BackdoorBench's layouts, read without pickle."""
    path = Path(path)
    c, h, w = shape
    if not path.is_file():
        raise UserError(f"lowFrequencyPatternPath {path} not found; pass the path of a .npy pattern file")
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"lowFrequencyPatternPath {path} is not a plain .npy array ({e}); pickled and .npz files are "
                        "refused") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "uif":
        raise UserError(f"lowFrequencyPatternPath {path} holds no numeric array; a uint8 or float .npy is expected")
    layout = list(a.shape)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim == 2:                   # a grey pattern, the same in every channel (BackdoorBench stacks it)
        a = np.repeat(a[:, :, None], c, axis=2)
    if a.shape != (h, w, c):
        raise UserError(f"lowFrequencyPatternPath {path} has shape {tuple(layout)}; this dataset needs "
                        f"({h}, {w}, {c}), (1, {h}, {w}, {c}) or ({h}, {w})")
    p = torch.from_numpy(np.ascontiguousarray((a.astype(np.float64) * scale).astype(np.float32).transpose(2, 0, 1)))
    if not bool(torch.isfinite(p).all()):
        raise UserError(f"lowFrequencyPatternPath {path} holds values that are not finite")
    if float(p.max()) < 1:
        raise UserError(f"the pattern of {path} times lf_pattern_scale {scale} peaks at {float(p.max()):.4g}: less "
                        "than one grey level, which the insertion's truncation removes (spec §7 row 3); "
                        "BackdoorBench's float patterns in [0, 0.2] need --lf_pattern_scale 255")
    return p, {"source": "import", "file": str(path), "file_sha256": file_sha256(path), "file_shape": layout,
               "lf_pattern_scale": scale}


# --- the pattern resource (spec §5.3, §5.5, §8) -------------------------------------------------------------------

def search_settings(cfg) -> SearchSettings:
    return SearchSettings(target=cfg["attack_target"], delta=cfg["lf_delta"], max_passes=cfg["lf_max_iter_uni"],
                          plateau_passes=cfg["lf_plateau_passes"], plateau_tol=cfg["lf_plateau_tol"],
                          overshoot=cfg["lf_overshoot"], max_iter_df=cfg["lf_max_iter_df"], sigma=cfg["lf_sigma"],
                          xi=cfg["lf_max_value"], keep=cfg["lf_keep"])


def eval_indices(y, exclude, per_class: int, num_classes: int, gen) -> torch.Tensor:
    """V: per class, up to per_class indices in a seeded random order, none of `exclude`."""
    perm = torch.randperm(len(y), generator=gen)
    perm = perm[~torch.isin(perm, exclude)]
    return torch.cat([perm[y[perm] == k][:per_class] for k in range(num_classes)])


def build_pattern(folder: Path, model, dataset, cfg, seed: int, device) -> dict:
    """The search of §5.5 into `folder`: tensors.safetensors (v, P), passes.csv, pattern.png, log.txt. Returns the
    entries of resource.json."""
    lines = []

    def log(s):
        print(s)
        lines.append(s)
    t0 = time.time()
    n, m = len(dataset.y_train), cfg["lf_num_images"]
    if m > n:
        raise UserError(f"lf_num_images {m} is more than the {n} training images; allowed: 1..{n}")
    search = torch.randperm(n, generator=generator(seed, "lf_search_images"))[:m]
    split = cfg["lf_eval_split"]
    x_all, y_all = (dataset.x_train, dataset.y_train) if split == "train" else (dataset.x_test, dataset.y_test)
    evals = eval_indices(y_all, search if split == "train" else torch.empty(0, dtype=torch.long),
                         cfg["lf_eval_per_class"], dataset.info.num_classes, generator(seed, "lf_eval_images"))
    if len(evals) == 0:
        raise UserError(f"no evaluation image is left in the {split} split; lower --lf_num_images or pass "
                        "--lf_eval_split test")
    log(f"lf search: {m} search images, {len(evals)} evaluation images ({split} split), target {cfg['attack_target']}, "
        f"sigma {cfg['lf_sigma']} ({taps(cfg['lf_sigma'])} taps), xi {cfg['lf_max_value']}, device {device}")
    set_determinism(cfg["deterministic"], device)
    model = model.to(device).float()
    s = search_settings(cfg)
    result = search_pattern(model, to_unit(dataset.x_train[search]).to(device), to_unit(x_all[evals]).to(device), s,
                            generator(seed, "lf_shuffle"), log)
    seconds = round(time.time() - t0, 2)
    v = result.v.cpu().float()
    P = v * 255
    kept = result.rows[result.kept_pass - 1]
    log(f"lf search: stopped by {result.stop_reason} after {len(result.rows)} passes in {seconds:.1f} s; kept pass "
        f"{result.kept_pass} (fooling rate {kept['fooling_rate']:.4f}, targeted {kept['targeted_rate']:.4f}); "
        f"P in [{float(P.min()):.3f}, {float(P.max()):.3f}]")
    save_tensors(folder, {"v": v, "P": P})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result.rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows)
    atomic_write_text(folder / "passes.csv", buf.getvalue())
    atomic_write_bytes(folder / "pattern.png", pattern_png(P))
    atomic_write_text(folder / "log.txt", "\n".join(lines) + "\n")
    return {"search_indices": search.tolist(), "eval_split": split, "eval_indices": evals.tolist(),
            "passes": len(result.rows), "stop_reason": result.stop_reason, "kept_pass": result.kept_pass,
            "fooling_rate": kept["fooling_rate"], "targeted_rate": kept["targeted_rate"],
            "final_fooling_rate": result.rows[-1]["fooling_rate"],
            "best_fooling_rate": max(r["fooling_rate"] for r in result.rows), "counts": result.counts,
            "v": {"min": float(v.min()), "max": float(v.max()), "mean": float(v.double().mean()),
                  "l2": float(v.double().norm())},
            "P_sha256": tensor_sha256(P), "search_seconds": seconds, "device": str(device)}


def pattern_identity(cfg, dataset, source: str, clean_res, seed: int) -> dict:
    params = {o.name: cfg[o.name] for o in SEARCH_OPTIONS if o.name != "lf_source_model"}
    params.update(target=cfg["attack_target"], taps=taps(cfg["lf_sigma"]))
    test = ({"test_labels_sha256": tensor_sha256(dataset.y_test), "test_images_sha256": tensor_sha256(dataset.x_test)}
            if cfg["lf_eval_split"] == "test" else {})
    return {"kind": "lf", **data_identity(dataset), **test, "model": source,
            "model_width": clean_res.meta["identity"]["model_width"], "params": params,
            "upstream_clean_model": clean_res.digest(), "seed": seed}


def searched_pattern(cfg, dataset, resume=False):
    """(P, the trigger's meta, the resources used, figures for summary.json): the clean model and the pattern,
    each found or built."""
    source = cfg["lf_source_model"] or cfg["model"]
    ccfg = cfg if source == cfg["model"] else {**cfg, "model": source, "model_width": None}
    model, clean_res = clean_model(ccfg, dataset, resume=resume)
    seed = resource_seed(cfg)
    name = f"lf_{dataset.info.name}_{source}_t{cfg['attack_target']}_s{seed}"
    device = pick_device(cfg["device"])
    res = obtain(resource_root(cfg), name, pattern_identity(cfg, dataset, source, clean_res, seed),
                 lambda folder, resumed: build_pattern(folder, model, dataset, cfg, seed, device),
                 rebuild=cfg["resource_rebuild"], resume=resume)
    P = res.tensors()["P"]
    if tuple(P.shape) != tuple(dataset.info.shape) or P.dtype != torch.float32:
        raise UserError(f"the resource {res.path} holds a pattern of shape {tuple(P.shape)} ({P.dtype}); "
                        f"{tuple(dataset.info.shape)} float32 expected: pass --resource_rebuild")
    meta = res.meta
    print(f"lf pattern {res.name}: {'built' if res.built else 'reused'}, stopped by {meta['stop_reason']} after "
          f"{meta['passes']} passes, fooling rate {meta['fooling_rate']:.4f}")
    trig_meta = {"source": "search", "resources": {r.name: r.digest() for r in (clean_res, res)},
                 "lf_sigma": cfg["lf_sigma"], "taps": taps(cfg["lf_sigma"]), "lf_max_value": cfg["lf_max_value"],
                 "search_target": cfg["attack_target"], "stop_reason": meta["stop_reason"],
                 "fooling_rate": meta["fooling_rate"], "targeted_rate": meta["targeted_rate"],
                 "passes": meta["passes"], "lf_keep": cfg["lf_keep"]}
    figures = {"resource_reused": not (clean_res.built or res.built),
               "clean_model_train_seconds": clean_res.meta.get("train_seconds"),
               "clean_model_test_acc": clean_res.meta.get("test_acc"), "search_seconds": meta["search_seconds"],
               "lf_fooling_rate": meta["fooling_rate"]}
    return P, trig_meta, [clean_res, res], figures


# --- configuration and the attack (spec §5.1, §5.7) --------------------------------------------------------------

def lf_deviations(cfg) -> list:
    if cfg["lowFrequencyPatternPath"] is not None:
        return []
    out = spec_deviations(SEARCH_OPTIONS, cfg, skip={"lf_source_model"})
    if cfg["lf_source_model"] not in (None, cfg["model"]):
        out.append(f"the pattern is searched on a clean {cfg['lf_source_model']}, not on the victim's {cfg['model']} "
                   "(BackdoorBench: the victim's architecture)")
    if cfg["lf_eval_split"] == "train":
        out.append("the fooling rate is measured on training images not searched on (BackdoorBench: meant to be "
                   "test images, in effect one; spec §7 rows 1, 13)")
    return out


@register("lf", "attack", paper="Zeng et al., ICCV 2021", needs=("dataset",), options=OPTIONS,
          summary="LF: a smooth universal adversarial pattern of a clean model (DeepFool + Gaussian low-pass), "
                  "added to relabelled images")
def configure(argv=None):
    """Every setting resolved and checked, an imported pattern read; nothing written, no resource built (the sweep
    checks its jobs with this)."""
    cfg, args = attack_config("lf", OPTIONS, argv, __doc__)
    imported = None
    if cfg["lowFrequencyPatternPath"] is not None:
        P, meta = import_pattern(cfg["lowFrequencyPatternPath"], dataset_info(cfg["dataset"]).shape,
                                 cfg["lf_pattern_scale"])
        imported = (P, meta)
    return cfg, args, imported


def main(argv=None):
    cfg, args, imported = configure(argv)
    if imported is not None:
        (P, meta), used, figures = imported, [], {"resource_reused": None}
    else:
        P, meta, used, figures = searched_pattern(cfg, load_dataset(cfg["dataset"], cfg["dataset_path"]), args.resume)

    return run_attack("lf", cfg, args, AdditiveTrigger(P, P), meta, summary=figures,
                      extra_config={"resources": [r.describe() for r in used], "deviations": lf_deviations(cfg)},
                      files={"lf_pattern.png": pattern_png(P)})

if __name__ == "__main__":
    run_main(main)
