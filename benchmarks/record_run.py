#!/usr/bin/env python
"""Write a run record (records/README.md) from a finished run folder, atomically.

    python benchmarks/record_run.py student runs/minilm/lean --name lean \\
        --command "cgf-fhe distill ... -o runs/minilm/lean" --teacher teacher -o records/lean.json

KIND and what RUN_DIR holds:
  teacher, search, student   seed<S>/cgf_fhe.json per seed (or RUN_DIR/cgf_fhe.json for one seed);
                             a seed that stopped at a non-finite loss has seed<S>/train_state/diverged.json
  simulate                   simulation.json (RUN_DIR may also be the file); a packed SEAL run (--backend seal)
                             also every finished example of RUN_DIR/examples/NNNNN.json (the same run's, by its
                             fingerprint): a later run with more examples re-records the same name with more
  report                     report.json
  export                     <stem>.check.json and <stem>.parity.json (RUN_DIR = <stem>, the .onnx path
                             without its suffix)
  calibration                an emulator_calibration_*.json file
  structure                  a benchmarks/lean_structure.py output (depth, op counts and refreshes per profile)
  screen                     a benchmarks/approx_screen.py output (untrained approximation screen: one kind
                             replaced at a time; rows of one --label, see --label)
Only figures go into the record (a few KB); checkpoints, ONNX files and per-node reports stay in the runs folder.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cgf_fhe.errors import CgfFheError, DataError, UserError  # noqa: E402
from cgf_fhe.io import read_json  # noqa: E402
from pagegen.records import SCHEMA, machine, package_versions, write_record  # noqa: E402

SIM_KEYS = ("n_examples", "batches", "seq_lens", "accuracy", "f1", "plain_accuracy", "agreement", "max_logit_error",
            "mean_logit_error", "refresh_label", "refreshes", "refresh_operations", "seconds", "backend_seconds",
            "plain_seconds", "ratio_to_plain", "seconds_per_example", "n_level_mismatches", "backend", "max_length")
STRUCTURE_KEYS = ("label", "profile", "overrides", "total_depth", "depth_per_layer", "depth_added_per_layer",
                  "ct_pt_mults", "ct_ct_mults",
                  "additions", "refreshes", "refreshed_values", "refreshed_ciphertexts", "refreshes_lower_bound",
                  "level_budget", "seq_len")
SCREEN_KEYS = ("config", "kinds", "overrides", "levels", "layer_levels_exported", "max_abs_error", "max_rel_error",
               "guard_on", "guard_off", "seconds")
SCREEN_COMMON = ("teacher", "profile", "n_calib", "n_dev", "head_coeffs")
REPORT_KEYS = ("total_depth", "bootstraps_total", "bootstraps_lower_bound", "latency_seconds", "latency_per_example_seconds", "level_budget",
               "seq_len")


SEAL_COUNTS = ("mul_pt", "mul_ct", "rotate", "level_match", "refresh", "add", "rescale", "encode")


def _sig(v, digits: int = 4):
    """A measured float to ``digits`` significant digits (records hold figures, not float noise)."""
    return None if v is None else float(f"{float(v):.{digits}g}")


def _argmax(logits) -> int:
    row = logits[0] if logits and isinstance(logits[0], list) else logits
    return max(range(len(row)), key=lambda i: row[i])


def _seal_layers(measured: list[dict], estimated: list[dict]) -> list[dict]:
    """Per layer: seconds and operation counts of the SEAL pass with the dry run's estimates beside them."""
    est = {str(r.get("layer")): r for r in estimated}
    out = []
    for r in measured:
        e = est.get(str(r.get("layer")), {})
        out.append({"layer": r.get("layer"), "seconds": _sig(r.get("seconds")),
                    "estimated_seconds": _sig(r.get("estimated_seconds")),
                    "counts": {k: r[k] for k in SEAL_COUNTS if k in r},
                    "estimated_counts": {k: e[k] for k in SEAL_COUNTS if k in e}})
    return out


def seal_example(d: dict, where: Path) -> dict:
    """One finished example of a packed SEAL run (DIR/examples/NNNNN.json) -> its record entry."""
    try:
        se, dry = d["seal"], d["seal"]["dry_run"]
        logits, plain = d["logits"], d["plain_logits"]
        err = max(abs(a - b) for ra, rb in zip(logits, plain) for a, b in zip(ra, rb))
        ex = {"index": d["index"], "tokens": (dry.get("layout") or {}).get("tokens", d.get("seq_len")),
              "seconds": _sig(d["seconds"], 6), "estimated_seconds": _sig(dry["estimated_seconds"], 6),
              "peak_rss_bytes": se.get("peak_rss_bytes"), "estimated_peak_bytes": dry.get("estimated_peak_bytes"),
              "refreshes": d.get("refreshes"), "max_logit_error": _sig(err), "label": (d.get("labels") or [None])[0],
              "prediction": _argmax(logits), "plain_prediction": _argmax(plain),
              "layers": _seal_layers(se.get("layers") or [], dry.get("layers") or [])}
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise DataError(f"{where}: not a finished seal example ({type(e).__name__} {e})") from None
    cmp = se.get("compare_emulator")
    if cmp:
        ex["emulator_std_ratio"] = {str(r["layer"]): _sig(r.get("std_ratio")) for r in cmp}
    return ex


def _far_from_one(r) -> float:
    return abs(math.log(r)) if r and r > 0 else math.inf


def seal_aggregate(examples: list[dict]) -> dict:
    n = len(examples)
    agree = sum(e["prediction"] == e["plain_prediction"] for e in examples)
    labelled = [e for e in examples if e.get("label") is not None]
    ratios = [(r, e["index"], layer) for e in examples for layer, r in (e.get("emulator_std_ratio") or {}).items()
              if r is not None]
    worst = max(ratios, key=lambda t: _far_from_one(t[0]), default=None)
    over = [e["seconds"] / e["estimated_seconds"] for e in examples if e.get("estimated_seconds")]
    rss = [e["peak_rss_bytes"] for e in examples if e.get("peak_rss_bytes") is not None]
    return {"n_examples": n, "agreement": agree / n, "n_agree": agree,
            "accuracy": (sum(e["prediction"] == e["label"] for e in labelled) / len(labelled) if labelled else None),
            "max_logit_error": max(e["max_logit_error"] for e in examples),
            "worst_std_ratio": ({"ratio": worst[0], "example": worst[1], "layer": worst[2]} if worst else None),
            "median_seconds_over_estimate": _sig(statistics.median(over)) if over else None,
            "median_seconds": _sig(statistics.median(e["seconds"] for e in examples), 6),
            "total_seconds": _sig(sum(e["seconds"] for e in examples), 6),
            "max_peak_rss_bytes": max(rss) if rss else None}


def seal_record(run_dir: Path, fingerprint: str | None) -> dict | None:
    """Every finished example of a packed SEAL run folder (the run whose fingerprint simulation.json carries)
    and their aggregate; None when the folder has no examples/."""
    folder = (run_dir.parent if run_dir.suffix == ".json" else run_dir) / "examples"
    files = sorted(folder.glob("[0-9]*.json")) if folder.is_dir() else []
    if not files:
        return None
    docs = [(f, read_json(f, DataError)) for f in files]
    keep = [(f, d) for f, d in docs if fingerprint is None or d.get("fingerprint") == fingerprint]
    if not keep:
        raise DataError(f"{folder}: none of the {len(docs)} examples is from the run of simulation.json "
                        f"(fingerprint {fingerprint})")
    examples = sorted((seal_example(d, f) for f, d in keep), key=lambda e: e["index"])
    out = {"examples": examples, "aggregate": seal_aggregate(examples)}
    shas = {d.get("model_sha256") for _f, d in keep} - {None}
    if len(shas) == 1:
        out["model_sha256"] = shas.pop()
    out["_files"] = [f for f, _d in keep]  # for --keep-examples; not written into the record
    if len(keep) < len(docs):
        out["examples_of_other_runs"] = len(docs) - len(keep)  # other model or parameters: left out
    return out


def keep_examples(files: list[Path], dest: Path) -> None:
    """Copy finished example files into ``dest`` atomically (an existing file with other bytes is an error: a
    kept example is never overwritten by another run's)."""
    import os
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = dest / f.name
        if target.is_file():
            if target.read_bytes() != f.read_bytes():
                raise UserError(f"--keep-examples: {target} exists with other contents than {f}; not overwritten")
            continue
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.copyfile(f, tmp)
        os.replace(tmp, target)


def _metric(d: dict | None) -> dict | None:
    if not isinstance(d, dict) or d.get("accuracy") is None:
        return None
    return {"accuracy": d.get("accuracy"), "f1": d.get("f1")}


def seed_run(s: dict, teacher: dict | None) -> dict:
    """One seed's entry from its cgf_fhe.json."""
    points = []
    for h in s.get("history") or []:
        for m in h.get("mid_evals") or []:
            points.append({"at": float(m["at"]), **(_metric(m.get("dev")) or {"accuracy": None, "f1": None})})
        points.append({"at": float(h["epoch"]), **(_metric(h.get("dev")) or {"accuracy": None, "f1": None})})
    at = s.get("best_at", s.get("best_epoch"))
    dev = s.get("dev") or {}
    depth = (s.get("fhe") or {}).get("depth") or {}
    ec = (s.get("fhe") or {}).get("epoch_cover")
    run = {"seed": int(s["seed"]), "status": "finished" if s.get("status") == "done" else "stopped",
           "read_from": "cgf_fhe.json", "points": points,
           "chosen": ({"at": float(at) if at is not None else None, **_metric(dev)} if _metric(dev) else None),
           "teacher": _metric(s.get("teacher_dev")) or teacher,
           "seconds_per_epoch": s.get("seconds_per_epoch"),
           "depth": ({"total": depth.get("total"), "per_layer": depth.get("per_layer")} if depth else None),
           "frac_out": (s.get("interval_report") or {}).get("frac_out"),
           "nonfinite": (s.get("dev_final") or dev).get("n_nonfinite"), "n_dev": dev.get("n")}
    if ec:
        run["epoch_cover_widened"] = [len(e.get("widened") or []) for e in ec]
    return run


def diverged_run(seed: int, d: dict) -> dict:
    return {"seed": seed, "status": "diverged", "read_from": "train_state/diverged.json", "points": [],
            "chosen": None, "diverged": {k: d.get(k) for k in ("step", "at", "blend", "loss", "parts")}}


def seed_dirs(run_dir: Path) -> list[Path]:
    if (run_dir / "cgf_fhe.json").is_file():
        return [run_dir]
    dirs = sorted(p for p in run_dir.glob("seed*") if p.is_dir())
    if not dirs:
        raise DataError(f"{run_dir}: no cgf_fhe.json and no seed<S>/ folders")
    return dirs


def training_record(kind: str, run_dir: Path, teacher_dir: Path | None) -> dict:
    runs, first = [], None
    for d in seed_dirs(run_dir):
        f, dv = d / "cgf_fhe.json", d / "train_state" / "diverged.json"
        if f.is_file():
            s = read_json(f)
            first = first or s
            teacher = None
            if teacher_dir is not None:
                tdirs = {p.name: p for p in seed_dirs(teacher_dir)}
                tf = tdirs.get(f"seed{s['seed']}", teacher_dir) / "cgf_fhe.json"
                teacher = _metric(read_json(tf).get("dev")) if tf.is_file() else None
            runs.append(seed_run(s, None if kind == "teacher" else teacher))
        elif dv.is_file():
            seed = int(d.name[4:]) if d.name.startswith("seed") else int(read_json(dv).get("seed"))
            runs.append(diverged_run(seed, read_json(dv)))
        else:
            raise DataError(f"{d}: neither cgf_fhe.json nor train_state/diverged.json (run not finished?)")
    rec = {"seeds": [r["seed"] for r in runs], "runs": runs}
    if first:
        rec["settings"] = {k: first.get(k) for k in ("recipe", "kd", "coeff", "softmax", "fhe_options", "layer_map")
                           if first.get(k) is not None}
    return rec


def seed_order(command: str, seeds: list[int]) -> list[int]:
    """The order of --seeds in the command line (how the page lists them), else ascending."""
    m = re.search(r"--seeds((?: \d+)+)", command)
    given = [int(x) for x in m.group(1).split()] if m else []
    return [s for s in given if s in seeds] + sorted(s for s in seeds if s not in given)


def build(kind: str, run_dir: Path, teacher_dir: Path | None, command: str = "", label: str | None = None) -> dict:
    if kind in ("teacher", "search", "student"):
        rec = training_record(kind, run_dir, teacher_dir)
        order = seed_order(command, rec["seeds"])
        rec["runs"].sort(key=lambda r: order.index(r["seed"]))
        rec["seeds"] = order
        return rec
    if kind == "simulate":
        s = read_json(run_dir if run_dir.suffix == ".json" else run_dir / "simulation.json")
        m = {k: s.get(k) for k in SIM_KEYS if s.get(k) is not None}
        m["params"] = {k: (s.get("params") or {}).get(k) for k in
                       ("poly_modulus", "coeff_bits", "level_budget", "scale_bits", "security")}
        m["overflows"] = (s.get("diagnostics") or {}).get("overflows")
        m["error_per_layer"] = [{k: e.get(k) for k in ("layer", "max_abs_error", "mean_abs_error")}
                                for e in s.get("error_per_layer") or []]
        if s.get("backend") == "seal":
            seal = seal_record(run_dir, s.get("fingerprint"))
            if seal is not None:
                m["seal"] = seal
        return {"metrics": m}
    if kind == "report":
        r = read_json(run_dir if run_dir.suffix == ".json" else run_dir / "report.json")
        m = {k: r.get(k) for k in REPORT_KEYS if r.get(k) is not None}
        m["levels_per_group"] = {**{f"layer {x['index']}": x.get("depth") for x in r.get("layers") or []},
                                 **{g["name"]: g.get("depth") for g in r.get("head") or [] if g.get("encrypted_nodes")}}
        m["bootstraps_per_group"] = {**{f"layer {x['index']}": x.get("bootstraps") for x in r.get("layers") or []},
                                     **{g["name"]: g.get("bootstraps") for g in r.get("head") or []
                                        if g.get("encrypted_nodes")}}
        return {"metrics": m}
    if kind == "export":
        chk, par = read_json(Path(f"{run_dir}.check.json")), read_json(Path(f"{run_dir}.parity.json"))
        m = {k: chk.get(k) for k in ("nodes", "encrypted_nodes", "depth", "ok", "encrypted_op_types")}
        m.update({k: par.get(k) for k in ("n_examples", "max_length", "max_abs_logit_diff", "mean_abs_logit_diff",
                                          "agreement", "torch_accuracy", "onnx_accuracy", "seconds")})
        return {"metrics": m}
    if kind == "calibration":
        d = read_json(run_dir)
        return {"metrics": {"params": d.get("params"), "rows": d.get("rows")}}
    if kind == "structure":
        d = read_json(run_dir)
        rows = d.get("rows")
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{run_dir}: no 'rows' list (is it a benchmarks/lean_structure.py output?)")
        missing = [k for k in ("profile", "total_depth", "ct_pt_mults", "refreshes") if any(k not in r for r in rows)]
        if missing:
            raise DataError(f"{run_dir}: a row lacks '{missing[0]}' (is it a benchmarks/lean_structure.py output?)")
        out = {"metrics": {"rows": [{k: r.get(k) for k in STRUCTURE_KEYS} for r in rows]}}
        if d.get("note"):
            out["metrics"]["note"] = d["note"]
        return out
    if kind == "screen":
        return screen_record(read_json(run_dir), run_dir, label)
    raise UserError(f"unknown kind '{kind}'")


def _sig_tree(v):
    """Every float of a nested dict/list to 4 significant digits."""
    if isinstance(v, float):
        return _sig(v)
    if isinstance(v, dict):
        return {k: _sig_tree(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_sig_tree(x) for x in v]
    return v


def screen_record(d: dict, where: Path, label: str | None) -> dict:
    """The rows of one label of a benchmarks/approx_screen.py output (without the per-op detail); the settings
    all rows share (teacher, profile, calibration and dev sizes) once."""
    rows = d.get("rows") if isinstance(d, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{where}: no 'rows' list (is it a benchmarks/approx_screen.py output?)")
    labels = sorted({str(r.get("label", "")) for r in rows})
    if label is None and len(labels) > 1:
        raise DataError(f"{where}: rows of several labels ({', '.join(labels)}): pick one with --label")
    rows = [r for r in rows if label is None or str(r.get("label", "")) == label]
    if not rows:
        raise DataError(f"{where}: no row has label {label!r} (labels: {', '.join(labels)})")
    missing = [k for k in ("config", "guard_on", "guard_off", "levels") if any(k not in r for r in rows)]
    if missing:
        raise DataError(f"{where}: a row lacks '{missing[0]}' (is it a benchmarks/approx_screen.py output?)")
    if not any(r["config"] == "baseline" for r in rows):
        raise DataError(f"{where}: no baseline row (the CGF model with exact functions every MSE is measured to)")
    common = {k: rows[0].get(k) for k in SCREEN_COMMON}
    differ = [k for k in SCREEN_COMMON if any(r.get(k) != common[k] for r in rows)]
    if differ:
        raise DataError(f"{where}: the rows differ in '{differ[0]}': record one run (one --label) at a time")
    out = []
    for r in rows:
        o = _sig_tree({k: r[k] for k in SCREEN_KEYS if k in r})
        worst: dict = {}  # per kind, the op of the worst relative fit error (e.g. layer 0's wide exp interval)
        for e in r.get("ops") or []:
            k = "ln" if e["kind"].startswith("ln") else e["kind"]
            if e.get("max_rel_error") is not None and e["max_rel_error"] >= worst.get(k, (-1.0, ""))[0]:
                worst[k] = (e["max_rel_error"], e["key"])
        if worst:
            o["max_rel_error_at"] = {k: v[1] for k, v in worst.items()}
        out.append(o)
    return {"metrics": {"label": rows[0].get("label", ""), **common, "rows": out}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("kind", choices=("teacher", "search", "student", "simulate", "report", "export", "calibration",
                                     "structure", "screen"))
    ap.add_argument("run_dir", type=Path, help="the run folder (or file) the figures are read from")
    ap.add_argument("--name", required=True, help="record name = file name without .json (e.g. lean)")
    ap.add_argument("--command", required=True, help="the command line that made the run, as it should be shown")
    ap.add_argument("--title", help="one-line description shown on the page (default: the name)")
    ap.add_argument("--teacher", help="student records: name of the teacher record its seeds pair with")
    ap.add_argument("--teacher-dir", type=Path, help="teacher seed folders, for students whose cgf_fhe.json "
                    "lacks teacher_dev")
    ap.add_argument("--label", help="screen records: the label of the rows to record (when the file holds several)")
    ap.add_argument("--note", action="append", default=[], help="a sentence shown under the figures (repeatable)")
    ap.add_argument("--keep-examples", type=Path, metavar="DIR",
                    help="simulate records of a packed SEAL run: also copy its finished examples/NNNNN.json "
                         "(full, with the model's sha256) into DIR, e.g. records/seal-examples/NAME, so a later "
                         "session resumes the run: copy them into RUN/examples/ of the re-exported student")
    ap.add_argument("-o", "--output", type=Path, required=True, help="records/<name>.json")
    a = ap.parse_args(argv)
    try:
        if a.output.stem != a.name:
            raise UserError(f"-o {a.output}: the file name must be the record name ({a.name}.json)")
        rec = {"schema": SCHEMA, "name": a.name, "kind": a.kind, "title": a.title or a.name, "source": "run",
               "command": a.command, "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine(), "packages": package_versions()}
        if a.teacher:
            rec["teacher"] = a.teacher
        rec.update(build(a.kind, a.run_dir, a.teacher_dir, a.command, a.label))
        files = (rec.get("metrics") or {}).get("seal", {}).pop("_files", None) if a.kind == "simulate" else None
        if a.keep_examples is not None:
            if not files:
                raise UserError(f"--keep-examples: {a.run_dir} is not a packed SEAL run with finished examples")
            keep_examples(files, a.keep_examples)
            rec["metrics"]["seal"]["examples_kept_in"] = a.keep_examples.as_posix()
        if a.kind in ("structure", "screen"):
            rec["read_from"] = a.run_dir.as_posix()
        rec["notes"] = a.note
        write_record(a.output, rec)
    except CgfFheError as e:
        print(f"record_run: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
