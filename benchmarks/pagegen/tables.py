"""Records whose figures are tables (recovered sections, benchmark tables) or small metric sets."""
from __future__ import annotations

from .fmt import notes, cite, code, num, sci, secs, table


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


def structure(rec: dict, level: str = "###") -> list[str]:
    """A benchmarks/lean_structure.py record: depth per layer, op counts and refreshes per profile and code state."""
    rows, out = rec["metrics"]["rows"], []
    for r in rows:
        over = ", ".join(f"{k} {v}" for k, v in (r.get("overrides") or {}).items())
        per, added = r.get("depth_per_layer") or [], r.get("depth_added_per_layer")
        if r.get("refreshed_values") is None:  # reports from before refresh points: one per refreshed tensor
            refresh = f"{r['refreshes']} (counted per tensor)"
        else:
            refresh = (f"{r['refreshes']} (bound {r['refreshes_lower_bound']}; {r['refreshed_values']} tensors, "
                       f"{num(r['refreshed_ciphertexts'])} ciphertexts)")
        out.append([r.get("label") or "", r["profile"] + (f" ({over})" if over else ""), r["total_depth"],
                    " ".join(str(x) for x in added) + f" (max {max(added)})" if added else "n/a",
                    " ".join(str(x) for x in per) + (f" (max {max(per)})" if per else ""), sci(r["ct_pt_mults"]),
                    sci(r.get("ct_ct_mults")), refresh])
    budget = {(r.get("level_budget"), r.get("seq_len")) for r in rows}
    (L, seq), = budget if len(budget) == 1 else ((None, None),)
    cols = ["code", "profile", "depth", "depth added per encoder layer", "longest chain inside each layer",
            "ct x pt per pass", "ct x ct per pass",
            f"refresh points at L = {L}" if L else "refresh points"]
    lead = [f"{level} {rec['title']}", "", *code(rec["command"]), cite(rec), ""]
    if seq:
        lead += [f"Per pass of {seq} tokens, element packing (`cgf-fhe report`). Depth added per layer: how much "
                 "deeper the layer's output is than the previous layer's (they sum to the depth before the head); "
                 "the report's per-layer depth is the longest chain inside the layer, which also counts chains from "
                 "inputs that arrive shallower than the layer's deepest one. A refresh point refreshes every tensor "
                 "waiting at that moment (one client round trip); rows without a tensor count were measured when "
                 "refreshes were counted per tensor.", ""]
    return [*lead, *table(cols, out), "", *notes(([rec["metrics"]["note"]] if rec["metrics"].get("note") else [])
                                                 + rec.get("notes", []))]


def _screen_guard(g: dict, base_acc: float) -> str:
    mse = g.get("logit_mse")
    pp = 100 * (g["accuracy"] - base_acc)
    return (f"{g['accuracy']:.4f} ({pp:+.1f} pp) / {'n/a' if mse is None else f'{mse:.3g}'} / "
            f"{g.get('nonfinite', 0)}")


def _screen_levels(levels: dict) -> str:
    return "; ".join(f"{op} {v[0]}" if len(set(v)) == 1 else f"{op} {' '.join(str(x) for x in v)}"
                     for op, v in levels.items())


def screen(rec: dict, level: str = "###") -> list[str]:
    """A benchmarks/approx_screen.py record: an UNTRAINED student, one kind of non-linearity replaced at a time."""
    m = rec["metrics"]
    base = next(r for r in m["rows"] if r["config"] == "baseline")
    acc0 = base["guard_off"]["accuracy"]
    out = []
    for r in m["rows"]:
        kind, _, _ = r["config"].partition(":")
        over = ", ".join(f"{k} {v}" for k, v in (r.get("overrides") or {}).items())
        what = "baseline: CGF, exact functions" if kind == "baseline" else kind + (f" ({over})" if over else "")
        layer = r.get("layer_levels_exported")
        at = r.get("max_rel_error_at") or {}
        err = "; ".join(f"{k} {v:.1e}" + (f" ({at[k].rsplit('.', 1)[0]})" if k in at else "")
                        for k, v in (r.get("max_rel_error") or {}).items())
        out.append([what, _screen_levels(r.get("levels") or {}) or "-",
                    " ".join(str(x) for x in layer) if layer else "-", err or "-",
                    _screen_guard(r["guard_on"], acc0), _screen_guard(r["guard_off"], acc0), secs(r.get("seconds"))])
    cols = ["replaced (profile overrides)", "levels per op (as exported)", "levels per encoder layer (all kinds)",
            "max rel. error of the fit", "guard on: accuracy / logit MSE / non-finite",
            "guard off: accuracy / logit MSE / non-finite", "time"]
    lead = [f"{level} {rec['title']}", "", *code(rec["command"]), cite(rec), "",
            f"**Untrained screen, not the accuracy of trained students**: the exact teacher `{m.get('teacher')}` with "
            f"the CGF softmax{' (per-head coefficients)' if m.get('head_coeffs') else ''}, its ranges calibrated on "
            f"{m.get('n_calib')} MRPC training pairs; in each row only the named kind of non-linearity is replaced by "
            f"the polynomial of the `{m.get('profile')}` FHE profile with the overrides shown, without any "
            f"distillation, and the model is measured on the first {m.get('n_dev')} dev pairs. Accuracy (difference "
            "to the baseline row), mean squared logit error to the baseline (finite rows) and non-finite logit rows, "
            "with the training guard on (inputs clamped into the intervals) and off (what is exported). Levels per "
            "op are read from the polynomial modules, with the normalisation folded as in export (exp counts its "
            "squarings; a Newton LayerNorm is 3 + P + 2 per step in records made before 2026-12-03 15:00 UTC, one level less with Newton steps since (the last step absorbs the output product)); the fit error is the worst over layers on each "
            "op's interval, with the op where it is worst (exp: where exp >= 1e-3; LayerNorm: 1/sqrt after the Newton "
            "steps). Training recovers part of what a replacement "
            "loses, so these rows rank choices; the paired accuracies of trained students are in section 2.", ""]
    return [*lead, *table(cols, out), "", *notes(rec.get("notes", []))]
