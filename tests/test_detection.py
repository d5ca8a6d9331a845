"""utils/detection.py: AUROC, TPR at a false-positive rate and the figures at a detector's own threshold, on
hand-made scores, and a perfect and a useless detector."""
import math

import pytest
import torch

from utils.detection import at_threshold, detection_metrics, roc_auc, roc_points, tpr_at_fpr


def test_auroc_on_hand_made_scores_with_ties():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == pytest.approx(0.5)       # ties count one half
    assert roc_auc([0.9, 0.1], [0, 1]) == 0.0                               # an inverted detector reads below 0.5
    assert math.isnan(roc_auc([0.3, 0.2], [1, 1]))                          # no negatives: undefined


def test_tpr_at_fpr_is_a_point_of_the_step_function():
    # negatives 0.1 0.2 0.3 0.4 0.9, positives 0.5 0.8 0.95 0.35
    scores = [0.1, 0.2, 0.3, 0.4, 0.9, 0.5, 0.8, 0.95, 0.35]
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1]
    fpr, tpr, thr = roc_points(scores, labels)
    assert fpr[0] == 0 and tpr[0] == 0 and thr[0] == float("inf")
    assert fpr[-1] == 1 and tpr[-1] == 1
    # at FPR 0 only 0.95 can be flagged (0.9 is a negative): TPR 1/4; allowing 1 false positive (20 %) reaches
    # threshold 0.5: 0.95, 0.8, 0.5 -> 3/4; 2 (40 %) reaches 0.35 -> 4/4
    assert tpr_at_fpr(scores, labels, 0.01) == pytest.approx(0.25)
    assert tpr_at_fpr(scores, labels, 0.2) == pytest.approx(0.75)
    assert tpr_at_fpr(scores, labels, 0.39) == pytest.approx(0.75)        # never interpolated
    assert tpr_at_fpr(scores, labels, 0.4) == pytest.approx(1.0)


def test_roc_points_equal_a_direct_count_and_scale_to_a_training_set():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 300):
        s = torch.randint(0, 20, (n,), generator=g).double()      # many ties
        y = torch.rand(n, generator=g) < 0.3
        fpr, tpr, thr = roc_points(s, y)
        for f, t, th in zip(fpr[1:], tpr[1:], thr[1:]):
            flagged = s >= th
            assert t.item() == pytest.approx(int((flagged & y).sum()) / max(int(y.sum()), 1), abs=1e-12)
            assert f.item() == pytest.approx(int((flagged & ~y).sum()) / max(int((~y).sum()), 1), abs=1e-12)
    # 60,000 distinct scores (a filter's training set): no n x n matrix
    s, y = torch.rand(60000, generator=g, dtype=torch.float64), torch.rand(60000, generator=g) < 0.1
    assert 0.45 < detection_metrics(s, y)["det_auroc"] < 0.55


def test_figures_at_the_detectors_threshold():
    m = at_threshold([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert m == {"flagged": 3, "precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3), "fpr": 0.5}
    assert math.isnan(at_threshold([0, 0], [1, 0])["precision"])            # nothing flagged


def test_a_perfect_and_a_useless_detector_on_synthetic_activations():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2000, 16, generator=g)
    poisoned = torch.randn(200, 16, generator=g) + torch.cat([torch.full((1,), 12.0), torch.zeros(15)])
    x = torch.cat([clean, poisoned])
    labels = torch.cat([torch.zeros(2000), torch.ones(200)])
    perfect = detection_metrics(x[:, 0], labels, flags=x[:, 0] > 6)         # the shifted direction separates them
    assert perfect["det_auroc"] == 1.0 and perfect["det_tpr_at_fpr_0.01"] == 1.0
    assert perfect["det_precision"] == 1.0 and perfect["det_recall"] == 1.0
    useless = detection_metrics(x[:, 5], labels)                             # a direction without the shift
    assert abs(useless["det_auroc"] - 0.5) < 0.06 and useless["det_tpr_at_fpr_0.05"] < 0.15
    assert "det_precision" not in useless


# --- the summaries' detection part (analysis/detection.py) ---------------------------------------------------

def _fake(folder, summary, config, poisoned=None):
    import json
    import yaml
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump({"config": config}))
    if poisoned is not None:
        (folder / "poison.json").write_text(json.dumps({"poison_indices": list(range(poisoned))}))


def test_summaries_show_detectors_their_roc_and_nc_over_clean_and_backdoored_models(tmp_path):
    from analysis.summarize import summarize
    base = {"dataset": "mnist", "model": "cnn", "pratio": 0.1, "test_acc": 0.9, "test_asr": 1.0, "test_ra": 0.0}
    models = {"badnet_s0": (600, 4.0, True), "blend_s0": (600, 2.5, True), "clean_s0": (1, 1.2, False),
              "clean_s1": (1, 2.1, True)}   # the last: a clean model NC flags (a false alarm)
    for name, (n, index, flagged) in models.items():
        a = tmp_path / name
        _fake(a, {**base, "attack": name.split("_")[0]}, {"random_seed": int(name[-1])}, poisoned=n)
        _fake(a / "defense" / "nc", {"defense": "nc", **base, "test_asr": 0.01, "der": 0.9,
                                     "nc_max_anomaly_index": index, "nc_target_anomaly_index": index,
                                     "nc_model_flagged": flagged, "nc_flagged_classes": [0] if flagged else []},
              {"random_seed": 0})
    scores = torch.tensor([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    d = tmp_path / "badnet_s0" / "defense" / "spectral"
    _fake(d, {"defense": "spectral", **base, "test_asr": 0.02, "der": 0.95,
              **detection_metrics(scores, labels, scores >= 0.5)}, {"random_seed": 0})
    (d / "detection_scores.csv").write_text("score,label,flagged\n" + "".join(
        f"{s},{l},{int(s >= 0.5)}\n" for s, l in zip(scores.tolist(), labels.tolist())))
    summarize(tmp_path, tmp_path / "out")
    det = (tmp_path / "out" / "detection.md").read_text()
    # AUROC: 8 of the 9 (positive, negative) pairs are ordered -> 88.89 %; at 0.5: 2 of 3 flagged, 1 false alarm
    assert "| badnet | spectral |" in det and "88.89" in det and "66.67" in det and "33.33" in det
    assert (tmp_path / "out" / "roc_spectral.png").read_bytes()[:4] == b"\x89PNG"
    ml = (tmp_path / "out" / "model_level.md").read_text()
    # backdoored 4.0, 2.5 against clean 1.2, 2.1: every pair ordered -> AUROC 100 %, one clean model flagged
    assert "AUROC of the largest anomaly index over these 4 models: 100.00 %" in ml
    assert "clean models flagged: 1 of 2" in ml and "backdoored models flagged: 2 of 2" in ml
