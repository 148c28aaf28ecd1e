"""Student seed sets: per-student sections, the summary table, pooling and paired differences."""
from __future__ import annotations

from cgf_fhe import stats

from .fmt import notes, cite, code, interval, num, pm, sci, secs, signed, table


def finished(rec: dict) -> list[dict]:
    return [r for r in rec["runs"] if r.get("chosen")]


def exact(acc: float | None, n: int | None) -> float | None:
    """An accuracy printed to 4 digits back to correct/n (n = the dev examples: accuracies are counts / n)."""
    return acc if acc is None or not n else round(acc * n) / n


def diffs_pp(rec: dict) -> dict[int, float]:
    """Paired differences student - teacher (accuracy, percentage points) per seed with both figures."""
    out = {}
    for r in finished(rec):
        t = (r.get("teacher") or {}).get("accuracy")
        if t is not None and r["chosen"].get("accuracy") is not None:
            n = r.get("n_dev")
            out[r["seed"]] = 100 * (exact(r["chosen"]["accuracy"], n) - exact(t, n))
    return out


def depths(rec: dict) -> list[int]:
    return sorted({r["depth"]["total"] for r in finished(rec) if (r.get("depth") or {}).get("total") is not None})


def per_layer(rec: dict) -> tuple[int, list[int]] | None:
    for r in rec["runs"]:
        pl = (r.get("depth") or {}).get("per_layer")
        if pl:
            return r["seed"], pl
    return None


def status(rec: dict, spec: dict) -> str:
    """Target status of a student against its paired target (pages.json)."""
    if spec.get("target_pp") is None:
        return "no target (control)"
    div = [r["seed"] for r in rec["runs"] if r.get("status") == "diverged"]
    d = diffs_pp(rec)
    if not d:
        return f"**NOT met**: training diverged (non-finite loss) on seed(s) {', '.join(map(str, div))}"
    mean = stats.mean_std(d.values()).mean
    ok = mean >= -spec["target_pp"]
    if spec.get("informative"):
        return f"informative only ({spec['informative']}): {'within' if ok else 'not within'} {spec['target_pp']:g} pp"
    word = "met" if ok else "**NOT met**"
    lb = [r["seed"] for r in finished(rec) if r.get("lower_bound")]
    extra = []
    if div:
        extra.append(f"training diverged on seed(s) {', '.join(map(str, div))}")
    if lb:
        extra.append(f"seed(s) {', '.join(map(str, lb))} a lower bound (run stopped early)")
    if ok and len(d) > 1 and mean + 1e-9 < -spec["target_pp"] + stats.mean_std(d.values()).std:
        extra.append(f"on the mean by {mean + spec['target_pp']:.2f} pp; std {stats.mean_std(d.values()).std:.2f} pp")
    return word + (f" ({'; '.join(extra)})" if extra else "")


def ends_only(r: dict) -> float | None:
    """The accuracy selection among epoch ends alone would have chosen (None without mid-epoch points)."""
    pts = [p for p in r.get("points") or [] if p.get("accuracy") is not None and p.get("eligible", True)]
    if all(float(p["at"]).is_integer() for p in pts):
        return None
    ends = [p["accuracy"] for p in pts if float(p["at"]).is_integer()]
    return max(ends) if ends else None


def _points(r: dict) -> str:
    pts = " / ".join(f"{p['at']:g}: {num(p['accuracy'])}" + (" (not eligible)" if p.get("eligible") is False else "")
                     for p in r.get("points") or [])
    if r.get("lower_bound"):
        pts += f" / {r.get('status', 'stopped')}"
    return pts or "n/a"


def section(rec: dict, spec: dict | None, level: str = "###") -> list[str]:
    spec = spec or {}
    out = [f"{level} `{rec['name']}`: {rec['title']}", "", *code(rec["command"]), cite(rec)
           + f" Paired with the teacher record `{rec.get('teacher', 'n/a')}` seed by seed.", ""]
    runs = finished(rec)
    d = diffs_pp(rec)
    ends_d = {r["seed"]: 100 * (exact(ends_only(r), r.get("n_dev")) - exact(r["teacher"]["accuracy"], r.get("n_dev")))
              for r in runs if ends_only(r) is not None and (r.get("teacher") or {}).get("accuracy") is not None}
    if runs:
        cols = {"seed": [], "dev accuracy": [], "F1": [], "teacher accuracy": [], "difference (pp)": [],
                "chosen at (epochs)": [], "dev accuracy at every evaluation point (epochs: accuracy)": [],
                "time per epoch": [], "total depth": [], "out-of-interval inputs (dev)": [],
                "non-finite dev logits": [], "epoch ends only (difference, pp)": [], "read from": []}
        for r in runs:
            c = r["chosen"]
            vals = [str(r["seed"]), num(c.get("accuracy")), num(c.get("f1")),
                    num((r.get("teacher") or {}).get("accuracy")),
                    signed(d.get(r["seed"])) + (" (lower bound)" if r.get("lower_bound") else ""),
                    f"{c['at']:g}" if c.get("at") is not None else "n/a", _points(r),
                    secs(r.get("seconds_per_epoch")) if r.get("seconds_per_epoch") else None,
                    str(r["depth"]["total"]) if r.get("depth") else None,
                    sci(r.get("frac_out")) if "frac_out" in r else None,
                    f"{r['nonfinite']}/{r['n_dev']}" if "nonfinite" in r else None,
                    (f"{num(ends_only(r))} ({signed(ends_d[r['seed']])})" if r["seed"] in ends_d else None),
                    r.get("read_from")]
            for k, v in zip(cols, vals):
                cols[k].append(v)
        keep = [k for k, v in cols.items() if any(x is not None for x in v)]
        rows = [[(cols[k][i] if cols[k][i] is not None else "-") for k in keep] for i in range(len(runs))]
        n = len(runs)
        mean = {"seed": f"**mean ± std ({n})**", "dev accuracy": f"**{pm([r['chosen']['accuracy'] for r in runs])}**",
                "F1": pm([r["chosen"].get("f1") for r in runs]),
                "difference (pp)": f"**{pm(d.values(), 2, sign=True)}**",
                "time per epoch": pm([r.get("seconds_per_epoch") for r in runs], 0) + " s"
                if any(r.get("seconds_per_epoch") for r in runs) else "",
                "epoch ends only (difference, pp)": pm(ends_d.values(), 2, sign=True) if ends_d else ""}
        rows.append([mean.get(k, "") for k in keep])
        out += [*table(keep, rows), ""]
    div = [r for r in rec["runs"] if r.get("status") == "diverged"]
    if div:
        out += ["Training stopped at a non-finite loss (`train_state/diverged.json`):", ""]
        out += [*table(["seed", "step", "epoch", "frozen-LN blend", "loss", "loss parts at that step",
                        "last dev point before"],
                       [[str(r["seed"]), str(r["diverged"].get("step")), f"{r['diverged'].get('at'):.4f}",
                         f"{r['diverged'].get('blend'):.3g}", _nan(r["diverged"].get("loss")),
                         ", ".join(f"{k} {_nan(v)}" for k, v in (r["diverged"].get("parts") or {}).items()),
                         (f"{num(r['points'][-1]['accuracy'])} at epoch {r['points'][-1]['at']:g}"
                          if r.get("points") else "none")] for r in div]), ""]
    pl = per_layer(rec)
    if d:
        line = f"Paired difference to the teacher (accuracy): {pm(d.values(), 2, sign=True)} pp over seeds " \
               f"{', '.join(map(str, d))}"
        if len(d) > 1:
            line += f"; standard error {stats.mean_std(d.values()).sem:.2f} pp, 95% t-interval {interval(d.values())} pp"
        line += "."
        if spec.get("target_pp") is not None:
            line += f" Target: within {spec['target_pp']:g} pp of the teacher: {status(rec, spec)}."
        out += [line, ""]
    if pl:
        out += [f"Depth per encoder layer (seed {pl[0]}): {pl[1]}.", ""]
    out += notes(rec.get("notes", []))
    return out


def _nan(v) -> str:
    return {"nan": "NaN", "inf": "Inf", "-inf": "-Inf"}.get(str(v).lower(), str(v)) if v is not None else "n/a"


def summary(recs: dict, specs: list[dict]) -> list[str]:
    rows = []
    for sp in specs:
        rec = recs.get(sp["record"])
        if rec is None:
            rows.append([f"`{sp['record']}`", "0", "n/a", "n/a", "n/a", _target(sp), f"not run: `{sp['command']}`"])
            continue
        runs = finished(rec)
        d = diffs_pp(rec)
        dp = depths(rec)
        rows.append([f"`{rec['name']}`", str(len(runs)), pm([r["chosen"]["accuracy"] for r in runs]),
                     pm(d.values(), 2, sign=True), "/".join(map(str, dp)) or "n/a", _target(sp), status(rec, sp)])
    return table(["student", "seeds", "dev accuracy", "paired difference (pp)", "total depth", "target", "status"],
                 rows)


def _target(sp: dict) -> str:
    return f"{sp['target_pp']:g} pp ({sp.get('issue', '')})".replace(" ()", "") if sp.get("target_pp") is not None \
        else "none"


def pooled(recs: dict, names: list[str]) -> dict | None:
    if any(n not in recs for n in names):
        return None
    p = stats.pool(*(diffs_pp(recs[n]) for n in names))
    ms = stats.mean_std(p.values())
    return {"diffs": p, "ms": ms, "ci": stats.t_interval(list(p.values())),
            "within_1pp": sum(1 for v in p.values() if v >= -1.0)}


def pooled_line(recs: dict, spec: dict) -> list[str]:
    pl = pooled(recs, spec["records"])
    if pl is None:
        return [f"Pooled {' + '.join(spec['records'])}: not all records present.", ""]
    ms, ci = pl["ms"], pl["ci"]
    ok = ms.mean >= -spec["target_pp"]
    return [f"Pooled over {' and '.join(f'`{n}`' for n in spec['records'])}: paired difference "
            f"{pm(pl['diffs'].values(), 2, sign=True)} pp, {ms.n} seeds ({' '.join(map(str, pl['diffs']))}); "
            f"standard error {ms.sem:.2f} pp, 95% t-interval of the mean [{ci[0]:+.2f}, {ci[1]:+.2f}] pp; "
            f"{pl['within_1pp']} of {ms.n} seeds within 1 pp. Target on the pooled mean (within "
            f"{spec['target_pp']:g} pp): {'met' if ok else '**NOT met**'}.", ""]


def _choices(rec: dict) -> str:
    """exp / GELU / LayerNorm choices of a polynomial student, from its recorded FHE options."""
    o = (rec.get("settings") or {}).get("fhe_options") or {}
    if not o:
        return "n/a"
    k = o.get("exp_squarings")
    exp = f"exp {o.get('exp_degree')}" + (f" + {k} sq." if k else " + auto sq." if k is None else "")
    gelu = f"GELU {o.get('gelu_degree')}" + (f" (band, tails x{o['gelu_tail_weight']:g})"
                                              if o.get("gelu_tail_weight") else "")
    steps = o.get("newton_steps")
    ln = f"1/sqrt {o.get('invsqrt_degree')} + {'auto' if steps is None else steps} Newton" \
         + (" (CLS-scaled)" if o.get("ln_cls_scale") else "") \
         + (f" (band {o['ln_band']:g})" if o.get("ln_band") is not None else "")
    return f"{exp}; {gelu}; {ln}"


def ablation(recs: dict, spec: dict) -> list[str]:
    """One table of depth against paired accuracy over student records that differ in one choice each
    (pages.json item ``{"type": "ablation", "title", "rows": [{"record", "what"}], "notes"}``); a row whose
    record is absent says so with its command instead of a figure."""
    rows, cited = [], []
    for row in spec["rows"]:
        rec = recs.get(row["record"])
        if rec is None:
            rows.append([row["what"], "-", "-", "-", "-", "-", "-", f"not run: `{row['command']}`"])
            continue
        cited.append(rec)
        runs = finished(rec)
        d = diffs_pp(rec)
        pl = per_layer(rec)
        acc = " / ".join(f"{num(r['chosen']['accuracy'])} (seed {r['seed']})" for r in runs) or "n/a"
        nonf = " / ".join(f"{r['nonfinite']}" for r in runs if "nonfinite" in r) or "-"
        rows.append([row["what"], _choices(rec), f"{max(pl[1])} ({' '.join(map(str, pl[1]))})" if pl else "n/a",
                     "/".join(map(str, depths(rec))) or "n/a", acc,
                     pm(d.values(), 2, sign=True) if len(d) > 1 else (signed(next(iter(d.values()))) if d else "n/a"),
                     nonf, f"`{rec['name']}`"])
    out = [f"### {spec['title']}", ""]
    for rec in cited:
        out += [f"- `{rec['name']}`: `{rec['command']}`"]
    out += ["", *table(["change from the base row", "exp; GELU; LayerNorm", "depth per encoder layer: max (each)",
                         "total depth", "dev accuracy", "paired difference to the teacher (pp)",
                         "non-finite dev logits", "record"], rows), ""]
    out += notes(spec.get("notes", []))
    return out
