"""Teacher seed sets and the teacher recipe search."""
from __future__ import annotations

from .fmt import notes, cite, code, not_run, num, pm, secs, table


def _epochs(r: dict) -> str:
    return " / ".join(num(p["accuracy"]) for p in r.get("points") or []) or "n/a"


def _best(r: dict) -> str:
    at = (r.get("chosen") or {}).get("at")
    return "n/a" if at is None else f"{at:g}"


def section(rec: dict, level: str = "###") -> list[str]:
    runs = [r for r in rec["runs"] if r.get("chosen")]
    rows = [[str(r["seed"]), num(r["chosen"]["accuracy"]), num(r["chosen"].get("f1")), _best(r), _epochs(r),
             secs(r.get("seconds_per_epoch")) if r.get("seconds_per_epoch") else "-"] for r in runs]
    spe = [r.get("seconds_per_epoch") for r in runs]
    rows.append([f"**mean ± std ({len(runs)} seeds)**", f"**{pm([r['chosen']['accuracy'] for r in runs])}**",
                 f"**{pm([r['chosen'].get('f1') for r in runs])}**", "", "",
                 (pm(spe, 0) + " s") if any(spe) else ""])
    return [f"{level} `{rec['name']}`: {rec['title']}", "", *code(rec["command"]), cite(rec), "",
            *table(["seed", "best dev accuracy", "F1", "best epoch", "dev accuracy per epoch", "time per epoch"],
                   rows), "", *notes(rec.get("notes", [])), ""]


def search(recs: dict, specs: list[dict]) -> list[str]:
    """One row per recipe candidate (pages.json 'search'); a candidate without a record says 'not run'."""
    rows, cmds, extra = [], [], []
    for sp in specs:
        rec = recs.get(sp["record"])
        if rec is None:
            rows.append([f"`{sp['candidate']}`", not_run(sp["command"]), "", "", "", "", "", ""])
            cmds.append(sp["command"])
            continue
        r = rec["runs"][0]
        rows.append([f"`{rec['candidate']}`", rec["title"], _epochs(r), num(r["chosen"]["accuracy"]),
                     num(r["chosen"].get("f1")), _best(r), secs(r.get("seconds_per_epoch")),
                     f"[record](../records/{rec['name']}.json)"])
        cmds.append(rec["command"])
        extra += rec.get("notes", [])
    out = [*table(["candidate", "recorded recipe", "dev accuracy per epoch", "best accuracy", "F1", "best epoch",
                   "time per epoch", "record"], rows), "", "Commands:", ""]
    for c in cmds:
        out += code(c)[:-1]
    return out + notes(list(dict.fromkeys(extra)))
