"""The re-tuning attack (analysis/retune.py, docs/specs/retune.md): the re-tuning set, the purified model as epoch 0,
every weight trainable, the defense record untouched, resume = uninterrupted, and its row in the summaries."""
import hashlib
import shutil

import pandas as pd
import pytest
import torch

from analysis import retune
from analysis.summarize import collect
from utils.errors import UserError
from utils.record import load_attack_record
from utils.run_folder import Run

FAST = ["--epochs", "2", "--split_ratio", "0.2", "--poison_num", "10", "--batch_size", "32", "--amp", "false",
        "--channels_last", "false"]


@pytest.fixture(scope="module")
def defended(tmp_path_factory, tiny_record):
    """A copy of the tiny BadNets record with an lp defense record (its backbone frozen: re-tuning unfreezes it)."""
    from defense import ft
    rec = tmp_path_factory.mktemp("rt") / "badnet_tiny"
    shutil.copytree(tiny_record, rec, ignore=shutil.ignore_patterns("defense"))   # other tests defend it too
    ft.main(["--result_file", str(rec), "--ft_mode", "lp", "--epochs", "1", "--split_ratio", "0.1", "--batch_size",
             "32", "--amp", "false", "--channels_last", "false"])
    return rec


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_retuning_set_is_poisoned_and_clean_samples_of_the_attackers_training_set(defended):
    data = load_attack_record(defended).data
    cfg = {"split_ratio": 0.2, "poison_num": 10, "random_seed": 0}
    p, c = retune.retune_set(data, cfg)
    assert len(p) == 10 and len(p) + len(c) == int(0.2 * len(data.y_train))
    assert (data.poison_indicator[p] == 1).all() and (data.poison_indicator[c] == 0).all()
    assert torch.equal(retune.retune_set(data, cfg)[0], p)           # reproducible
    assert not torch.equal(retune.retune_set(data, {**cfg, "random_seed": 1})[1], c)
    with pytest.raises(UserError, match="exceeds the .* poisoned"):
        retune.retune_set(data, {**cfg, "poison_num": 500, "split_ratio": 0.99})   # 60 poisoned in the record


def test_retune_starts_from_the_purified_model_trains_every_weight_and_leaves_the_defense_alone(defended):
    before = digest(defended / "defense" / "lp")
    s = retune.main(["--result_file", str(defended / "defense" / "lp"), *FAST])
    out = defended / "defense" / "lp" / "retune"
    rows = pd.read_csv(out / "metrics.csv")
    assert list(rows["epoch"]) == [0, 1, 2] and list(rows["phase"]) == ["start", "retune", "retune"]
    assert s["epoch0_matches_record"] and s["start"]["test_asr"] == rows["test_asr"][0]
    assert s["n_poisoned"] == 10 and s["defense"] == "lp+retune"
    assert digest(defended / "defense" / "lp") == before   # only the retune/ folder was added
    lp = torch.load(defended / "defense" / "lp" / "model.pt", weights_only=True)["state_dict"]
    rt = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert not torch.equal(lp["layers.0.0.weight"], rt["layers.0.0.weight"])   # lp froze it; the attacker does not
    df = collect(defended)
    assert "lp+retune" in set(df["defense"])


def test_resume_equals_an_uninterrupted_run(defended, monkeypatch, tmp_path):
    full = retune.main(["--result_file", str(defended / "defense" / "lp"), *FAST, "--out_suffix", "_a"])
    original = Run.save_checkpoint

    def save_then_die(self, epoch, state, phase=0):
        original(self, epoch, state, phase)
        if phase == 1 and epoch == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    args = ["--result_file", str(defended / "defense" / "lp"), *FAST, "--out_suffix", "_b"]
    with pytest.raises(KeyboardInterrupt):
        retune.main(args)
    monkeypatch.setattr(Run, "save_checkpoint", original)
    cut = retune.main(args + ["--resume"])
    for k in ("test_acc", "test_asr", "test_ra"):
        assert cut[k] == full[k]
    wa = torch.load(defended / "defense" / "lp" / "retune_a" / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(defended / "defense" / "lp" / "retune_b" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_undefended_model_and_the_clean_model_control(defended):
    """An attack record re-tunes its own model (none+retune); --start_model re-tunes another record's model on the
    same re-tuning set (control+retune), its epoch 0 being that model on this attack's test sets."""
    none = retune.main(["--result_file", str(defended), *FAST])
    assert none["defense"] == "none+retune" and none["epoch0_matches_record"]
    attack = pd.read_csv(defended / "metrics.csv").iloc[-1]
    assert none["start"]["test_asr"] == pytest.approx(attack["test_asr"])
    lp = defended / "defense" / "lp"
    ctrl = retune.main(["--result_file", str(defended), "--start_model", str(lp), *FAST])
    out = defended / "retune_control"
    assert ctrl["defense"] == "control+retune" and ctrl["start_model"] == str(lp) and (out / "model.pt").exists()
    lp_summary = pd.read_json(lp / "summary.json", typ="series")
    assert ctrl["start"]["test_acc"] == pytest.approx(lp_summary["test_acc"])   # lp's model, not the attack's
    # the same re-tuning set as the undefended run: same draws, same seed
    assert (out / "poison_index.txt").read_text() == (defended / "retune" / "poison_index.txt").read_text()
    df = collect(defended)
    rows = df[df["defense"].isin(["none+retune", "control+retune"])]
    assert len(rows) == 2 and set(rows["attack"]) == {"badnet"}


def test_bad_targets_are_refused(defended):
    with pytest.raises(UserError, match="missing or incomplete"):
        retune.main(["--result_file", str(defended / "defense" / "nothing")])
    with pytest.raises(UserError, match="no attack record"):
        retune.main(["--result_file", str(defended.parent / "nothing")])
    with pytest.raises(UserError, match="--start_model .*no complete record"):
        retune.main(["--result_file", str(defended), "--start_model", str(defended.parent / "nothing"), *FAST])


def test_the_reactivation_loss_is_the_specs_formula():
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    lp, lr, lc = (torch.randn(4, 3, generator=g) for _ in range(3))
    y = torch.tensor([0, 2, 1, 1])
    p_ra, q = lr.softmax(1), lp.softmax(1)
    kl = (p_ra * (p_ra.log() - q.log())).sum(1).mean()
    ce = -lc.log_softmax(1)[torch.arange(4), y].mean()
    assert retune.qra_loss(lp, lr, lc, y, 0.2).item() == pytest.approx((0.2 * kl + ce).item(), rel=1e-5)
    assert F.kl_div(lp.log_softmax(1), lp.log_softmax(1), log_target=True, reduction="batchmean").item() == 0


def test_universal_reactivation_stays_in_its_budget_and_reports_both_models(defended):
    from safetensors.torch import load_file
    lp = defended / "defense" / "lp"
    eps = 8 / 255
    s = retune.main(["--result_file", str(lp), *FAST, "--out_suffix", "_qra", "--qra", "universal",
                     "--qra_clean_model", str(defended), "--qra_epochs", "2", "--qra_num", "20", "--qra_eps", str(eps)])
    q = s["qra"]
    delta = load_file(lp / "retune_qra" / "qra_delta.safetensors")["delta"]
    assert delta.shape == (1, 1, 28, 28) and delta.abs().max().item() <= eps + 1e-7 and q["linf"] > 0
    # without the perturbation the purified model's ASR is the record's own: the stage evaluates the purified
    # model, not the re-tuned one
    assert q["purified_asr_no_delta"] == pytest.approx(s["start"]["test_asr"])
    assert all(0 <= q[k] <= 1 for k in ("purified_asr", "purified_clean_to_target", "clean_asr", "clean_clean_to_target"))
    with pytest.raises(UserError, match="--qra needs --qra_clean_model"):
        retune.main(["--result_file", str(lp), *FAST, "--qra", "universal"])
