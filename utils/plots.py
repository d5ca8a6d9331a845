"""The pictures records carry: trigger.png (clean vs poisoned), curves.png (ACC / ASR / RA), and a detector's score
histogram with its threshold."""
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _show(ax, img):
    a = img.float().cpu()
    if a.max() > 1.5 and a.dtype != float:  # uint8 scale
        a = a / 255
    a = a.clamp(0, 1)  # display only; never applied to model inputs
    if a.shape[0] == 1:
        ax.imshow(a[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(a.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def trigger_figure(clean, poisoned, labels_clean, labels_poisoned, title="") -> bytes:
    """Two rows: clean images with their labels, the same images poisoned with their attack labels."""
    n = len(clean)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for i in range(n):
        _show(axes[0, i], clean[i])
        axes[0, i].set_title(f"clean: {int(labels_clean[i])}", fontsize=8)
        _show(axes[1, i], poisoned[i])
        axes[1, i].set_title(f"poisoned -> {int(labels_poisoned[i])}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def curves_figure(rows, title="", series=(("test_acc", "ACC"), ("test_asr", "ASR"), ("test_ra", "RA")),
                  dashed=()) -> bytes:
    """ACC / ASR / RA over epochs; `dashed`: (key, label) series a method adds (PDB's raw model)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, name in series:
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None and r.get(key) == r.get(key)]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=name)
    for key, name in dashed:
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), ls="--", marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def score_histogram(groups: dict, outline=None, threshold=None, title="", xlabel="score", outline_label="calibration",
                    bins=60) -> bytes:
    """Filled histograms of each group's values (densities, shared bins), an outline group (a detector's
    calibration data) and the detector's threshold as a vertical line."""
    import torch
    every = torch.cat([torch.as_tensor(v).double().flatten() for v in [*groups.values(), *([outline] if outline
                                                                                        is not None else [])]])
    lo, hi = every.min().item(), every.max().item()
    edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1).numpy()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, v in groups.items():
        ax.hist(torch.as_tensor(v).double().numpy(), bins=edges, density=True, alpha=0.55, label=name)
    if outline is not None:
        ax.hist(torch.as_tensor(outline).double().numpy(), bins=edges, density=True, histtype="step", color="k",
                label=outline_label)
    if threshold is not None:
        ax.axvline(threshold, color="r", ls="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _png(fig)
