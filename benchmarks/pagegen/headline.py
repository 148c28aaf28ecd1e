"""The answer first: the recommended student in one table."""
from __future__ import annotations

import math

from cgf_fhe import stats

from . import students
from .fmt import not_run, num, pm, secs, table


def section(recs: dict, pages: dict) -> list[str]:
    h = pages["headline"]
    st = recs[h["student"]]
    runs = students.finished(st)
    d = students.diffs_pp(st)
    rows = [["recommended student", f"`{st['name']}`: {st['title']}", _src(st)]]
    rows.append([f"dev accuracy, seeds {' '.join(str(r['seed']) for r in runs)}",
                 f"{pm([r['chosen']['accuracy'] for r in runs])} (teachers {pm([r['teacher']['accuracy'] for r in runs])})",
                 _src(st)])
    diff = f"{pm(d.values(), 2, sign=True)} pp on seeds {' '.join(map(str, d))}"
    srcs = [st]
    conf = recs.get(h["confirmation"])
    if conf:
        dc = students.diffs_pp(conf)
        diff += f"; on fresh seeds {' '.join(map(str, dc))} with fresh teachers {pm(dc.values(), 2, sign=True)} pp"
        pl = students.pooled(recs, [st["name"], conf["name"]])
        diff += (f"; pooled, {pl['ms'].n} seeds: {pm(pl['diffs'].values(), 2, sign=True)} pp, 95% t-interval "
                 f"[{pl['ci'][0]:+.2f}, {pl['ci'][1]:+.2f}] pp, {pl['within_1pp']} of {pl['ms'].n} seeds within 1 pp")
        srcs.append(conf)
    rows.append(["paired difference to the teacher (student - teacher, mean ± sample std)", diff,
                 ", ".join(_src(r) for r in srcs)])
    pl = students.per_layer(st)
    dp = students.depths(st)
    rows.append(["multiplicative depth per encoder layer",
                 f"{pl[1]} (seed {pl[0]}); total {'-'.join(map(str, (dp[0], dp[-1])) if len(dp) > 1 else map(str, dp))} "
                 "over the seeds (the 6 layers plus pooler and classifier)", _src(st)])
    rep = recs.get(h["report_L14"]["record"])
    exp = recs.get(h["export"])
    if rep:
        refreshes = f"{rep['metrics']['bootstraps_total']} bootstraps per pass at L = 14"
    else:
        depth = exp["metrics"]["depth"] if exp else None
        refreshes = not_run(h["report_L14"]["command"]) + (
            f" (lower bound ceil({depth}/14) - 1 = {math.ceil(depth / 14) - 1} for the exported seed's depth {depth})"
            if depth else "")
    rows.append(["refreshes (bootstraps) at L = 14", refreshes, _src(rep) if rep else "no record"])
    em = recs.get(h["emulate"])
    if em:
        m = em["metrics"]
        rows.append(["emulated CKKS on the dev set (the exported seed)",
                     f"agreement with plaintext {num(100 * m['agreement'], 2)}% "
                     f"({round(m['agreement'] * m['n_examples'])}/{m['n_examples']}), accuracy {num(m['accuracy'])}, "
                     f"{m['refreshes']} client-aided refreshes per inference at {m['params']['level_budget']} levels, "
                     f"max logit error {m['max_logit_error']:.2e}", _src(em)])
    tn = recs.get(h["real_ckks"])
    if tn:
        m, pa = tn["metrics"], tn["metrics"]["prediction_agreement"]
        rows.append(["real CKKS (TenSEAL) check",
                     f"on the narrow 2-layer student, not on this one: TenSEAL and the emulator agree on "
                     f"{num(100 * pa['agreement'], 2)}% ({pa['n_agree']}/{pa['n']}) of the predictions "
                     f"({m['max_length']} tokens, N = {m['params']['poly_modulus']}); "
                     f"{secs(m['seconds_per_example'])} per example in TenSEAL", _src(tn)])
    epochs = max((p["at"] for r in runs for p in r.get("points") or []), default=None)
    times = [f"training {secs(stats.mean_std([r['seconds_per_epoch'] for r in runs]).mean)} per epoch"
             + (f" ({epochs:g} epoch{'s' if epochs != 1 else ''})" if epochs else "")]
    if exp:
        times.append(f"export with a {exp['metrics']['n_examples']}-example parity check "
                     f"{secs(exp['metrics']['seconds'])}")
    if em:
        times.append(f"emulated dev set {secs(em['metrics']['seconds'])} "
                     f"({secs(em['metrics']['seconds_per_example'])} per example)")
    rows.append(["wall times", "; ".join(times), ", ".join(_src(r) for r in (st, exp, em) if r)])
    return [*table(["question", "answer", "records"], rows), ""]


def _src(rec: dict) -> str:
    return f"[`{rec['name']}`](../records/{rec['name']}.json)"
