#!/usr/bin/env python
"""Depth, ct x pt multiplications and refreshes of a 6-layer MiniLM polynomial student per FHE profile (issue #22).

Structure only: the offline all-MiniLM-L6-v2 backbone with the CGF softmax, calibrated on a few MRPC training
batches and polynomialized with each profile, untrained (accuracy is measured by the training runs; depth, op
counts and refreshes depend on the structure and the profile, not on the trained weights). Each student is
exported and read back by `cgf-fhe report` at level budget 14 and 128 tokens.

    python benchmarks/lean_structure.py -o benchmarks/results/lean_structure.json

Run it with an older checkout on PYTHONPATH to get the "before" figures of the same script (the LayerNorm
centring matrix of the code before issue #22 shows up as ~H^2 ct x pt per token and LayerNorm).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path


def _added(layers: list[dict]) -> list[int] | None:
    out, prev = [], 0
    for lay in layers:
        out.append(lay["depth_out"] - prev)
        prev = lay["depth_out"]
    return out or None


def measure(profile: str, data_dir: str | None, batches: int, levels: int, seq: int, overrides: dict) -> dict:
    from cgf_fhe import surgery
    from cgf_fhe.data import load_mrpc, make_loader, tokenize_split
    from cgf_fhe.export.onnx_export import export_model
    from cgf_fhe.export.report import build_report
    from cgf_fhe.models import build_model

    model, tok = build_model("minilm", "cgf", 0.5, seed=0)
    model.eval()
    ds = tokenize_split(load_mrpc(data_dir)["train"], tok, max_length=seq, max_samples=8 * batches)
    ranges = surgery.calibrate(model, make_loader(ds, tok, 8, False), max_batches=batches, progress=False)
    if hasattr(surgery.FheOptions, "from_profile"):
        opts = surgery.FheOptions.from_profile(profile, **overrides)
    else:  # code from before issue #22: only the default choices exist
        if profile != "default":
            raise SystemExit(f"this checkout has no profile {profile!r}")
        opts = surgery.FheOptions(poly="all", **overrides)
    fhe = surgery.polynomialize(model, opts, ranges)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "student.onnx"
        t0 = time.time()
        export_model(model, out, settings={"fhe": fhe, "max_length": seq})
        rep = build_report(out, level_budget=levels, seq_len=seq)
        secs = time.time() - t0
    tot = rep["totals"]
    return {"profile": profile, "options": opts.to_dict(), "total_depth": rep["total_depth"],
            "depth_per_layer": [lay["depth"] for lay in rep.get("layers", [])] or None,
            # how much deeper each layer's output is than the previous one's (they sum to the depth before the
            # head): the report's per-layer depth is the longest chain inside the layer, which also counts chains
            # from inputs that arrive shallower than the layer's deepest input (e.g. a folded LayerNorm's centred
            # rows, whose product with its scalar waits for the scalar)
            "depth_added_per_layer": _added(rep.get("layers", [])),
            "ct_pt_mults": tot["ct_pt_mults"], "ct_ct_mults": tot["ct_ct_mults"], "additions": tot["additions"],
            "rotations": tot["rotations"], "refreshes": rep.get("refreshes_total", rep.get("bootstraps_total")),
            # refresh points count once however many tensors they refresh (reports from before they were grouped
            # counted tensors and have no refreshed_values_total)
            "refreshed_values": rep.get("refreshed_values_total"), "refreshed_ciphertexts": rep.get("refreshed_ciphertexts"),
            "refreshes_lower_bound": rep.get("refreshes_lower_bound"),
            "level_budget": levels, "seq_len": seq, "export_and_report_seconds": round(secs, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", nargs="+", default=["default", "lean"])
    ap.add_argument("--data-dir", default=os.environ.get("CGF_FHE_DATA_DIR"))
    ap.add_argument("--batches", type=int, default=4, help="calibration batches of 8 pairs")
    ap.add_argument("--levels", type=int, default=14)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--label", default="", help="a label stored with the rows (e.g. the commit measured)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                    help="override profile options (integers), e.g. gelu_degree=7 invsqrt_degree=7")
    ap.add_argument("-o", "--output")
    a = ap.parse_args(argv)
    rows = []
    for p in a.profiles:
        overrides = {k: int(v) for k, v in (s.split("=", 1) for s in a.set)}
        r = measure(p, a.data_dir, a.batches, a.levels, a.seq, overrides)
        r["overrides"] = overrides
        r["label"] = a.label
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "options"}), flush=True)
    if a.output:
        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = json.loads(out.read_text()) if out.exists() else {}
        doc.setdefault("commands", [doc["command"]] if "command" in doc else [])
        doc["command"] = "python benchmarks/lean_structure.py " + shlex.join(argv or sys.argv[1:])
        doc["commands"].append(doc["command"])
        doc["rows"] = doc.get("rows", []) + rows
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
