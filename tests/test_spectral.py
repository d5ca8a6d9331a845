"""Spectral Signatures (docs/specs/spectral.md §9): the score against a hand SVD, the removal count and tie rule,
each label decided on its own, a planted outlier direction found (and a useless score on isotropic data), the removed
set written once and refused when altered, and a run that retrains and resumes to the same model."""
import shutil
from pathlib import Path

import pytest
import torch

from defense import spectral
from utils.detection import roc_auc
from utils.errors import UserError
from tests.conftest import killed_after_checkpoint
from utils.model_file import load_model_file


def test_the_score_is_the_squared_projection_on_the_top_singular_vector_of_the_centred_matrix():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 5, generator=g, dtype=torch.float64) * torch.tensor([5.0, 1, 1, 1, 1], dtype=torch.float64)
    centred, uncentred, s = spectral.spectral_scores(h)
    c = h - h.mean(0)
    # the top eigenvector of the covariance, by power iteration: no SVD call shared with the code under test
    v = torch.ones(5, dtype=torch.float64)
    for _ in range(500):
        v = c.T @ (c @ v)
        v = v / v.norm()
    assert torch.allclose(centred, (c @ v) ** 2, atol=1e-9) and torch.allclose(uncentred, (h @ v).abs(), atol=1e-9)
    assert centred.sum().item() == pytest.approx(s[0].item() ** 2, rel=1e-9)     # the scores sum to sigma_1^2
    assert torch.allclose(spectral.spectral_scores(-h)[0], centred, atol=1e-9)   # the sign of v does not matter


def test_removal_count_and_ties():
    assert [spectral.removal_count(n, 0.1, 1.5) for n in (9500, 5003, 6, 11400, 20)] == [1425, 750, 0, 1710, 3]
    mask = spectral.remove_top(torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0]), 2)
    assert mask.tolist() == [False, True, True, False, False]     # tied scores: lower position first
    assert not spectral.remove_top(torch.tensor([1.0, 2.0]), 0).any()
    with pytest.raises(UserError, match="whole label"):
        spectral.check_settings({"eps": 0.7, "eps_multiplier": 1.5})


def test_a_planted_direction_is_found_and_isotropic_data_gives_a_useless_score():
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(900, 16, generator=g)
    poisoned = torch.randn(100, 16, generator=g)
    poisoned[:, 3] += 8                                         # the backdoor's trace: a shift along one direction
    h, labels = torch.cat([clean, poisoned]), torch.arange(1000) >= 900
    score = spectral.spectral_scores(h)[0]
    assert roc_auc(score, labels) > 0.99
    removed = spectral.remove_top(score, spectral.removal_count(1000, 0.1, 1.5))
    assert (removed & labels).sum() == 100                     # every poisoned sample among the 150 removed
    same = spectral.spectral_scores(torch.cat([clean, torch.randn(100, 16, generator=g)]))[0]
    assert abs(roc_auc(same, labels) - 0.5) < 0.1


def run_spectral(record, *extra):
    return spectral.main(["--result_file", str(record), "--device", "cpu", "--amp", "false", "--channels_last",
                          "false", *extra])


def test_a_run_removes_retrains_and_resumes(tiny_record, monkeypatch):
    s = run_spectral(tiny_record)
    out = Path(tiny_record) / "defense" / "spectral"
    removed = [int(v) for v in (out / "removed.txt").read_text().split()]
    assert s["n_removed"] == len(removed) > 0 and 0 <= s["det_auroc"] <= 1
    assert len((out / "detection_scores.csv").read_text().splitlines()) == 1 + 600     # every training sample
    for f in ("classes.csv", "model.pt", "metrics.csv", "curves.png", "spectral.json"):
        assert (out / f).exists(), f
    model, _ = load_model_file(out / "model.pt")
    # each label set loses floor(0.15 n_y) samples
    from utils.record import load_attack_record
    rec = load_attack_record(tiny_record, None, "cpu")
    counts = torch.bincount(rec.data.y_train[rec.data.train_indices], minlength=10)
    assert len(removed) == sum(spectral.removal_count(int(n), 0.1, 1.5) for n in counts)
    # interrupted in the retraining, resumed: the same model, and the scores are not computed again
    shutil.rmtree(out)
    with killed_after_checkpoint(lambda phase, epoch: phase == 0):
        run_spectral(tiny_record)
    monkeypatch.setattr(spectral, "detect", lambda *a: pytest.fail("a resumed run must not score again"))
    r = run_spectral(tiny_record, "--resume")
    again, _ = load_model_file(out / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert r["test_asr"] == s["test_asr"] and r["det_auroc"] == s["det_auroc"]


def test_an_altered_removed_file_is_refused(tiny_record):
    out = Path(tiny_record) / "defense" / "spectral_alt"
    with killed_after_checkpoint(lambda phase, epoch: True):
        run_spectral(tiny_record, "--out_suffix", "_alt")
    (out / "removed.txt").write_text("0\n1\n")
    with pytest.raises(UserError, match="SHA-256 differs"):
        run_spectral(tiny_record, "--out_suffix", "_alt", "--resume")
