"""bench/asr_floor.py: every model on every record's poisoned test set, each cell wired to the right pair."""
import json

import pytest
import torch

from bench.asr_floor import floor_table, main, markdown
from tests.conftest import make_record
from utils.errors import UserError
from utils.record import load_attack_record
from utils.engine.device import Precision


@pytest.fixture(scope="module")
def blend_tiny(tmp_path_factory, fake_root):
    path = tmp_path_factory.mktemp("rec") / "blend_tiny"
    make_record(path, fake_root, "blend")
    return path


def test_each_cell_is_that_model_on_that_records_poisoned_set(tiny_record, blend_tiny):
    recs = [str(tiny_record), str(blend_tiny)]
    table = floor_table(recs, recs, Precision(torch.device("cpu"), False, False), torch.device("cpu"))
    for r in recs:   # a record's own model on its own trigger is the attack's figure
        s = json.loads((load_attack_record(r).path / "summary.json").read_text())
        assert table[r][r][1] == pytest.approx(s["test_asr"], abs=1e-6)
        assert table[r][r][0] == pytest.approx(s["test_acc"], abs=1e-6)
    # the BadNets model on the Blended test set, counted by hand
    model, blend = load_attack_record(recs[0]).model.eval(), load_attack_record(recs[1]).data
    with torch.no_grad():
        pred = model(blend.x_bd_test.float() / 255).argmax(1)
    assert table[recs[0]][recs[1]][1] == pytest.approx((pred == blend.y_bd_test).double().mean().item(), abs=1e-6)
    assert table[recs[0]][recs[1]][2] == pytest.approx((pred == blend.y_bd_test_true).double().mean().item(), abs=1e-6)
    text = markdown(table, recs)
    assert text.count("= attack") == 2 and len(text.splitlines()) == 4


def test_records_of_different_datasets_are_refused(tiny_record, blend_tiny, monkeypatch):
    def load(name, device=None):
        rec = load_attack_record(name, device=device)
        if name == str(blend_tiny):
            rec.config["dataset"] = "mnist"
        return rec
    monkeypatch.setattr("bench.asr_floor.load_attack_record", load)
    with pytest.raises(UserError, match="compare records of one dataset"):
        main(["--records", str(tiny_record), str(blend_tiny), "--models", str(tiny_record)])


def test_a_defense_records_model_is_the_defended_one(tiny_record, blend_tiny, tmp_path):
    import shutil
    from tests.test_pdb import run_pdb
    rec = tmp_path / "rec"
    shutil.copytree(tiny_record, rec)
    s = run_pdb(rec)
    pdb_out = str(rec / "defense" / "pdb")
    table = floor_table([str(rec), str(blend_tiny)], [pdb_out], Precision(torch.device("cpu"), False, False),
                        torch.device("cpu"))
    # PDB's own summary holds the defended model's figures (stamp on, mapping undone), not the raw model's
    assert table[pdb_out][str(rec)][:2] == pytest.approx((s["test_acc"], s["test_asr"]), abs=1e-6)
    assert "rec/defense/pdb" in markdown(table, [str(rec), str(blend_tiny)])
