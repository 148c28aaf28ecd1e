#!/usr/bin/env python
"""Multiplicative depth per encoder layer for each approximation choice (from the forms' stated depths).

    python benchmarks/depth_table.py                          # Markdown table on stdout
    python benchmarks/depth_table.py --json runs/depth_table.json   # also the rows as JSON (make_results.py reads it)

The stated depths are checked against the exported graphs' depths by tests/test_surgery.py and
tests/test_export.py (fhe_ops.analyze on a tiny student's ONNX); this script only tabulates them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# the choices shown: GELU degrees and (exp form, degree, squarings)
GELU_DEGREES = (15, 63)
EXP_CHOICES = (("ps", 15, 2), ("ps", 7, 3), ("square", 128, 7))
COLUMNS = ("LayerNorm", "exp form (degree, squarings)", "exp depth", "GELU degree", "GELU depth",
           "LN depth (each; attn + ffn if they differ)",
           "depth per layer")


def table() -> dict:
    """{"formula": str, "rows": [surgery.depth_table row, ...]} restricted to the shown choices."""
    from cgf_fhe.surgery import depth_table

    t = depth_table()
    rows = [r for r in t["rows"] if r["gelu_degree"] in GELU_DEGREES
            and (r["exp_form"], r["exp_degree"], r["exp_squarings"]) in EXP_CHOICES]
    return {"formula": t["formula"], "rows": rows}


def markdown(t: dict) -> str:
    lines = [f"Formula: {t['formula']}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    from cgf_fhe.surgery import ln_cells

    for r in t["rows"]:
        ln, lnd = ln_cells(r)
        lines.append(f"| {ln} | {r['exp_form']} ({r['exp_degree']}, {r['exp_squarings']}) | {r['exp_depth']} | "
                     f"{r['gelu_degree']} | {r['gelu_depth']} | {lnd} | {r['layer_depth']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the table as JSON to this file")
    a = ap.parse_args(argv)
    t = table()
    if a.json:
        p = Path(a.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"command": "python benchmarks/depth_table.py", **t}, indent=2))
    print(markdown(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
