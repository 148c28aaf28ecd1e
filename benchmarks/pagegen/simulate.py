"""CKKS simulation: emulator calibration, emulated dev-set runs, real TenSEAL vs the emulator."""
from __future__ import annotations

import math

from .fmt import notes, cite, code, num, sci, secs, table

EMULATE_MAX_RATIO = 3.0


def calibration(recs: list[dict], max_ratio: float) -> list[str]:
    heads, prims, cells = [], [], {}
    for rec in recs:
        p = rec["metrics"]["params"]
        heads.append(f"N={p['poly_modulus']} {p['coeff_bits']}, 2^{p['scale_bits']}: TenSEAL err std / emulator "
                     "ratio / noise ratio / ms per op")
        for r in rec["metrics"]["rows"]:
            prims.append(r["primitive"]) if r["primitive"] not in prims else None
            cells[(rec["name"], r["primitive"])] = (f"{r['tenseal_std']:.2e} / {r['ratio']:.3f} / "
                                                    f"{r['noise_ratio']:.3f} / {r['tenseal_ms_per_op']:.1f}")
    rows = [[pr] + [cells.get((rec["name"], pr), "n/a") for rec in recs] for pr in prims]
    ratios = [x for rec in recs for r in rec["metrics"]["rows"] for x in (r["ratio"], r["noise_ratio"])]
    ok = all(1 / max_ratio <= x <= max_ratio for x in ratios)
    out = [""]
    for rec in recs:
        out += code(rec["command"])[:-1]
    out += ["", "Records: " + ", ".join(f"[`records/{r['name']}.json`](../records/{r['name']}.json)" for r in recs)
            + " (from the committed `benchmarks/results/*.json`).", "",
            *table(["primitive", *heads], rows), "",
            f"Every ratio (total error and noise part) lies in {min(ratios):.3f}-{max(ratios):.3f} (target: within "
            f"{max_ratio:g}x: {'met' if ok else '**NOT met**'}). error = decrypted - exact; noise = decrypted - "
            "noise-free emulation. The full tables are in `benchmarks/results/*.md`.", ""]
    return out


def _vs_plain(ratio, seal: bool) -> str:
    if seal:  # the emulator's time target does not apply to real CKKS
        return "n/a" if ratio is None else f"{num(ratio, 2)}x"
    return (f"{num(ratio, 2)}x (target <= {EMULATE_MAX_RATIO:g}x: "
            f"{'met' if ratio is not None and ratio <= EMULATE_MAX_RATIO else '**NOT met**'})")


def emulate(rec: dict, level: str = "###", img: str | None = None) -> list[str]:
    """A simulate record. One with ``metrics.seal`` (a packed SEAL run recorded by record_run.py) is labelled as
    real CKKS and has no emulator time target; its examples follow the metrics (:func:`seal_examples`)."""
    m, p = rec["metrics"], rec["metrics"]["params"]
    n, agree, ratio = m["n_examples"], m["agreement"], m.get("ratio_to_plain")
    what = "real CKKS, SEAL packed" if m.get("seal") else "emulated CKKS"
    part = "SEAL" if m.get("seal") else "emulated"
    rows = [["CKKS", f"N = {p['poly_modulus']}, chain {p['coeff_bits']} ({p.get('level_budget')} levels), scale "
                     f"2^{p['scale_bits']}, {p.get('security')}"],
            ["examples (batches, padded lengths)", f"{n} ({m.get('batches')} batches, {m.get('seq_lens')})"],
            [f"accuracy / F1 ({what})", f"{num(m['accuracy'])} / {num(m.get('f1'))}"],
            ["accuracy (plain backend, same run)", num(m.get("plain_accuracy"))],
            ["agreement with plain", f"{num(100 * agree, 2)}% ({round(agree * n)}/{n})"],
            ["max / mean logit error", f"{sci(m.get('max_logit_error'))} / {sci(m.get('mean_logit_error'))}"],
            [f"{m.get('refresh_label', 'refresh')}es per inference (all batches)",
             f"{m.get('refreshes')} ({m.get('refresh_operations')} over {m.get('batches')} batches)"],
            [f"wall time (total; {part} part; plain part)",
             f"{secs(m.get('seconds'))}; {secs(m.get('backend_seconds'))}; {secs(m.get('plain_seconds'))}"],
            [f"{part} / plain time", _vs_plain(ratio, bool(m.get("seal")))],
            [f"{part} time per example", secs(m.get("seconds_per_example"))],
            ["level mismatches (plan vs emulator)", str(m.get("n_level_mismatches"))],
            ["values past the modulus (overflows)", str(m.get("overflows"))]]
    out = [f"{level} {rec['title']}", "", *code(rec["command"]), cite(rec), "", *table(["metric", "value"], rows), ""]
    if m.get("seal"):
        out += seal_examples(m["seal"])
    per = m.get("error_per_layer") or []
    if per:
        out += ["Error of the hidden state after each layer vs plain (valid tokens): "
                + "; ".join(f"{d['layer']}: max {sci(d['max_abs_error'])}, mean {sci(d['mean_abs_error'])}"
                            for d in per) + ".", ""]
    if img:
        out += [f"![error per layer, {rec['name']}]({img})", ""]
    return out + [*notes(rec.get("notes", [])), ""]


def real_vs_emulated(tn: dict, em: dict, level: str = "###") -> list[str]:
    rows = []
    for rec, label in ((tn, "tenseal (real CKKS)"), (em, "emulate")):
        m, p = rec["metrics"], rec["metrics"]["params"]
        rows.append([label, str(m["n_examples"]), num(m["accuracy"]), f"{num(100 * m['agreement'], 2)}%",
                     sci(m["max_logit_error"]), f"{m['refreshes']} ({m['refresh_label']})",
                     f"N = {p['poly_modulus']}, chain {p['coeff_bits']}, 2^{p['scale_bits']}",
                     secs(m["seconds_per_example"]), secs(m["seconds"])])
    return [f"{level} Real TenSEAL vs the emulator: narrow student (`narrow/student2-h64.onnx`)", "",
            *code(tn["command"])[:-1], *code(em["command"]), cite(tn) + " " + cite(em), "",
            *table(["backend", "examples", "accuracy", "agreement with plain", "max logit error", "refreshes per pass",
                    "CKKS", "time per example", "wall time"], rows), "",
            *notes(tn.get("notes", [])), ""]


def _ratio(r) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / 2 ** 30:.1f} GiB"


def seal_examples(se: dict) -> list[str]:
    """A packed SEAL run's finished examples (record_run.py's ``metrics.seal``): their aggregate, one row per
    example, and per layer the measured seconds against the dry run's estimate summed over the examples."""
    a, exs = se["aggregate"], se["examples"]
    w = a.get("worst_std_ratio")
    worst = (f"{_ratio(w['ratio'])} (example {w['example']}, layer {w['layer']})" if w
             else "n/a (run without --compare-emulator)")
    rows = [["finished examples", str(a["n_examples"])],
            ["prediction agreement with plain", f"{num(100 * a['agreement'], 2)}% ({a['n_agree']}/{a['n_examples']})"],
            ["max logit error", sci(a["max_logit_error"])],
            ["emulator / SEAL error std per layer, farthest from 1", worst],
            ["median SEAL time / dry-run estimate", _ratio(a.get("median_seconds_over_estimate"))],
            ["median / total SEAL time", f"{secs(a.get('median_seconds'))} / {secs(a.get('total_seconds'))}"],
            ["peak RSS (most)", _gib(a.get("max_peak_rss_bytes"))]]
    out = ["Every finished example of the run (`examples/`):", "", *table(["aggregate", "value"], rows), ""]
    ex_rows = []
    for e in exs:
        ratios = [r for r in (e.get("emulator_std_ratio") or {}).items() if r[1] is not None]
        far = max(ratios, key=lambda t: abs(math.log(t[1])) if t[1] > 0 else math.inf, default=None)
        est = e.get("estimated_seconds")
        ex_rows.append([str(e["index"]), str(e["tokens"]), secs(e["seconds"]), secs(est),
                        _ratio(e["seconds"] / est if est else None), _gib(e.get("peak_rss_bytes")),
                        sci(e["max_logit_error"]), f"{e['prediction']} ({e['plain_prediction']})",
                        f"{_ratio(far[1])} ({far[0]})" if far else "n/a"])
    out += [*table(["example", "tokens", "SEAL time", "estimate", "time / estimate", "peak RSS", "max logit error",
                    "prediction (plain)", "emulator / SEAL std, farthest (layer)"], ex_rows), ""]
    kinds = (("mul_pt", "ct x pt"), ("mul_ct", "ct x ct"), ("rotate", "rotations"), ("refresh", "refreshed cts"))
    layers: dict[str, dict] = {}
    for e in exs:
        for r in e.get("layers") or []:
            t = layers.setdefault(str(r["layer"]), {"s": 0.0, "est": 0.0, "n": {}, "en": {}})
            t["s"] += r.get("seconds") or 0.0
            t["est"] += r.get("estimated_seconds") or 0.0
            for k, _ in kinds:
                t["n"][k] = t["n"].get(k, 0) + (r.get("counts") or {}).get(k, 0)
                t["en"][k] = t["en"].get(k, 0) + (r.get("estimated_counts") or {}).get(k, 0)
    if layers:
        def cnt(t, k):
            return num(t["n"][k]) + ("" if t["n"][k] == t["en"][k] else f" ({num(t['en'][k])})")

        lrows = [[k, secs(t["s"]), secs(t["est"]), _ratio(t["s"] / t["est"] if t["est"] else None),
                  *[cnt(t, kk) for kk, _ in kinds]] for k, t in layers.items()]
        out += [f"Per layer, summed over the {len(exs)} examples: SEAL time against the dry run's estimate, and "
                "operation counts (the dry run's in parentheses where it differs).", "",
                *table(["layer", "SEAL time", "estimate", "time / estimate", *[h for _, h in kinds]], lrows), ""]
    return out
