"""A self-contained HTML report of a folder of records (analysis/summarize.py --html): the tables with their
intervals, where the poisoned predictions go, the plots (embedded), and the settings and deviations of every
record. One file, no scripts, no network: it reads the same in any browser, offline."""
import base64
import html
import math

import pandas as pd

from analysis.plots import NONE
from utils.record_names import read_record_config

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.none td { background: #fbf6e6; }
.bar { display: inline-block; height: 10px; vertical-align: middle; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
details { margin: 0.3em 0; } summary { cursor: pointer; } code, pre { font-size: 12px; }
.note { color: #555; max-width: 60em; }
"""

LEFT = {"attack", "defense", "dataset", "model", "variant", "record"}


def _cell(v, pct=False):
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    if pct:
        return f"{100 * v:.2f}"
    return html.escape(str(v))


def _table(header, rows, classes=None) -> str:
    head = "".join(f'<th class="{"l" if h in LEFT else ""}">{html.escape(h)}</th>' for h in header)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f'<td class="{"l" if h in LEFT else ""}">{c}</td>'
                                           for h, c in zip(header, r)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _breakdown_bar(r) -> str:
    """A stacked bar of the poisoned test predictions: target (red), true label (green), elsewhere (grey)."""
    parts = [(r.test_asr, "#d62728", "ASR"), (r.test_ra, "#2ca02c", "RA"), (r.test_other, "#999", "other")]
    if any(v is None or pd.isna(v) for v, _, _ in parts):
        return ""
    return "".join(f'<span class="bar" title="{n} {100 * v:.1f} %" style="width:{120 * v:.1f}px;background:{c}">'
                   f"</span>" for v, c, n in parts)


def records_table(df) -> str:
    header = ["attack", "defense", "dataset", "model", "pratio", "target", "seed", "def. seed", "variant", "ACC %",
              "ASR %", "RA %", "other %", "most wrong class (%)", "poisoned test predictions", "DER %", "wall s",
              "record"]
    rows, classes = [], []
    for r in df.itertuples():
        top = "" if pd.isna(r.test_top_wrong_class) else f"{r.test_top_wrong_class} ({100 * r.test_top_wrong:.1f})"
        rows.append([_cell(r.attack), _cell(r.defense), _cell(r.dataset), _cell(r.model), _cell(r.pratio),
                     _cell(r.target), _cell(r.seed), _cell(r.defense_seed), _cell(r.variant),
                     _cell(r.test_acc, True), _cell(r.test_asr, True), _cell(r.test_ra, True),
                     _cell(r.test_other, True), top, _breakdown_bar(r), _cell(r.der, True),
                     "" if pd.isna(r.seconds) else f"{r.seconds:.1f}", _cell(r.record)])
        classes.append("none" if r.defense == NONE else "")
    return _table(header, rows, classes)


def mean_table(ms) -> str:
    def pm(r, m, scale=100):
        mu, sd, ci = (getattr(r, f"{m}_{k}") for k in ("mean", "std", "ci95"))
        if pd.isna(mu):
            return ""
        if pd.isna(sd):
            return f"{scale * mu:.2f}"
        return f"{scale * mu:.2f} ± {scale * sd:.2f}<br><small>[{scale * (mu - ci):.2f}, {scale * (mu + ci):.2f}]</small>"
    header = ["attack", "defense", "dataset", "model", "pratio", "target", "variant", "runs", "ACC %", "ASR %",
              "RA %", "other %", "DER %", "wall s"]
    rows = [[_cell(r.attack), _cell(r.defense), _cell(r.dataset), _cell(r.model), _cell(r.pratio), _cell(r.target),
             _cell(r.variant), f"{r.n_runs} ({r.n_attack_seeds} × {r.n_defense_seeds})" if r.defense != NONE
             else f"{r.n_runs}",
             pm(r, "test_acc"), pm(r, "test_asr"), pm(r, "test_ra"), pm(r, "test_other"), pm(r, "der"),
             pm(r, "seconds", 1)] for r in ms.itertuples()]
    return _table(header, rows, ["none" if d == NONE else "" for d in ms["defense"]])


def settings_section(root, df) -> str:
    """Every record's resolved settings and the deviations from its specification, folded."""
    out = []
    for r in df.itertuples():
        try:
            meta = read_record_config(root / r.record)
        except Exception:   # a hand-made record without config.yaml: nothing to show
            continue
        dev = meta.get("deviations") or []
        cfg = meta.get("config") or {}
        extra = {k: meta[k] for k in ("precision", "device", "sessions", "command") if k in meta}
        items = "".join(f"<li>{html.escape(str(d))}</li>" for d in dev) or "<li>none</li>"
        conf = "\n".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in sorted(cfg.items()))
        more = "\n".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in extra.items())
        out.append(f"<details><summary><b>{html.escape(r.record)}</b> ({html.escape(str(r.defense))}): "
                   f"{len(dev)} deviation(s)</summary><p>Deviations from the specification:</p><ul>{items}</ul>"
                   f"<pre>{conf}\n\n{more}</pre></details>")
    return "".join(out)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _markdown_table(text: str) -> str:
    """A Markdown pipe table (and the lines after it) as HTML."""
    lines = [l for l in text.strip().splitlines()]
    table = [l for l in lines if l.startswith("|")]
    rest = "".join(f"<p>{html.escape(l)}</p>" for l in lines if l.strip() and not l.startswith("|"))
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in table]
    header, rows = cells[0], cells[2:]
    return _table(header, [[html.escape(c) for c in r] for r in rows]) + rest


def report_html(root, df, ms, figures: dict, tables=None) -> str:
    """The whole page. figures: {title: png bytes}; tables: {title: Markdown table} (detection)."""
    extra = "".join(f"<h2>{html.escape(t)}</h2>{_markdown_table(m)}" for t, m in (tables or {}).items())
    n_def = int((df["defense"] != NONE).sum())
    plots = "".join(f"<h3>{html.escape(t)}</h3>{_img(p, t)}" for t, p in figures.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Records under {html.escape(str(root))}</title>
<style>{STYLE}</style></head><body>
<h1>Records under <code>{html.escape(str(root))}</code></h1>
<p class="note">{len(df) - n_def} attack and {n_def} defense records. ACC: clean test accuracy; ASR: poisoned test
images classified as the attack's label; RA: poisoned test images classified as their true label; other: neither,
with the class most of them go to. A low ASR with a low RA means the backdoor's images went elsewhere, not that the
backdoor is gone. Means are over runs (attack seeds × defense seeds) with the sample standard deviation and, in
brackets, the 95 % t-interval of the mean; records that differ in any other setting are kept apart (variant).</p>
<h2>Mean over seeds</h2>{mean_table(ms)}
{extra}
<h2>Plots</h2>{plots}
<h2>Every record</h2>{records_table(df)}
<h2>Settings and deviations of each record</h2>{settings_section(root, df)}
</body></html>
"""
