"""The targets from the issues, computed from the records (which targets: records/pages.json 'targets')."""
from __future__ import annotations

from cgf_fhe import stats

from . import students
from .fmt import num, pm, secs, table


def _src(names) -> str:
    return ", ".join(f"[`{n}`](../records/{n}.json)" for n in names)


def rows(recs: dict, pages: dict) -> list[list[str]]:
    specs = {s["record"]: s for s in pages["students"]}
    pools = {p["name"]: p for p in pages.get("pooled", [])}
    out = []
    for t in pages["targets"]:
        typ, name = t["type"], t.get("record")
        rec = recs.get(name) if name else None
        if name and rec is None:
            out.append([t["what"], t["goal"], "not run", "not run", f"`{name}` (no record)"])
            continue
        if typ == "teacher_mean":
            accs = [r["chosen"]["accuracy"] for r in rec["runs"] if r.get("chosen")]
            m = stats.mean_std(accs)
            out.append([t["what"], t["goal"], f"{pm(accs)}, {m.n} seeds",
                        "met" if m.mean >= t["min"] else "**NOT met**", _src([name])])
        elif typ == "student":
            sp = specs[name]
            d = students.diffs_pp(rec)
            meas = (f"{pm(d.values(), 2, sign=True)} pp" + (f", {len(d)} seeds" if len(d) > 1 else "")) if d else "diverged"
            out.append([t["what"], f">= -{sp['target_pp']:g} pp", meas, students.status(rec, sp), _src([name])])
        elif typ == "pooled":
            p = pools[t["name"]]
            pl = students.pooled(recs, p["records"])
            if pl is None:
                out.append([t["what"], t["goal"], "not run", "not run", _src(p["records"])])
                continue
            ok = pl["ms"].mean >= -p["target_pp"]
            out.append([t["what"], f">= -{p['target_pp']:g} pp",
                        f"{pm(pl['diffs'].values(), 2, sign=True)} pp, {pl['ms'].n} seeds "
                        f"({' '.join(map(str, pl['diffs']))}); 95% t-interval [{pl['ci'][0]:+.2f}, {pl['ci'][1]:+.2f}]",
                        "met" if ok else "**NOT met**", _src(p["records"])])
        elif typ == "calibration":
            cal = [recs[n] for n in t["records"] if n in recs]
            ratios = [x for c in cal for r in c["metrics"]["rows"] for x in (r["ratio"], r["noise_ratio"])]
            ok = all(1 / t["max_ratio"] <= x <= t["max_ratio"] for x in ratios)
            out.append([t["what"], t["goal"], f"ratios {min(ratios):.3f}-{max(ratios):.3f} ({len(cal)} parameter sets)",
                        "met" if ok else "**NOT met**", _src(t["records"])])
        elif typ == "emulate_ratio":
            r = rec["metrics"]["ratio_to_plain"]
            out.append([t["what"], t["goal"], f"{num(r, 2)}x", "met" if r <= t["max"] else "**NOT met**",
                        _src([name])])
        elif typ == "prediction_agreement":
            pa = rec["metrics"]["prediction_agreement"]
            out.append([t["what"], t["goal"], f"{num(100 * pa['agreement'], 2)}% ({pa['n_agree']}/{pa['n']})",
                        "met" if pa["agreement"] >= t["min"] else "**NOT met**", _src([name, pa["with"]])])
        elif typ == "wall_time":
            s = rec["metrics"]["wall_seconds"]
            out.append([t["what"], t["goal"], secs(s), "met" if s <= t["max_seconds"] else "**NOT met**",
                        _src([name])])
        else:
            raise ValueError(f"pages.json: unknown target type '{typ}'")
    return out


def section(recs: dict, pages: dict) -> list[str]:
    return [*table(["target", "goal", "measured", "status", "records"], rows(recs, pages)), ""]
