"""The detection part of a summary: the detectors' threshold-free and thresholded figures (from each record's
summary.json, the det_ keys of utils/detection.py), one ROC plot per detector (from each record's
detection_scores.csv), and Neural Cleanse's model-level verdicts across records, clean models included, with the
AUROC of its anomaly index as a model-level score.

A model counts as backdoored when its attack record poisoned more than one training sample: the toolkit's clean
models are `attack/badnet.py --p_num 1` records (one poisoned sample of 60,000: ASR at the clean floor, see the
README), since an attack with no poisoned sample has no poisoned test set to measure."""
import math
import pathlib

import pandas as pd

from utils.detection import roc_auc, roc_points, tpr_at_fpr
from utils.io import read_json

DETECTION = ["det_auroc", "det_tpr_at_fpr_0.01", "det_tpr_at_fpr_0.05", "det_precision", "det_recall", "det_fpr",
             "det_flagged"]
NC_KEYS = ["nc_max_anomaly_index", "nc_target_anomaly_index", "nc_model_flagged", "nc_flagged_classes"]
SCORES_FILE = "detection_scores.csv"


def detection_values(summary: dict) -> dict:
    """The detection keys of a record's summary.json (None where absent)."""
    return {k: summary.get(k) for k in DETECTION + NC_KEYS}


def poisoned_count(attack_folder: pathlib.Path):
    """How many training samples the attack poisoned (poison.json), None when unreadable."""
    try:
        return len(read_json(attack_folder / "poison.json", "record file")["poison_indices"])
    except Exception:   # a hand-made record without poison.json
        return None


def _pct(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA else f"{100 * v:.2f}"


def detection_markdown(ms: pd.DataFrame, markdown) -> str:
    """Detectors only: mean (± std over runs) of AUROC, TPR at 1 % and 5 % FPR, and at the detector's own threshold
    precision, recall and FPR, beside the defended model's ACC, ASR, RA, DER and wall time."""
    rows = []
    for _, r in ms[ms["det_auroc_mean"].notna()].iterrows():   # rows as mappings: the keys hold dots
        def pm(m, scale=100):
            mu, sd = r[f"{m}_mean"], r[f"{m}_std"]
            if pd.isna(mu):
                return ""
            return f"{scale * mu:.2f}" + ("" if pd.isna(sd) else f" ± {scale * sd:.2f}")
        rows.append([r["attack"], r["defense"], r["variant"], r["n_runs"], pm("det_auroc"), pm("det_tpr_at_fpr_0.01"),
                     pm("det_tpr_at_fpr_0.05"), pm("det_precision"), pm("det_recall"), pm("det_fpr"),
                     pm("test_acc"), pm("test_asr"), pm("test_ra"), pm("der"), pm("seconds", 1)])
    header = ["attack", "detector", "variant", "runs", "AUROC %", "TPR@1%FPR %", "TPR@5%FPR %", "precision %",
              "recall %", "FPR %", "ACC %", "ASR %", "RA %", "DER %", "wall s"]
    return markdown(header, rows)


def model_level(df: pd.DataFrame) -> pd.DataFrame:
    """Neural Cleanse's verdict on every model it examined: the record, whether it is backdoored (more than one
    poisoned training sample), the largest anomaly index, the true target's, and whether NC flagged it."""
    nc = df[(df["defense"] == "nc") & df["nc_max_anomaly_index"].notna()]
    return nc.assign(backdoored=nc["n_poisoned"].fillna(0) > 1)[
        ["record", "attack", "seed", "n_poisoned", "backdoored", "nc_max_anomaly_index", "nc_target_anomaly_index",
         "nc_model_flagged", "nc_flagged_classes"]].reset_index(drop=True)


def model_level_markdown(ml: pd.DataFrame, markdown) -> str:
    rows = [[r.record, r.n_poisoned, "yes" if r.backdoored else "no", f"{r.nc_max_anomaly_index:.2f}",
             "" if pd.isna(r.nc_target_anomaly_index) else f"{r.nc_target_anomaly_index:.2f}",
             "yes" if r.nc_model_flagged else "no", r.nc_flagged_classes] for r in ml.itertuples()]
    text = markdown(["record", "poisoned samples", "backdoored", "max anomaly index", "target's anomaly index",
                     "flagged", "flagged classes"], rows)
    y = ml["backdoored"].astype(int)
    if y.nunique() == 2:
        auc = roc_auc(ml["nc_max_anomaly_index"].astype(float).tolist(), y.tolist())
        flagged = ml["nc_model_flagged"].astype(bool)
        fa = int((flagged & ~ml["backdoored"]).sum())
        text += (f"\nModel-level AUROC of the largest anomaly index over these {len(ml)} models: {100 * auc:.2f} %; "
                 f"clean models flagged: {fa} of {int((~ml['backdoored']).sum())}; backdoored models flagged: "
                 f"{int((flagged & ml['backdoored']).sum())} of {int(ml['backdoored'].sum())}.\n")
    else:
        text += "\nA model-level AUROC needs both clean and backdoored models among the records.\n"
    return text


def roc_curves(root: pathlib.Path, df: pd.DataFrame) -> dict:
    """{detector: [(label, fpr, tpr, auroc, tpr at 5 % FPR)]} from the records' detection_scores.csv."""
    out = {}
    for r in df[df["det_auroc"].notna()].itertuples():
        f = pathlib.Path(root) / r.record / SCORES_FILE
        if not f.exists():
            continue
        s = pd.read_csv(f)
        if not {"score", "label"} <= set(s.columns) or s["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_points(s["score"].tolist(), s["label"].tolist())
        variant = getattr(r, "variant", "")
        label = f"{r.attack}{f' ({variant})' if variant else ''} s{r.seed}" + (
            f" ds{r.defense_seed}" if not pd.isna(r.defense_seed) and r.defense_seed != r.seed else "")
        out.setdefault(r.defense, []).append((label, fpr.numpy(), tpr.numpy(),
                                              roc_auc(s["score"].tolist(), s["label"].tolist()),
                                              tpr_at_fpr(s["score"].tolist(), s["label"].tolist(), 0.05)))
    return out
