"""Summaries across records: every complete attack record under a folder, and every defense record inside them,
in one table (a row per record), a table of means and standard deviations over seeds, and two plots.

    python analysis/summarize.py record/                 # writes record/summary/
    python analysis/summarize.py record/sweep_demo --out results/

Writes:
  summary.csv, summary.md                   a row per record: attack, defense ('none' for the attacked model),
                                            dataset, model, pratio, target, seed, defense seed, test_acc,
                                            test_asr, test_ra, where the other poisoned predictions go (test_other,
                                            the most frequent wrong class and its share), DER, wall time (the CSV
                                            keeps fractions and adds RIR and the path; the Markdown shows %)
  summary_mean_std.csv, summary_mean_std.md mean, sample standard deviation and 95 % t-interval over the seeds
                                            (attack seeds and defense seeds) of each setting
  acc_asr_bars.png                          ACC and ASR per defense per attack setting (grouped bars, mean over
                                            seeds, the 95 % t-interval as error bars)
  acc_vs_asr.png                            ACC against ASR, one point per record, undefended points marked,
                                            each defended point joined to its attacked model
  detection.md                              the detectors (records with det_ figures): AUROC, TPR at 1 % and 5 %
                                            FPR, precision, recall and FPR at the detector's threshold, and the
                                            defended model's figures (analysis/detection.py)
  model_level.md                            Neural Cleanse's verdict on every model, clean ones included, and the
                                            model-level AUROC of its anomaly index
  roc_<detector>.png                        one ROC plot per detector, a curve per record
  report.html (--html)                      all of it in one self-contained page (tables, plots, the settings and
                                            deviations of every record), readable offline
The values are the records' summary.json figures, unchanged (conventions §9: the last epoch of each run).
"""
import argparse
import json
import math
import pathlib
import sys


import pandas as pd

from analysis.detection import (DETECTION, NC_KEYS, detection_markdown, detection_values, model_level,
                                model_level_markdown, poisoned_count, roc_curves)
from analysis.plots import NONE, bars_figure, roc_figure, scatter_figure
from utils.errors import UserError, run_main
from utils.io import atomic_write_bytes, read_json
from utils.record_names import read_record_config

KEYS = ["attack", "defense", "dataset", "model", "pratio", "target", "variant"]  # a setting; + seed = a record
# settings that do not change what a record is (paths, devices, seeds): records differing only in them are repeats
NOT_A_SETTING = {"save_folder_name", "result_file", "dataset_path", "device", "eval_batch_size", "random_seed",
                 "out_name", "out_suffix", "checkpoint_every", "start_model"}
METRICS = ["test_acc", "test_asr", "test_ra", "test_other", "der"]
COLUMNS = KEYS + ["seed", "defense_seed"] + METRICS + ["test_top_wrong_class", "test_top_wrong", "seconds",
                                                        "n_poisoned"] + DETECTION + NC_KEYS
SETTING_KEYS = [k for k in KEYS if k != "variant"]
SUMMARY_DIR = "summary"


# --- reading records -------------------------------------------------------------------------------------------

def _config(folder: pathlib.Path) -> dict:
    """The record's resolved settings; {} for a hand-made record without config.yaml (an unreadable one is an error)."""
    if not (folder / "config.yaml").exists():
        return {}
    return read_record_config(folder)["config"]


def _attack_info(folder: pathlib.Path, summary: dict) -> dict:
    """What identifies an attack record: attack, dataset, model, pratio, target, seed."""
    cfg = _config(folder)
    attack = str(summary.get("attack", cfg.get("attack", "?")))
    trigger = cfg.get("trigger")
    if isinstance(trigger, str) and trigger not in attack:   # bypass --trigger badnet|blend
        attack = f"{attack}_{trigger}"
    if cfg.get("attack_label_trans") == "all2all":
        target = f"all2all+{cfg.get('attack_label_shift_amount', 1)}"
    else:
        target = cfg.get("attack_target", 0)
    return {"attack": attack, "dataset": summary.get("dataset", cfg.get("dataset")),
            "model": summary.get("model", cfg.get("model")), "pratio": summary.get("pratio", cfg.get("pratio")),
            "target": target, "seed": cfg.get("random_seed")}


def _settings(defense_folder, attack_folder) -> dict:
    """Every setting of a record (the attack's, and the defense's prefixed with 'defense.'), paths and seeds aside."""
    out = {k: v for k, v in _config(attack_folder).items() if k not in NOT_A_SETTING}
    if defense_folder is not None:
        out.update({f"defense.{k}": v for k, v in _config(defense_folder).items() if k not in NOT_A_SETTING})
    return out


def _variants(df) -> list:
    """'' where a setting (attack, defense, dataset, model, pratio, target) has one configuration; otherwise the keys
    in which its records differ, e.g. 'epochs=8', so that different runs are never averaged as if they were seeds."""
    labels = [""] * len(df)
    for _, idx in df.groupby([df[k].astype(str) for k in SETTING_KEYS], sort=False).groups.items():
        confs = [df.at[i, "_settings"] for i in idx]
        keys = sorted({k for c in confs for k in c})
        differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in confs}) > 1]
        for i, c in zip(idx, confs):
            labels[df.index.get_loc(i)] = ", ".join(f"{k} default" if c.get(k) is None else f"{k}={c.get(k)}"
                                                    for k in differ)
    return labels


def _row(root, folder, s) -> dict:
    """The table row of one record (its summary.json is s); None for a summary.json that is not a record's."""
    if not all(k in s for k in ("test_acc", "test_asr", "test_ra")):
        return None  # not a record of this toolkit
    # the re-tuning attack: <attack>/defense/<method>/retune*/ or <attack>/retune*/ (the undefended model, or the
    # clean-model control); older retune records lack the "evaluation" key
    retuned = s.get("evaluation") == "retune" or folder.parent.parent.name == "defense"
    if "defense" in s or folder.parent.name == "defense" or retuned:
        under_defense = folder.parent.parent.name == "defense"
        attack_folder = (folder.parent.parent.parent if under_defense else folder.parent) if retuned \
            else folder.parent.parent
        parent = attack_folder / "summary.json"
        try:
            a = _attack_info(attack_folder, read_json(parent, "record file") if parent.exists() else s)
        except UserError as e:
            print(f"warning: {e}; its defense record {folder} is described from its own files", file=sys.stderr)
            a = _attack_info(attack_folder, s)
        dfolder = folder.parent if retuned and under_defense else folder
        dcfg = _config(dfolder)
        if retuned and not under_defense:
            name, seed = str(s.get("defense", "none+retune")), _config(folder).get("random_seed")
        else:
            # the folder's name, without the suffix that gives each of several defense seeds a folder (sau_ds1, ...)
            suffix = str(dcfg.get("out_suffix") or "")
            name = dfolder.name[:-len(suffix)] if suffix and dfolder.name.endswith(suffix) else dfolder.name
            name, seed = (f"{name}+retune" if retuned else name), dcfg.get("random_seed")
        row = {**a, "defense": name, "der": s.get("der"), "rir": s.get("rir"), "defense_seed": seed}
    else:
        attack_folder = folder
        row = {**_attack_info(folder, s), "defense": NONE, "der": math.nan, "rir": math.nan, "defense_seed": None}
    row["_settings"] = _settings(folder if row["defense"] != NONE else None, attack_folder)
    row.update({k: s[k] for k in ("test_acc", "test_asr", "test_ra")})
    row.update({k: s.get(k) for k in ("test_other", "test_top_wrong_class", "test_top_wrong")})   # older: None
    row["seconds"] = s.get("seconds")
    row["n_poisoned"] = poisoned_count(attack_folder)
    row.update(detection_values(s))
    try:
        row["record"] = str(folder.relative_to(root))
    except ValueError:
        row["record"] = str(folder)
    return row


def collect(root) -> pd.DataFrame:
    """A row per complete record (summary.json present) under root, attack records and defense records alike."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder of records")
    rows = []
    for path in sorted(root.rglob("summary.json")):
        folder = path.parent
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue   # a record kept aside while --overwrite replaces it
        if (folder / "resource.json").exists():
            continue   # a resource (record/resources/: a clean model, a surrogate), not an attack or a defense
        try:
            row = _row(root, folder, read_json(path, "record file"))
        except UserError as e:
            print(f"warning: skipping {folder}: {e}", file=sys.stderr)
            continue
        if row is not None:
            rows.append(row)
    cols = COLUMNS + ["rir", "record"]
    df = pd.DataFrame(rows, columns=cols + ["_settings"])
    df["defense_seed"] = df["defense_seed"].astype("Int64")
    df["test_top_wrong_class"] = df["test_top_wrong_class"].astype("Int64")
    df[["test_other", "test_top_wrong", *DETECTION[:-1], "nc_max_anomaly_index", "nc_target_anomaly_index"]] = \
        df[["test_other", "test_top_wrong", *DETECTION[:-1], "nc_max_anomaly_index",
            "nc_target_anomaly_index"]].astype(float)
    df["n_poisoned"] = df["n_poisoned"].astype("Int64")
    if df.empty:
        return df.drop(columns="_settings")
    df["variant"] = _variants(df)
    df = df.drop(columns="_settings")
    df["_undef"] = df["defense"] != NONE   # undefended rows first within a setting
    df = df.sort_values(["dataset", "model", "attack", "pratio", "seed", "_undef", "defense"], kind="stable",
                        key=lambda c: c.astype(str) if c.name in ("dataset", "model", "attack", "defense") else c)
    return df.drop(columns="_undef").reset_index(drop=True)


def t_interval(std, n):
    """Half-width of the 95 % t-interval of a mean of n runs: t(0.975, n - 1) std / sqrt(n); nan below 2 runs."""
    from scipy.stats import t
    n = pd.Series(n, dtype=float)
    half = pd.Series(t.ppf(0.975, (n - 1).clip(lower=1)), index=n.index) * std / n.pow(0.5)
    return half.where(n >= 2)


def mean_std(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample standard deviation (ddof 1; empty for a single run) and 95 % t-interval of each setting over
    its runs: attack seeds and defense seeds alike (a run is one (seed, defense seed) pair). Records that differ in
    any other setting are separate variants, never averaged."""
    df = df.assign(target=df["target"].astype(str), _run=df["seed"].map(str) + "/" + df["defense_seed"].map(str))
    g = df.groupby(KEYS, sort=False, dropna=False)
    out = g.size().rename("n_runs").to_frame()
    out["n_seeds"] = g["_run"].nunique()
    out["n_attack_seeds"] = g["seed"].nunique()
    out["n_defense_seeds"] = g["defense_seed"].nunique()
    dup = out[out["n_runs"] > out["n_seeds"]]
    for key, r in dup.iterrows():
        print(f"warning: {' / '.join(map(str, key))}: {r.n_runs} records with the same settings share {r.n_seeds} "
              "seed(s) (copies of one run?); they are averaged together", file=sys.stderr)
    for m in METRICS + ["seconds"] + DETECTION[:-1]:
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_std"] = g[m].std(ddof=1)
        out[f"{m}_ci95"] = t_interval(out[f"{m}_std"], g[m].count())
    return out.reset_index()


# --- tables ----------------------------------------------------------------------------------------------------

def _pct(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def records_markdown(df) -> str:
    header = ["attack", "defense", "dataset", "model", "pratio", "target", "seed", "def. seed",
              "ACC %", "ASR %", "RA %", "other %", "most wrong", "DER %", "wall s"]
    rows = [[r.attack, r.defense, r.dataset, r.model, r.pratio, r.target, r.seed,
             "" if pd.isna(r.defense_seed) else r.defense_seed, _pct(r.test_acc), _pct(r.test_asr), _pct(r.test_ra),
             _pct(r.test_other), _top_wrong(r), _pct(r.der), "" if pd.isna(r.seconds) else f"{r.seconds:.1f}"]
            for r in df.itertuples()]
    return _markdown(*_with_variant(df, header, rows))


def _top_wrong(r):
    """'9 (60.1)': the class most poisoned test images go to besides their true and the attack's label."""
    if pd.isna(r.test_top_wrong_class):
        return ""
    return f"{r.test_top_wrong_class} ({100 * r.test_top_wrong:.1f})"


def _with_variant(df, header, rows):
    """The variant column only where some setting has several configurations."""
    if not (df["variant"] != "").any():
        return header, rows
    return header[:6] + ["variant"] + header[6:], [r[:6] + [v] + r[6:] for r, v in zip(rows, df["variant"])]


def mean_std_markdown(ms) -> str:
    def pm(r, m, scale=100, digits=2):
        """mean ± std [95 % t-interval], or the mean alone for one run."""
        mu, sd, ci = getattr(r, f"{m}_mean"), getattr(r, f"{m}_std"), getattr(r, f"{m}_ci95")
        if pd.isna(mu):
            return ""
        if pd.isna(sd):
            return f"{scale * mu:.{digits}f}"
        lo, hi = scale * (mu - ci), scale * (mu + ci)
        return f"{scale * mu:.{digits}f} ± {scale * sd:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    header = SETTING_KEYS + ["runs (distinct attack, defense seeds)", "ACC %", "ASR %", "RA %", "other %", "DER %", "wall s"]
    rows = [[r.attack, r.defense, r.dataset, r.model, r.pratio, r.target,
             f"{r.n_runs} ({r.n_attack_seeds}, {r.n_defense_seeds})" if r.defense != NONE else f"{r.n_runs}",
             pm(r, "test_acc"), pm(r, "test_asr"), pm(r, "test_ra"), pm(r, "test_other"), pm(r, "der"),
             pm(r, "seconds", 1, 1)] for r in ms.itertuples()]
    return _markdown(*_with_variant(ms, header, rows))


def _write(path: pathlib.Path, data):
    """Temporary file then rename: a reader never sees half a table."""
    atomic_write_bytes(path, data if isinstance(data, bytes) else data.encode())


# --- the whole summary -----------------------------------------------------------------------------------------

def summarize(root, out=None, show=False, plots=True, html=False) -> pd.DataFrame:
    root = pathlib.Path(root)
    out = pathlib.Path(out) if out else root / SUMMARY_DIR
    df = collect(root)
    if df.empty:
        raise UserError(f"no complete record (a folder with summary.json) under {root}")
    ms = mean_std(df)
    _write(out / "summary.csv", df.to_csv(index=False))
    _write(out / "summary.md", records_markdown(df))
    _write(out / "summary_mean_std.csv", ms.to_csv(index=False))
    _write(out / "summary_mean_std.md", mean_std_markdown(ms))
    figures = {}
    tables = {}
    if ms["det_auroc_mean"].notna().any():
        tables["Detection"] = detection_markdown(ms, _markdown)
        _write(out / "detection.md", tables["Detection"])
    ml = model_level(df)
    if len(ml):
        tables["Neural Cleanse on every model"] = model_level_markdown(ml, _markdown)
        _write(out / "model_level.md", tables["Neural Cleanse on every model"])
    figures, rocs = {}, {}
    if plots or html:
        figures = {"ACC and ASR per defense (mean over runs, 95 % interval)": bars_figure(ms),
                   "ACC against ASR, one point per record": scatter_figure(df)}
        rocs = {d: roc_figure(d, c) for d, c in roc_curves(root, df).items()}
        figures.update({f"{d}: ROC of its detection": png for d, png in rocs.items()})
    if plots:
        _write(out / "acc_asr_bars.png", figures["ACC and ASR per defense (mean over runs, 95 % interval)"])
        _write(out / "acc_vs_asr.png", figures["ACC against ASR, one point per record"])
        for d, png in rocs.items():
            _write(out / f"roc_{d}.png", png)
    if html:
        from analysis.report import report_html
        _write(out / "report.html", report_html(root, df, ms, figures, tables))
    if show:
        print("\n" + records_markdown(df))
    print(f"{len(df)} records ({(df['defense'] == NONE).sum()} attacks, {(df['defense'] != NONE).sum()} defenses) "
          f"summarised in {out}/")
    return df


def main(argv=None):
    p = argparse.ArgumentParser(prog="analysis/summarize.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="a folder of records, e.g. record/")
    p.add_argument("--out", default=None, help=f"output folder (default: <root>/{SUMMARY_DIR}/)")
    p.add_argument("--no_plots", action="store_true", help="tables only")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    p.add_argument("--html", action="store_true", help="also write report.html, one self-contained page")
    args = p.parse_args(argv)
    summarize(args.root, args.out, show=not args.quiet, plots=not args.no_plots, html=args.html)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
