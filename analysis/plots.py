"""The plots of a summary: ACC and ASR per defense per attack setting (grouped bars, mean over seeds with the
95 % t-interval as error bars), and ACC against ASR (one point per record, each defended point joined to its
attacked model)."""
import pathlib

import pandas as pd

NONE = "none"  # the defense column of an attacked (undefended) model


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _setting_label(r, varying):
    parts = [str(r["attack"])] + [f"{k} {r[k]}" for k in ("dataset", "model", "pratio", "target") if k in varying]
    return "\n".join(parts)


def _png(fig) -> bytes:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def bars_figure(ms: pd.DataFrame) -> bytes:
    """Two panels (ACC, ASR); a group of bars per attack setting, a bar per defense (mean over its runs, the 95 %
    t-interval of the mean as error bars where there are two runs or more)."""
    plt = _plt()
    cols = ["attack", "dataset", "model", "pratio", "target"]
    settings = ms[cols].drop_duplicates().reset_index(drop=True)
    varying = [k for k in ("dataset", "model", "pratio", "target") if settings[k].nunique() > 1]
    defenses = [NONE] + sorted(d for d in ms["defense"].unique() if d != NONE)
    colors = plt.get_cmap("tab10" if len(defenses) <= 10 else "tab20")
    n, k = len(settings), len(defenses)
    width = 0.8 / k
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.0 + n * (0.35 * k + 0.6)), 6.5), sharex=True)
    for ax, m, title in zip(axes, ("test_acc", "test_asr"), ("clean accuracy (ACC)", "attack success rate (ASR)")):
        for j, d in enumerate(defenses):
            xs, ys, es = [], [], []
            for i, s in settings.iterrows():
                hit = ms[(ms["defense"] == d) & (ms[cols] == s).all(axis=1)]
                if len(hit):
                    xs.append(i - 0.4 + (j + 0.5) * width)
                    ys.append(100 * hit[f"{m}_mean"].iloc[0])
                    ci = hit[f"{m}_ci95"].iloc[0] if f"{m}_ci95" in hit else float("nan")
                    es.append(0 if pd.isna(ci) else 100 * ci)
            if xs:
                bars = ax.bar(xs, ys, width, yerr=es if any(es) else None, capsize=2, ecolor="0.5",
                              color="0.2" if d == NONE else colors(j - 1),
                              label="no defense" if d == NONE else d, edgecolor="white", linewidth=0.5)
                # the value over each bar, so that a bar of height 0 (a removed backdoor) still reads as a result
                ax.bar_label(bars, labels=[f"{y:.0f}" for y in ys], fontsize=6, padding=1)
        ax.set_ylabel(f"{title}, %\n(bars: 95 % interval of the mean)" if m == "test_acc" else f"{title}, %")
        ax.set_ylim(0, 110)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(n))
    axes[1].set_xticklabels([_setting_label(s, varying) for _, s in settings.iterrows()], fontsize=9)
    axes[0].legend(ncol=min(k, 5), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.02))
    return _png(fig)


def scatter_figure(df: pd.DataFrame) -> bytes:
    """ACC (y) against ASR (x), one point per record; undefended points are large black-edged stars; a thin line
    joins each defended point to its attacked model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    defenses = sorted(d for d in df["defense"].unique() if d != NONE)
    attacks = sorted(df["attack"].unique())
    colors = plt.get_cmap("tab10" if len(defenses) <= 10 else "tab20")
    markers = "osD^vP<>Xph"
    undef = df[df["defense"] == NONE]
    base = {pathlib.PurePath(r).as_posix(): (a, c) for r, a, c in zip(undef["record"], undef["test_asr"], undef["test_acc"])}
    for r in df[df["defense"] != NONE].itertuples():
        parent = pathlib.PurePath(r.record).parent.parent.as_posix()
        if parent in base:
            a, c = base[parent]
            ax.plot([100 * a, 100 * r.test_asr], [100 * c, 100 * r.test_acc], color="0.8", lw=0.6, zorder=1)
    for ai, a in enumerate(attacks):
        mk = markers[ai % len(markers)]
        for di, d in enumerate(defenses):
            s = df[(df["attack"] == a) & (df["defense"] == d)]
            if len(s):
                ax.scatter(100 * s["test_asr"], 100 * s["test_acc"], marker=mk, color=colors(di), s=36, zorder=3,
                           label=d if ai == 0 else None)
        s = undef[undef["attack"] == a]
        if len(s):
            ax.scatter(100 * s["test_asr"], 100 * s["test_acc"], marker="*", s=220, color="gold", edgecolor="black",
                       zorder=2, label="no defense (the attacked model)" if ai == 0 else None)
    # one legend entry per attack marker, so the shapes can be read
    for ai, a in enumerate(attacks):
        ax.scatter([], [], marker=markers[ai % len(markers)], color="0.4", label=f"attack: {a}")
    ax.set_xlabel("attack success rate (ASR), %")
    ax.set_ylabel("clean accuracy (ACC), %")
    ax.set_xlim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("each defense's record against its attacked model (better: up and left)", fontsize=9)
    return _png(fig)




def roc_figure(detector: str, curves: list) -> bytes:
    """One detector's ROC curves, a line per record (label, fpr, tpr, AUROC, TPR at 5 % FPR), the chance diagonal,
    and the 1 % and 5 % false-positive rates marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="#bbb", lw=1, ls=":", label="chance")
    for x in (0.01, 0.05):
        ax.axvline(x, color="#ddd", lw=0.8)
    for label, fpr, tpr, auc, t5 in curves:
        ax.step(fpr, tpr, where="post", lw=1.4, label=f"{label}: AUROC {100 * auc:.1f} %, TPR@5% {100 * t5:.1f} %")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"{detector}: ROC")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)
