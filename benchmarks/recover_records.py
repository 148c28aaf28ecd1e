#!/usr/bin/env python
"""One-off: recover run records from the hand-pasted sections of docs/results.md as committed at PAGE_COMMIT.

    python benchmarks/recover_records.py -o records

The runs behind that page are on machines that are gone, so their records are rebuilt from the page's own
figures, section by section, and marked ``"source": "recovered-from-page"`` with the page, commit and section
they come from. Only sections whose figures are complete become records (the recipe candidate `ref-e3`, never
run, does not). The emulator calibration and the polynomial-gradient memory benchmark come from their JSON
files in benchmarks/results/ instead (``"source": "run"``). Prose under a section is kept verbatim in the
record's ``notes``; the seed tables, points and depths are parsed into fields, and the page recomputes means,
standard deviations and paired differences from them (recovered per-seed times were printed to 0.1 min, so
their means can differ from the old page's in the last digit).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pagegen.records import SCHEMA, write_record  # noqa: E402

PAGE, PAGE_COMMIT = "docs/results.md", "6433f5f"
RETRAINED = ("poly6-newton-ecover-e4", "poly6-newton-ecover-swap", "poly6-newton-ecover-lr3e5",
             "poly6-newton-ecover-lr1e4", "poly6-newton-ecover-attn", "poly6-newton-ecover-heads",
             "poly6-newton-from-cgf", "poly6-newton-ecover-ce1", "poly6-newton-ecover-sblend", "kd-exact-control",
             "cgf-kd-e1", "cgf-kd-e1-heads-clr", "poly6-newton-ecover-heads-clr", "poly6-newton-from-cgf-clr",
             "poly6-frozen-ecover-heads-clr", "poly6-frozenattn-ecover-heads-clr", "cgf-kd-retrained")
# where a hand-added table took a seed's figures when no cgf_fhe.json existed (from the sections' prose)
READ_FROM = {"poly6-newton-ecover-e4": "train_state", "poly6-newton-ecover-heads": "train_state",
             "poly6-newton-ecover-ce1": "train_state", "poly6-newton-ecover-sblend": "train_state",
             "poly6-newton-ecover-lr1e4": "train_state",
             "poly6-newton-ecover-attn": {42: "train_state", 7: "train_state", 123: "log"},
             "poly6-newton-from-cgf": {42: "train_state", 7: "cgf_fhe.json", 123: "train_state"}}


def page_text(root: Path) -> str:
    return subprocess.run(["git", "show", f"{PAGE_COMMIT}:{PAGE}"], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def sections(text: str) -> list[tuple[str, list[str]]]:
    out, head, body = [], None, []
    for line in text.splitlines():
        if line.startswith("## ") or line.startswith("### "):
            if head is not None:
                out.append((head, body))
            head, body = line.lstrip("#").strip(), []
        elif head is not None:
            body.append(line)
    out.append((head, body))
    return out


def blocks(body: list[str]) -> list[tuple[str, object]]:
    """('code', text) / ('table', (columns, rows)) / ('text', paragraph or bullet)."""
    out, i = [], 0
    while i < len(body):
        ln = body[i]
        if ln.startswith("    "):
            code = []
            while i < len(body) and body[i].startswith("    "):
                code.append(body[i].strip())
                i += 1
            out.append(("code", join_code(code)))
            continue
        if ln.startswith("|"):
            rows = []
            while i < len(body) and body[i].startswith("|"):
                rows.append([c.strip() for c in body[i].strip().strip("|").split("|")])
                i += 1
            out.append(("table", (rows[0], [r for r in rows[2:]])))
            continue
        if ln.strip() and not ln.startswith("!["):  # images are redrawn from the records
            out.append(("text", ln.rstrip()))
        i += 1
    return out


def join_code(lines: list[str]) -> str:
    cmds, cur = [], ""
    for c in lines:
        cur += c.rstrip("\\").rstrip() + (" " if c.endswith("\\") else "")
        if not c.endswith("\\"):
            cmds.append(cur)
            cur = ""
    return "\n".join(cmds)


def num(s: str):
    s = s.strip().strip("*").strip()
    m = re.match(r"^[+-]?\d+(\.\d+)?(e[+-]?\d+)?", s)
    return float(m.group(0)) if m else None


def seconds(s: str):
    m = re.match(r"^([\d.]+) (s|min|h)$", s.strip())
    if not m:
        return None
    return round(float(m.group(1)) * {"s": 1, "min": 60, "h": 3600}[m.group(2)], 3)


def col(header: list[str], *starts: str) -> int | None:
    for i, h in enumerate(header):
        if any(h.startswith(s) for s in starts):
            return i
    return None


def parse_points(cell: str, per_epoch: bool):
    """'0.7892 / 0.7377' (per epoch) or '0.2522: 0.7892 / 0.5: 0.8015 / 1: killed' -> points, complete?"""
    pts, complete = [], True
    for i, part in enumerate(x.strip() for x in cell.split(" / ")):
        if per_epoch:
            pts.append({"at": float(i + 1), "accuracy": num(part), "f1": None})
            continue
        at, _, val = part.partition(": ")
        if num(val) is None:
            complete = False
            continue
        p = {"at": float(at), "accuracy": num(val), "f1": None}
        if "not eligible" in val:
            p["eligible"] = False
        pts.append(p)
    return pts, complete


def seed_runs(header, rows, name, teacher_kind=False):
    c = {k: col(header, *v) for k, v in {
        "acc": ("dev accuracy", "best dev accuracy"), "f1": ("F1",), "teacher": ("teacher accuracy",),
        "diff": ("difference",), "best": ("best epoch", "best at"), "pts": ("dev accuracy per epoch",
                                                                           "dev accuracy at every point"),
        "time": ("time per epoch",), "depth": ("total depth",), "out": ("out-of-interval",),
        "nonfin": ("non-finite dev",), "read": ("read from",)}.items()}
    per_epoch = header[c["pts"]] == "dev accuracy per epoch"
    runs = []
    for r in rows:
        if not r[0].isdigit():
            continue
        seed = int(r[0])
        pts, complete = parse_points(r[c["pts"]], per_epoch)
        read = "cgf_fhe.json"
        rf = READ_FROM.get(name)
        if isinstance(rf, dict):
            read = rf[seed]
        elif rf:
            read = rf
        if c["read"] is not None:
            read = r[c["read"]].split(" ")[0]
        run = {"seed": seed, "status": "finished" if read == "cgf_fhe.json" else "stopped", "read_from": read,
               "n_dev": 408, "points": pts,
               "chosen": {"at": num(r[c["best"]]), "accuracy": num(r[c["acc"]]), "f1": num(r[c["f1"]])}}
        if not complete or "lower bound" in (r[c["diff"]] if c["diff"] is not None else ""):
            run["lower_bound"] = True
            if read == "log":
                run["status"] = "killed" if "killed" in r[c["pts"]] else "stopped"
        if not teacher_kind:
            run["teacher"] = {"accuracy": num(r[c["teacher"]]), "f1": None}
        if c["time"] is not None:
            run["seconds_per_epoch"] = seconds(r[c["time"]])
        if c["depth"] is not None and num(r[c["depth"]]) is not None:
            run["depth"] = {"total": int(num(r[c["depth"]])), "per_layer": None}
        if c["out"] is not None and num(r[c["out"]]) is not None:
            run["frac_out"] = num(r[c["out"]])
        if c["nonfin"] is not None:
            a, _, b = r[c["nonfin"]].partition("/")
            run["nonfinite"], run["n_dev"] = int(a), int(b)
        runs.append(run)
    return runs


GENERATED = (re.compile(r"^- depth per layer \(seed (\d+)\): (\[.*\])$"),
             re.compile(r"^- seed (\d+), dev accuracy at every evaluation point \(epochs trained: accuracy\) (.*?); "
                        r"best at"),
             re.compile(r"^Paired difference to the teacher \(accuracy\):"),
             re.compile(r"^- seeds [\d, ]+( \(missing [\d, ]+\))?$"),
             re.compile(r"^Pooled with `poly6-newton-ecover-heads-clr` \(the same flags"))  # the page pools itself


def base(name, kind, title, section, command, notes):
    return {"schema": SCHEMA, "name": name, "kind": kind, "title": title, "source": "recovered-from-page",
            "recovered_from": {"page": PAGE, "commit": PAGE_COMMIT, "section": section},
            "command": command, "created": None, "machine": None, "packages": None, "notes": notes}


def student(head, body, name=None, title=None):
    m = re.match(r"^`([^`]+)`: (.*)$", head)
    name, title = name or m.group(1), title or m.group(2)
    bl = blocks(body)
    cmd = next((b for k, b in bl if k == "code" and b.startswith(("cgf-fhe distill", "cgf-fhe cover"))), "")
    tab = next(b for k, b in bl if k == "table" and b[0][0] == "seed")
    runs = seed_runs(*tab, name)
    by = {r["seed"]: r for r in runs}
    notes = []
    for k, b in bl:
        if k != "text":
            continue
        g = [rx.match(b) for rx in GENERATED]
        if g[0]:
            if int(g[0].group(1)) in by and by[int(g[0].group(1))].get("depth"):
                by[int(g[0].group(1))]["depth"]["per_layer"] = json.loads(g[0].group(2))
            continue
        if g[1]:
            by[int(g[1].group(1))]["points"] = [{"at": float(a), "accuracy": float(v), "f1": None} for a, v in
                                                (x.split(": ") for x in g[1].group(2).split(", "))]
            continue
        if g[2] or g[3] or g[4]:
            continue
        wm = re.match(r"^- seed (\d+), epoch cover: intervals widened per epoch ([\d / ]+);", b)
        if wm:
            by[int(wm.group(1))]["epoch_cover_widened"] = [int(x) for x in wm.group(2).split(" / ")]
        notes.append(b)
    rec = base(name, "student", title, head, cmd, notes)
    rec["teacher"] = "teacher-fresh" if name.endswith("-fresh") else (
        "teacher-retrained" if name in RETRAINED else "teacher")
    rec["seeds"] = [r["seed"] for r in runs]
    rec["runs"] = runs
    return rec


def teacher(name, title, head, body):
    bl = blocks(body)
    cmd = next(b for k, b in bl if k == "code")
    tab = next(b for k, b in bl if k == "table")
    rec = base(name, "teacher", title, head, cmd, [b for k, b in bl if k == "text" and not b.startswith("Seeds:")])
    rec["runs"] = seed_runs(*tab, name, teacher_kind=True)
    rec["seeds"] = [r["seed"] for r in rec["runs"]]
    return rec


def tables_record(name, kind, title, head, body, command=None, metrics=None):
    bl = blocks(body)
    cmds = [b for k, b in bl if k == "code"]
    rec = base(name, kind, title, head, command if command is not None else "\n".join(cmds),
               [b for k, b in bl if k == "text"])
    rec["tables"] = [{"columns": b[0], "rows": b[1]} for k, b in bl if k == "table"]
    if metrics:
        rec["metrics"] = metrics
    return rec


def search(head, body):
    bl = blocks(body)
    header, rows = next(b for k, b in bl if k == "table")
    cmds = next(b for k, b in bl if k == "code").split("\n")
    notes = [b for k, b in bl if k == "text"]
    out = []
    for r in rows:
        cand = r[0].strip("`")
        if r[1].startswith("not run"):
            continue
        cmd = next(c for c in cmds if c.endswith("/" + cand))
        pts, _ = parse_points(r[2], True)
        run = {"seed": 42, "status": "finished", "read_from": "cgf_fhe.json", "n_dev": 408, "points": pts,
               "chosen": {"at": float(r[5]), "accuracy": num(r[3]), "f1": num(r[4])},
               "seconds_per_epoch": seconds(r[6])}
        rec = base(f"search-{cand}", "search", r[1], head, cmd, [n for n in notes if f"`{cand}`" in n])
        rec.update({"candidate": cand, "seeds": [42], "runs": [run]})
        out.append(rec)
    return out


def export_metrics(items: list[str]) -> dict:
    g = re.search(r"graph: ([\d,]+) nodes, ([\d,]+) on ciphertexts \((.*?)\); depth (\d+); `check`: (OK)?", items[0])
    p = re.search(r"parity \(onnxruntime vs torch, (\d+) dev examples, max length (\d+)\): max \|logit diff\| (\S+), "
                  r"mean (\S+), agreement ([\d.]+)% \(accuracy torch (\S+), onnx (\S+)\); (.+)$", items[1])
    ops = {k: int(v) for k, v in (x.split(" x") for x in g.group(3).split(", "))}
    return {"nodes": int(g.group(1).replace(",", "")), "encrypted_nodes": int(g.group(2).replace(",", "")),
            "encrypted_op_types": ops, "depth": int(g.group(4)), "ok": bool(g.group(5)),
            "n_examples": int(p.group(1)), "max_length": int(p.group(2)), "max_abs_logit_diff": float(p.group(3)),
            "mean_abs_logit_diff": float(p.group(4)), "agreement": float(p.group(5)) / 100,
            "torch_accuracy": float(p.group(6)), "onnx_accuracy": float(p.group(7)), "seconds": seconds(p.group(8))}


def sim_metrics(rows: list[list[str]], error_line: str | None) -> dict:
    v = {r[0]: r[1] for r in rows}
    ck = re.match(r"N = (\d+), chain (\[.*?\]) \((\d+) levels\), scale 2\^(\d+), (.*)$", v["CKKS"])
    ex = re.match(r"(\d+) \((\d+) batches, (\[.*\])\)", v["examples (batches, padded lengths)"])
    acc, f1 = v["accuracy / F1 (emulated CKKS)"].split(" / ")
    mx, mn = v["max / mean logit error"].split(" / ")
    rf = re.match(r"(\d+) \((\d+) over", v["client-aided refreshes per inference (all batches)"])
    wt = v["wall time (total; emulated part; plain part)"].split("; ")
    m = {"params": {"poly_modulus": int(ck.group(1)), "coeff_bits": json.loads(ck.group(2)),
                    "level_budget": int(ck.group(3)), "scale_bits": int(ck.group(4)), "security": ck.group(5)},
         "backend": "emulate", "n_examples": int(ex.group(1)), "batches": int(ex.group(2)),
         "seq_lens": json.loads(ex.group(3)), "accuracy": float(acc), "f1": float(f1),
         "plain_accuracy": float(v["accuracy (plain backend, same run)"]),
         "agreement": float(v["agreement with plain"].split("%")[0]) / 100,
         "max_logit_error": float(mx), "mean_logit_error": float(mn), "refresh_label": "client-aided refresh",
         "refreshes": int(rf.group(1)), "refresh_operations": int(rf.group(2)), "seconds": seconds(wt[0]),
         "backend_seconds": seconds(wt[1]), "plain_seconds": seconds(wt[2]),
         "ratio_to_plain": num(v["emulated / plain time"]),
         "seconds_per_example": seconds(v["emulated time per example"]),
         "n_level_mismatches": int(v["level mismatches (plan vs emulator)"]),
         "overflows": int(v["values past the modulus (overflows)"])}
    if error_line:
        m["error_per_layer"] = [{"layer": x.group(1), "max_abs_error": float(x.group(2)),
                                 "mean_abs_error": float(x.group(3))}
                                for x in re.finditer(r"(\w+): max (\S+), mean ([\d.]+e[+-]\d+)", error_line)]
    return m


def recover(root: Path) -> list[dict]:
    secs = sections(page_text(root))
    recs: list[dict] = []
    for head, body in secs:
        bl = blocks(body)
        texts = [b for k, b in bl if k == "text"]
        if head.startswith("Recipe search"):
            recs += search(head, body)
        elif head == "Teacher seed set":
            recs.append(teacher("teacher", "MiniLM teacher, the chosen recipe, seeds 42 7 123", head, body))
            recs.append({**base("teacher-retrained", "teacher", "MiniLM teacher retrained 2026-11-29 with the same "
                                "command (the teachers of the students run from 2026-11-29 on)", head,
                                recs[-1]["command"],
                                [t for t in texts if False]),
                         "seeds": [42, 7, 123],
                         "runs": [{"seed": s, "status": "finished", "read_from": "cgf_fhe.json", "n_dev": 408,
                                   "points": [],
                                   "chosen": {"at": None, "accuracy": a, "f1": None}}
                                  for s, a in ((42, 0.8186), (7, 0.8039), (123, 0.8137))]})
            recs[-1]["recovered_from"]["section"] = "`poly6-newton-ecover-e4` (its second paragraph)"
        elif head.startswith("Teacher with selection on held-out"):
            recs.append(tables_record("teacher-holdout10", "table", head, head, body))
        elif head.startswith("Fresh teacher seeds"):
            recs.append(teacher("teacher-fresh", "MiniLM teacher, the same recipe on fresh seeds 1 2 3 (for the "
                                "confirmation run)", head, body))
        elif head.startswith("`cgf-kd`"):
            cut = next(i for i, ln in enumerate(body) if ln.startswith("**Retrained on"))
            recs.append(student(head, body[:cut]))
            recs.append(student(head, body[cut:], "cgf-kd-retrained",
                                "CGF + KD retrained 2026-11-30 against the retrained teachers (stage 1 of "
                                "`poly6-newton-from-cgf`)"))
            recs[-1]["command"] = recs[-2]["command"]
        elif head.startswith("`poly6-frozen`"):
            cut = next(i for i, ln in enumerate(body) if ln.startswith("| seed |"))
            probe = tables_record("frozen-ln-probe", "table", "Frozen LayerNorm probe on the CGF + KD student (seed "
                                  "42): variance outliers and swapping every LayerNorm for frozen statistics",
                                  head + " (the probe)", body[:cut])
            probe["command"] = next(c for c in probe["command"].split("\n") if "frozen_ln_probe" in c)
            recs.append(probe)
            recs.append(student(head, body[:4] + body[cut:]))
        elif head.startswith("`poly6-frozen-ecover-heads-clr`"):
            m = re.match(r"^`([^`]+)`: (.*)$", head)
            tab = next(b for k, b in bl if k == "table")
            rec = base(m.group(1), "student", m.group(2), head, next(b for k, b in bl if k == "code"), texts)
            rec["teacher"] = "teacher-retrained"
            rec["seeds"] = [int(r[0]) for r in tab[1]]
            rec["runs"] = [{"seed": int(r[0]), "status": "diverged", "read_from": "train_state/diverged.json",
                            "points": [{"at": 0.2522, "accuracy": 0.3162, "f1": None}], "chosen": None,
                            "diverged": {"step": int(r[1]), "at": float(r[2]), "blend": float(r[3]), "loss": "nan",
                                         "parts": {"kl": "nan", "mse": "nan"}}} for r in tab[1]]
            recs.append(rec)
        elif head.startswith("`") and any(k == "table" and b[0][0] == "seed" for k, b in bl):
            recs.append(student(head, body))
        elif head.startswith("Test suite"):
            cut = next(i for i, ln in enumerate(body) if ln.startswith("Smoke run"))
            recs.append(tables_record("test-suite", "table", "Test suite (2026-11-25)", head, body[:cut],
                                      command="python -m pytest -q tests"))
            recs.append(tables_record("smoke", "table", "Smoke pipeline (tiny random-init BERT, end to end)", head,
                                      body[cut:], command="cgf-fhe pipeline --preset smoke -o runs/smoke",
                                      metrics={"wall_seconds": 20.4}))
        elif head.startswith("Main job"):
            recs.append(tables_record("mrpc-minilm", "table", "README main job: `pipeline --preset mrpc-minilm`",
                                      head, body))
        elif head.startswith("Depth per encoder layer"):
            recs.append(tables_record("depth-table", "table", "Depth per encoder layer for each approximation "
                                      "choice (stated depths)", head, body))
        elif head.startswith("`minilm/") or head.startswith("`narrow/student2"):
            path = head.strip("`")
            items = [t[2:] for t in texts if t.startswith("- ")]
            cmd = next(b for k, b in bl if k == "code")
            rec = base("export-" + Path(path).stem, "export", f"`{path}`", head, cmd,
                       [t for t in texts if not t.startswith("- ")])
            rec["metrics"] = export_metrics(items)
            recs.append(rec)
        elif head.startswith("Depth report:"):
            m = re.match(r"Depth report: `(\w+)`", head)
            recs.append(tables_record(f"report-{m.group(1)}", "report", head, head,
                                      [ln for ln in body if not ln.startswith("![")]))
        elif head.startswith("Emulated CKKS on the MRPC dev set"):
            m = re.match(r".*: `([\w-]+)`", head)
            tab = next(b for k, b in bl if k == "table")
            err = next((t for t in texts if t.startswith("Error of the hidden state")), None)
            rec = base(f"emulate-{m.group(1)}", "simulate", f"Emulated CKKS on the MRPC dev set: `{m.group(1)}`",
                       head, next(b for k, b in bl if k == "code"), [t for t in texts if t != err])
            rec["metrics"] = sim_metrics(tab[1], err)
            recs.append(rec)
        elif head.startswith("Real TenSEAL vs the emulator"):
            cmds = next(b for k, b in bl if k == "code").split("\n")
            tab = next(b for k, b in bl if k == "table")
            for r, cmd in zip(tab[1], cmds):
                backend = r[0].split(" ")[0]
                ck = re.match(r"N = (\d+), chain (\[.*?\]), 2\^(\d+)", r[6])
                rec = base(f"narrow-{backend}", "simulate", f"narrow student (`narrow/student2-h64.onnx`), "
                           f"{r[0]}", head, cmd, texts if backend == "tenseal" else [])
                rec["metrics"] = {"backend": backend, "n_examples": int(r[1]), "accuracy": float(r[2]),
                                  "agreement": float(r[3].rstrip("%")) / 100, "max_logit_error": float(r[4]),
                                  "refreshes": int(r[5].split(" ")[0]), "refresh_label": "client-aided refresh",
                                  "params": {"poly_modulus": int(ck.group(1)), "coeff_bits": json.loads(ck.group(2)),
                                             "scale_bits": int(ck.group(3))},
                                  "seconds_per_example": seconds(r[7]), "seconds": seconds(r[8]), "max_length": 8}
                if backend == "tenseal":
                    rec["metrics"]["prediction_agreement"] = {"with": "narrow-emulate", "agreement": 1.0,
                                                              "n": 408, "n_agree": 408}
                recs.append(rec)
    recs += from_results_json(root)
    return recs


def from_results_json(root: Path) -> list[dict]:
    out = []
    res = root / "benchmarks" / "results"
    for p in sorted(res.glob("emulator_calibration_*.json")):
        d = json.loads(p.read_text())
        pr = d["params"]
        cmd = (f"python benchmarks/emulator_calibration.py --poly-modulus {pr['poly_modulus']} --coeff-bits "
               f"{','.join(map(str, pr['coeff_bits']))} --scale-bits {pr['scale_bits']} -o {p.relative_to(root)}")
        keep = ("primitive", "tenseal_std", "ratio", "noise_ratio", "tenseal_ms_per_op")
        out.append({"schema": SCHEMA, "name": p.stem.replace("_", "-"), "kind": "calibration",
                    "title": f"Emulator vs TenSEAL per primitive, N={pr['poly_modulus']} {pr['coeff_bits']}, "
                             f"2^{pr['scale_bits']}", "source": "run", "read_from": str(p.relative_to(root)),
                    "command": cmd, "created": None, "machine": None, "packages": None, "notes": [],
                    "metrics": {"params": {k: pr[k] for k in ("poly_modulus", "coeff_bits", "scale_bits")},
                                "rows": [{k: r.get(k) for k in keep} for r in d["rows"]]}})
    d = json.loads((res / "poly_grad_memory.json").read_text())
    out.append({"schema": SCHEMA, "name": "poly-grad-memory", "kind": "table",
                "title": "Training memory and time: derivative backward of the polynomials", "source": "run",
                "read_from": "benchmarks/results/poly_grad_memory.json", "command": d["command"], "created": None,
                "machine": None, "packages": None, "notes": [],
                "metrics": {k: d[k] for k in ("schedule", "derivative", "ratio", "max_rel_grad_diff")}})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=HERE.parent / "records")
    a = ap.parse_args(argv)
    recs = recover(HERE.parent)
    names = [r["name"] for r in recs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"recover_records: duplicate record names {sorted(dup)}")
    for r in recs:
        write_record(a.output / f"{r['name']}.json", r)
    print(f"wrote {len(recs)} records to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
