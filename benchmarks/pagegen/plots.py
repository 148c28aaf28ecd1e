"""Plots drawn from records only (matplotlib, Agg backend, no timestamps in the files)."""
from __future__ import annotations

from pathlib import Path

from . import students

META = {"Software": None}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"svg.hashsalt": "cgf-fhe", "font.size": 9})
    return plt


def accuracy_vs_depth(recs: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("tab20")
    for k, rec in enumerate(recs):
        pts = [(r["depth"]["total"], r["chosen"]["accuracy"]) for r in students.finished(rec)
               if (r.get("depth") or {}).get("total") and r["chosen"].get("accuracy") is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, s=10, alpha=0.3, color=cmap(k % 20))
        ax.scatter([sum(xs) / len(xs)], [sum(ys) / len(ys)], s=30, label=rec["name"], color=cmap(k % 20))
    ax.set_xlabel("total multiplicative depth")
    ax.set_ylabel("dev accuracy (MRPC)")
    ax.legend(fontsize=6, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=META)
    plt.close(fig)


def paired_differences(recs: list[dict], target_pp: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(recs) + 1.2))
    lo = -6.0  # the band that matters; seeds further below are drawn at the edge with their value
    for i, rec in enumerate(recs):
        d = list(students.diffs_pp(rec).values())
        ax.scatter([max(v, lo) for v in d], [i] * len(d), s=14, marker="o")
        far = [v for v in d if v < lo]
        if far:
            ax.text(lo + 0.15, i, f"< {', '.join(f'{v:.0f}' for v in far)} pp", va="center", fontsize=6)
        if d and sum(d) / len(d) >= lo:
            ax.plot([sum(d) / len(d)], [i], "k|", markersize=12)
        if not d:
            ax.text(lo + 0.15, i, "no finished seed", va="center", fontsize=6)
    ax.set_xlim(lo - 0.3, 2.0)
    ax.axvline(-target_pp, color="red", lw=0.8, ls="--")
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_yticks(range(len(recs)), [r["name"] for r in recs], fontsize=6)
    ax.set_xlabel("student - teacher dev accuracy, per seed (pp); bar: mean; dashed: target")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=META)
    plt.close(fig)


def error_per_layer(rec: dict, path: Path) -> None:
    plt = _plt()
    per = rec["metrics"]["error_per_layer"]
    fig, ax = plt.subplots(figsize=(5, 3))
    xs = [str(d["layer"]) for d in per]
    ax.semilogy(xs, [d["max_abs_error"] for d in per], "o-", label="max")
    ax.semilogy(xs, [d["mean_abs_error"] for d in per], "s-", label="mean")
    ax.set_xlabel("hidden state after layer")
    ax.set_ylabel("|emulated - plain|")
    ax.set_title(rec["name"], fontsize=8)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=META)
    plt.close(fig)
