"""Evaluation that tells the whole truth: where the poisoned predictions go (also before PDB's inverse mapping),
defense seeds as a grid axis, and 95 % t-intervals in the summaries."""
import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml

from analysis.summarize import collect, mean_std, summarize, t_interval
from defense import pdb
from defense.pdb_model import DefendedModel
from sweep.jobs import expand
from utils.defense import DefenseContext
from utils.engine.device import Precision
from utils.engine.evaluate import EvalSets, breakdown_summary, prediction_breakdown


def test_breakdown_on_hand_made_predictions():
    y_attack = torch.zeros(8, dtype=torch.int64)
    y_true = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    pred = torch.tensor([0, 0, 3, 9, 9, 9, 2, 8])   # 2 to the target, 2 true, 3 to class 9, 1 to class 2
    b = prediction_breakdown(pred, y_attack, y_true, 10)
    assert b["test_other"] == 4 / 8 and b["test_top_wrong_class"] == 9 and b["test_top_wrong"] == 3 / 8
    per_class = breakdown_summary(b)["bd_pred_per_class"]
    assert per_class == [2 / 8, 0, 1 / 8, 1 / 8, 0, 0, 0, 0, 1 / 8, 3 / 8] and sum(per_class) == 1
    none_wrong = prediction_breakdown(y_true.clone(), y_attack, y_true, 10)
    assert none_wrong["test_other"] == 0 and none_wrong["test_top_wrong_class"] is None


def test_a_record_says_where_its_poisoned_predictions_go(tiny_record):
    s = json.loads((tiny_record / "summary.json").read_text())
    last = pd.read_csv(tiny_record / "metrics.csv").iloc[-1]
    assert s["test_other"] == pytest.approx(1 - s["test_asr"] - s["test_ra"], abs=1e-6)
    assert sum(s["bd_pred_per_class"]) == pytest.approx(1) and len(s["bd_pred_per_class"]) == 10
    assert last["test_other"] == pytest.approx(s["test_other"])
    assert "bd_pred_per_class" in last.index


class Constant(torch.nn.Module):
    """A 'model' that predicts class c for every input."""
    num_classes = 10

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), self.c), 10).float() + 0 * self.w


def test_pdb_tells_a_redirected_backdoor_from_a_removed_one():
    n = 20
    data = SimpleNamespace(num_classes=10, x_test=torch.zeros(n, 1, 8, 8, dtype=torch.uint8),
                           y_test=torch.arange(n) % 10, x_bd_test=torch.zeros(n, 1, 8, 8, dtype=torch.uint8),
                           y_bd_test=torch.zeros(n, dtype=torch.int64), y_bd_test_true=1 + torch.arange(n) % 8)
    sets = EvalSets(data, "cpu")
    ctx = DefenseContext({"eval_batch_size": 8}, None, None, torch.device("cpu"),
                         Precision(torch.device("cpu"), False, False), sets, {})
    # the malicious backdoor still decides under the defensive stamp: the mapping sends everything to class 9
    redirected = pdb.evaluate(ctx, DefendedModel(Constant(0), (1, 8, 8), target_type=1, square_size=2))
    assert redirected["test_asr"] == 0 and redirected["premap_test_asr"] == 1
    assert redirected["test_top_wrong_class"] == 9 and redirected["test_top_wrong"] == 1
    # the defensive backdoor decides (h(y) = y + 1 before the mapping): the true label, nothing redirected
    honest = DefendedModel(Constant(0), (1, 8, 8), target_type=1, square_size=2)
    honest.inner.forward = lambda x: torch.nn.functional.one_hot((data.y_bd_test_true[:len(x)] + 1) % 10, 10).float()
    removed = pdb.evaluate(ctx, honest)
    assert removed["premap_test_asr"] == 0 and removed["test_ra"] == 1 and removed["test_other"] == 0


def test_defense_seeds_are_a_grid_axis(tmp_path):
    jobs = expand({"grid": {"attack": "badnet", "seed": [0, 1]}, "defenses": ["sau", "ft-bb"],
                   "defense_seed": [0, 1, 2]}, tmp_path)
    assert len(jobs) == 2 and len(jobs[0].children) == 6
    sau = [j for j in jobs[1].children if j.method == "sau"]
    assert [j.out.name for j in sau] == ["sau_ds0", "sau_ds1", "sau_ds2"]
    cmd = " ".join(sau[2].command())
    assert "--random_seed 2" in cmd and "--out_suffix _ds2" in cmd
    assert [j.out.name for j in jobs[0].children if j.method == "ft-bb"][1] == "ft-bb_ds1"
    from utils.errors import UserError
    with pytest.raises(UserError, match="distinct"):
        expand({"grid": {"attack": "badnet"}, "defenses": ["sau"], "defense_seed": [1, 1]}, tmp_path)


def fake(folder, summary, config):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump({"config": config}))


def test_summaries_average_defense_seeds_with_a_t_interval_and_keep_other_settings_apart(tmp_path):
    a = tmp_path / "badnet_s0"
    fake(a, {"attack": "badnet", "dataset": "mnist", "model": "cnn", "pratio": 0.1, "test_acc": 0.9, "test_asr": 1.0,
             "test_ra": 0.0}, {"random_seed": 0})
    asrs = [0.1, 0.2, 0.6]
    for s, asr in enumerate(asrs):
        fake(a / "defense" / f"sau_ds{s}", {"defense": "sau", "test_acc": 0.8, "test_asr": asr, "test_ra": 0.5,
                                            "test_other": 0.4 - asr / 2, "test_top_wrong_class": 9,
                                            "test_top_wrong": 0.2, "der": 0.5},
             {"random_seed": s, "out_suffix": f"_ds{s}", "n_rounds": 20})
    fake(a / "defense" / "sau_long", {"defense": "sau", "test_acc": 0.8, "test_asr": 0.0, "test_ra": 0.5, "der": 0.5},
         {"random_seed": 0, "n_rounds": 100})   # another folder, another setting: never averaged with the seeds
    df = collect(tmp_path)
    assert list(df[df["defense"] == "sau"]["defense_seed"]) == [0, 1, 2]
    ms = mean_std(df)
    seeds = ms[ms["defense"] == "sau"].iloc[0]
    assert seeds["n_runs"] == 3 and seeds["n_attack_seeds"] == 1 and seeds["n_defense_seeds"] == 3
    sd = pd.Series(asrs).std()
    assert seeds["test_asr_ci95"] == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-5)
    assert seeds["test_other_mean"] == pytest.approx(sum(0.4 - a / 2 for a in asrs) / 3)
    assert ms[ms["defense"] == "sau_long"].iloc[0]["n_runs"] == 1
    summarize(tmp_path, tmp_path / "out")
    md = (tmp_path / "out" / "summary_mean_std.md").read_text()
    assert "3 (1, 3)" in md and "30.00 ± 26.46 [-35.72, 95.72]" in md
    rows = (tmp_path / "out" / "summary.md").read_text()
    assert "9 (20.0)" in rows   # the most frequent wrong class and its share


def test_t_interval():
    assert t_interval(pd.Series([1.0, 1.0, float("nan")]), [2, 10, 1]).round(4).tolist()[:2] == \
        [round(12.7062 / math.sqrt(2), 4), round(2.2622 / math.sqrt(10), 4)]
    assert math.isnan(t_interval(pd.Series([1.0]), [1]).iloc[0])


def test_html_report_is_self_contained_and_holds_every_record(tmp_path, tiny_record):
    import shutil
    from html.parser import HTMLParser
    root = tmp_path / "sweep"
    shutil.copytree(tiny_record, root / "badnet_tiny", ignore=shutil.ignore_patterns("defense"))   # the attack alone: other tests defend the shared record
    summarize(root, root / "summary", html=True)
    page = (root / "summary" / "report.html").read_text()

    class Parse(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.rows, self.imgs, self.links, self.scripts, self.details = 0, 0, [], [], 0, 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            self.tables += tag == "table"
            self.rows += tag == "tr"
            self.scripts += tag == "script"
            self.details += tag == "details"
            if tag == "img":
                self.imgs.append(a.get("src", ""))
            if tag in ("link", "a") and a.get("href", "").startswith("http"):
                self.links.append(a["href"])
    p = Parse()
    p.feed(page)
    assert p.tables == 2 and p.details == 1 and p.scripts == 0 and not p.links   # offline, no code
    assert len(p.imgs) == 2 and all(s.startswith("data:image/png;base64,") for s in p.imgs)
    assert p.rows == 2 + 2   # a header and one row in each table
    assert "crop_padding = 1" in page   # the record's deviations from its specification
