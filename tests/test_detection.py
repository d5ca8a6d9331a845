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
