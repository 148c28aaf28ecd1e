#!/usr/bin/env python
"""Multiplicative depth per encoder layer for each approximation choice (from the forms' stated depths).

    python benchmarks/depth_table.py            # Markdown table on stdout

The stated depths are checked against the exported graphs' depths by tests/test_surgery.py and
tests/test_export.py (fhe_ops.analyze on a tiny student's ONNX); this script only tabulates them.
"""
from cgf_fhe.surgery import depth_table


def main() -> None:
    t = depth_table()
    print(f"Formula: {t['formula']}\n")
    print("| LayerNorm | exp form (degree, squarings) | exp depth | GELU degree | GELU depth | LN depth | depth per layer |")
    print("|---|---|---|---|---|---|---|")
    for r in t["rows"]:
        if r["gelu_degree"] not in (15, 63):
            continue
        if (r["exp_form"], r["exp_degree"], r["exp_squarings"]) not in (("ps", 15, 2), ("ps", 7, 3), ("square", 128, 7)):
            continue
        ln = "frozen" if r["ln"] == "frozen" else f"Newton, {r['newton_steps']} steps"
        print(f"| {ln} | {r['exp_form']} ({r['exp_degree']}, {r['exp_squarings']}) | {r['exp_depth']} | "
              f"{r['gelu_degree']} | {r['gelu_depth']} | {r['ln_depth']} | {r['layer_depth']} |")


if __name__ == "__main__":
    main()
