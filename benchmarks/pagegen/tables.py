"""Records whose figures are tables (recovered sections, benchmark tables) or small metric sets."""
from __future__ import annotations

from .fmt import notes, cite, code, num, secs, table


def section(rec: dict, level: str = "###", title: str | None = None) -> list[str]:
    out = [f"{level} {title or rec['title']}", ""]
    if rec.get("command"):
        out += code(rec["command"])
    out += [cite(rec), ""]
    if rec["name"] == "poly-grad-memory":
        out += grad_memory(rec["metrics"])
    for t in rec.get("tables") or []:
        out += [*table(t["columns"], t["rows"]), ""]
    out += notes(rec.get("notes", []))
    return out


def grad_memory(m: dict) -> list[str]:
    rows = [[label, f"{m[k]['peak_rss_mb']:.0f} MB", f"{m[k]['growth_mb']:.0f} MB", secs(m[k]["seconds_per_step"])]
            for label, k in (("autograd through the schedule", "schedule"), ("derivative series (default)",
                                                                              "derivative"))]
    r = m["ratio"]
    return [*table(["backward", "peak RSS", "growth over the loaded model", "time per step"], rows), "",
            f"Ratios measured in one run: peak RSS x{r['peak_rss']:.2f}, time per step x{r['seconds_per_step']:.2f}; "
            f"the two gradients differ by {m['max_rel_grad_diff']:.2e} (relative norm over all parameters, first "
            f"batch). Batch {m['derivative']['batch_size']}, {m['derivative']['steps']} steps per mode.", ""]


def metrics_section(rec: dict, level: str = "###") -> list[str]:
    """A record made by record_run.py with plain metrics (report, export of a new run)."""
    rows = []
    for k, v in rec["metrics"].items():
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        elif isinstance(v, float):
            v = num(v)
        rows.append([k.replace("_", " "), str(v)])
    return [f"{level} {rec['title']}", "", *code(rec["command"]), cite(rec), "", *table(["metric", "value"], rows),
            "", *notes(rec.get("notes", [])), ""]
