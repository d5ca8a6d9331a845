"""Fine-Pruning (docs/specs/fp.md §8): mean activations against a hand computation, the order and its ties, the
candidate counts, head-column pruning equal to silencing the channel on every model, the stopping rule on
hand-made accuracies, no test data in the choice, pruned channels still zero after fine-tuning, resume."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from defense import fp
from models import MODELS, build_model
from utils.errors import UserError
from utils.model_file import load_model_file
from utils.stages import Intervene


def test_mean_activation_is_the_mean_over_images_and_positions():
    torch.manual_seed(0)
    m = build_model("cnn", 10, 1, (0.5,), (0.5,)).eval()
    x = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    stage, means = fp.mean_activations(m, x, batch_size=3)
    with torch.no_grad():
        z = m.layers[:6](m.normalize(x.float() / 255))
    assert stage == "layer4" and torch.allclose(means, z.mean((0, 2, 3)), atol=1e-6)
    assert torch.equal(fp.pruning_order(torch.tensor([0.5, 0.1, 0.5, 0.1])), torch.tensor([1, 3, 0, 2]))
    assert fp.candidates(512, 0.01) == list(range(0, 511, 6)) and len(fp.candidates(512, 0.01)) == 86
    assert fp.candidates(32, 0.01) == list(range(32))


@pytest.mark.parametrize("name", list(MODELS))
def test_zeroing_head_columns_equals_silencing_the_channels(name):
    torch.manual_seed(0)
    c_in, size = (1, 28) if name == "cnn" else (3, 32)
    m = build_model(name, 10, c_in, (0.5,) * c_in, (0.5,) * c_in, 8 if name == "cnn" else 4).eval()
    x = torch.rand(2, c_in, size, size)
    stage = list(m.stages())[-1]
    channels = fp.mean_activations(m, (x * 255).to(torch.uint8))[1].numel()
    pruned = [0, 3, channels - 1]
    keep = torch.ones(channels)
    keep[pruned] = 0
    with torch.no_grad(), Intervene(m, {stage: lambda out: out * keep[None, :, None, None]}):
        silenced = m(x)
    with torch.no_grad():
        m.head.weight[:, fp.head_columns(m, channels, pruned)] = 0
        assert torch.allclose(m(x), silenced, atol=1e-5)


def test_the_stopping_rule_keeps_the_last_accepted_count():
    cfg = {"acc_ratio": 0.1, "acc_drop": "relative"}
    seq = [0.90, 0.89, 0.85, 0.80, 0.95]
    kept = [a for a in seq if fp.accepted(seq[0], a, cfg)]
    first_rejected = next(i for i, a in enumerate(seq) if not fp.accepted(seq[0], a, cfg))
    assert first_rejected == 3 and kept[:3] == [0.90, 0.89, 0.85]      # 0.80 is a drop of 0.111: rejected
    assert fp.accepted(0.9, 0.99, cfg)                                   # an increase is always accepted
    assert fp.accepted(0.9, 0.81, {"acc_ratio": 0.1, "acc_drop": "absolute"}) is True
    assert fp.accepted(0.9, 0.79, {"acc_ratio": 0.1, "acc_drop": "absolute"}) is False
    with pytest.raises(UserError, match="none of the clean subset"):
        fp.accepted(0.0, 0.0, cfg)


def test_search_stops_at_the_first_rejection_and_never_looks_at_the_test_sets(monkeypatch):
    accs = iter([0.9, 0.9, 0.85, 0.7, 0.95])
    monkeypatch.setattr(fp, "features", lambda model, x: x)
    monkeypatch.setattr(fp, "masked_accuracy", lambda model, feats, labels, cols: next(accs))
    model = SimpleNamespace(feature_dim=8)
    ctx = SimpleNamespace(cfg={"acc_ratio": 0.1, "acc_drop": "relative", "once_prune_ratio": 0.25,
                               "log_test_during_pruning": False}, eval_sets=None)
    rows, k, acc0 = fp.search(ctx, model, torch.arange(8), 8, torch.zeros(3, 8), torch.zeros(3))
    assert [r["num_pruned"] for r in rows] == [0, 2, 4, 6] and k == 4 and acc0 == 0.9
    assert [r["accepted"] for r in rows] == [1, 1, 1, 0]


def run_fp(record, *extra):
    return fp.main(["--result_file", str(record), "--epochs", "2", "--batch_size", "32", "--ratio", "0.2",
                    "--eval_batch_size", "256", *extra])


def test_a_run_prunes_fine_tunes_keeps_the_pruned_channels_at_zero_and_resumes(tiny_record, monkeypatch):
    s = run_fp(tiny_record, "--acc_ratio", "0.5")
    out = Path(tiny_record) / "defense" / "fp"
    p = json.loads((out / "pruned.json").read_text())
    assert s["n_pruned"] == p["k"] > 0 and p["stage"] == "layer4" and p["channels"] == 32
    model, _ = load_model_file(out / "model.pt")
    cols = fp.head_columns(model, 32, p["pruned_channels"])
    assert (model.head.weight[:, cols] == 0).all() and (model.head.weight[:, ~cols] != 0).any()
    log = (out / "prune_log.csv").read_text().splitlines()
    assert log[0].startswith("num_pruned,clean_subset_acc,relative_drop,accepted,test_acc")
    for f in ("ranking.csv", "index.txt", "metrics.csv", "summary.json", "curves.png"):
        assert (out / f).exists(), f
    # interrupted in the first fine-tuning epoch, resumed: the same model, and the ranking is not redone
    from utils.run_folder import Run
    original = Run.save_checkpoint

    def die(self, epoch, state, phase=0):
        original(self, epoch, state, phase)
        if phase == 1 and epoch == 1:
            raise KeyboardInterrupt
    import shutil
    shutil.rmtree(out)
    monkeypatch.setattr(Run, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        run_fp(tiny_record, "--acc_ratio", "0.5")
    monkeypatch.setattr(Run, "save_checkpoint", original)
    monkeypatch.setattr(fp, "search", lambda *a: pytest.fail("a resumed run must not search again"))
    r = run_fp(tiny_record, "--acc_ratio", "0.5", "--resume")
    again, _ = load_model_file(out / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert r["test_asr"] == s["test_asr"]


def test_a_subset_without_a_class_is_refused():
    fp.check_classes(torch.arange(10), 10, False)
    with pytest.raises(UserError, match=r"no sample of class\(es\) \[3\]"):
        fp.check_classes(torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9]), 10, False)
    fp.check_classes(torch.tensor([0, 1]), 10, True)
