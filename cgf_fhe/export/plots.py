"""PNG plots of a report: levels per layer with refresh marks, op counts per stage."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _groups(rep: dict):
    groups = [(f"L{lay['index']}", lay) for lay in rep["layers"]]
    groups += [(g["name"], g) for g in rep["head"] if g["encrypted_nodes"]]
    return groups


def plot_levels(rep: dict, path: str | Path) -> Path:
    """Left: levels consumed per layer (bars) with the number of refreshes marked; right: levels left along the
    critical path (sawtooth: every refresh restores the budget)."""
    groups = _groups(rep)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})
    ax = axes[0]
    names = [n for n, _ in groups]
    depth = [g["depth"] for _, g in groups]
    boots = [g["refreshes"] for _, g in groups]
    ax.bar(names, depth, color="#4C72B0", label="levels consumed")
    for i, b in enumerate(boots):
        if b:
            ax.plot(i, depth[i] + 0.3, marker="v", color="#C44E52", markersize=10)
            ax.annotate(f"{b} refresh{'es' if b > 1 else ''}", (i, depth[i] + 0.3 + 0.07 * max(depth)),
                        ha="center", color="#C44E52", fontsize=8)
    ax.axhline(rep["level_budget"], color="gray", ls="--", lw=1, label=f"budget L={rep['level_budget']}")
    ax.set_ylabel("levels")
    ax.set_title(f"levels per layer (total depth {rep['total_depth']}, {rep['refreshes_total']} {rep['refresh_kind']} refreshes)")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=45)

    ax.set_ylim(0, max(depth + [rep["level_budget"]]) * 1.2 + 1)

    ax = axes[1]
    crit = {c["name"] for c in rep["critical_path"]}
    ys = [n["levels_left"] for n in rep["nodes"] if n["name"] in crit and n["levels_left"] is not None]
    if ys:
        xs = list(range(len(ys)))
        ax.step(xs, ys, where="post", color="#55A868", label="levels left after the node")
        for i in range(1, len(ys)):
            if ys[i] > ys[i - 1]:  # the budget was restored in between: a refresh on this path
                ax.axvline(i - 0.5, color="#C44E52", lw=0.8, alpha=0.7)
                ax.plot(i - 0.5, rep["level_budget"] + 0.3, marker="v", color="#C44E52")
        ax.set_ylim(-0.5, max(rep["level_budget"], 1) + 1)
    ax.set_xlabel("multiplicative nodes along the critical path")
    ax.set_ylabel("levels left")
    ax.set_title("levels along the critical path (red: refresh)")
    fig.tight_layout()
    from ..io import atomic_write

    path = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


def plot_stage_ops(rep: dict, path: str | Path) -> Path:
    """Grouped bars (log scale) of ct-ct / ct-pt mults, additions and rotations per stage, summed over layers."""
    stages = list(rep["stages"]) or [g["name"] for g in rep["head"]]
    src = rep["stages"] if rep["stages"] else {g["name"]: g for g in rep["head"]}
    keys = [("ct_ct_mults", "ct x ct"), ("ct_pt_mults", "ct x pt"), ("additions", "add"), ("rotations", "rotations")]
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(stages)), 4.2))
    w = 0.8 / len(keys)
    for j, (k, label) in enumerate(keys):
        vals = [max(src[s][k], 0) for s in stages]
        ax.bar([i + (j - 1.5) * w for i in range(len(stages))], [v if v > 0 else 0.0 for v in vals], w, label=label)
    ax.set_xticks(range(len(stages)), stages, rotation=30)
    if any(src[s][k] > 0 for s in stages for k, _ in keys):
        ax.set_yscale("log")
    ax.set_ylabel(f"ops per pass ({rep['packing']} packing)")
    ax.set_title("op counts per stage (all layers)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from ..io import atomic_write

    path = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path
