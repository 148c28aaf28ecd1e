"""CKKS simulation: emulator calibration, emulated dev-set runs, real TenSEAL vs the emulator."""
from __future__ import annotations

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


def emulate(rec: dict, level: str = "###", img: str | None = None) -> list[str]:
    m, p = rec["metrics"], rec["metrics"]["params"]
    n, agree, ratio = m["n_examples"], m["agreement"], m.get("ratio_to_plain")
    rows = [["CKKS", f"N = {p['poly_modulus']}, chain {p['coeff_bits']} ({p.get('level_budget')} levels), scale "
                     f"2^{p['scale_bits']}, {p.get('security')}"],
            ["examples (batches, padded lengths)", f"{n} ({m.get('batches')} batches, {m.get('seq_lens')})"],
            ["accuracy / F1 (emulated CKKS)", f"{num(m['accuracy'])} / {num(m.get('f1'))}"],
            ["accuracy (plain backend, same run)", num(m.get("plain_accuracy"))],
            ["agreement with plain", f"{num(100 * agree, 2)}% ({round(agree * n)}/{n})"],
            ["max / mean logit error", f"{sci(m.get('max_logit_error'))} / {sci(m.get('mean_logit_error'))}"],
            [f"{m.get('refresh_label', 'refresh')}es per inference (all batches)",
             f"{m.get('refreshes')} ({m.get('refresh_operations')} over {m.get('batches')} batches)"],
            ["wall time (total; emulated part; plain part)",
             f"{secs(m.get('seconds'))}; {secs(m.get('backend_seconds'))}; {secs(m.get('plain_seconds'))}"],
            ["emulated / plain time", f"{num(ratio, 2)}x (target <= {EMULATE_MAX_RATIO:g}x: "
                                      f"{'met' if ratio is not None and ratio <= EMULATE_MAX_RATIO else '**NOT met**'})"],
            ["emulated time per example", secs(m.get("seconds_per_example"))],
            ["level mismatches (plan vs emulator)", str(m.get("n_level_mismatches"))],
            ["values past the modulus (overflows)", str(m.get("overflows"))]]
    out = [f"{level} {rec['title']}", "", *code(rec["command"]), cite(rec), "", *table(["metric", "value"], rows), ""]
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
