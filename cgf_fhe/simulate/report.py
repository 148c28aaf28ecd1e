"""simulation.json / simulation.md / error_per_layer.png from a simulation summary."""
from __future__ import annotations

import math
from pathlib import Path


def _num(v, fmt=".4g"):
    if v is None:
        return "n/a"
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return format(v, fmt)


def _jsonable(obj):
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def plural(label: str) -> str:
    return label + ("es" if label.endswith("refresh") else "s")


def markdown(s: dict) -> str:
    label = s.get("refresh_label", "refresh")
    p = s.get("params") or {}
    lines = [f"# Encrypted simulation: `{s['backend']}` backend", ""]
    if s.get("warnings"):
        lines += [f"> **{w}**" for w in s["warnings"]] + [""]
    lines += [
        f"- model: `{s.get('onnx', '?')}`", f"- examples: {s['n_examples']} MRPC dev (batches {s.get('batches')}, "
        f"padded lengths {s.get('seq_lens')}, workers {s.get('workers')})",
    ]
    if p:
        lines.append(f"- CKKS: N={p['poly_modulus']}, chain {p['coeff_bits']} (log Q {p['log_q']}, "
                     f"{p['level_budget']} levels), scale 2^{p['scale_bits']}, security: {p['security']}")
    lines += [
        f"- multiplicative depth of the graph: {s.get('total_depth')}; level budget {s.get('level_budget')}",
        f"- **{plural(label)} per inference: {s['refreshes']}** ({s.get('refresh_operations', 0)} {label} "
        "operations over all batches)", "",
        "| metric | value |", "|---|---|",
        f"| accuracy ({s['backend']}) | {_num(s['accuracy'])} |",
        f"| F1 ({s['backend']}) | {_num(s['f1'])} |",
        f"| accuracy (plain) | {_num(s['plain_accuracy'])} |",
        f"| F1 (plain) | {_num(s.get('plain_f1'))} |",
        f"| prediction agreement with plain | {_num(100 * s['agreement'], '.2f')}% |",
        f"| max abs logit error | {_num(s['max_logit_error'])} |",
        f"| mean abs logit error | {_num(s['mean_logit_error'])} |",
        f"| wall time (total) | {_num(s['seconds'], '.1f')} s |",
        f"| {s['backend']} time / example | {_num(s['seconds_per_example'], '.4g')} s |",
        f"| time ratio {s['backend']} / plain | {_num(s.get('ratio_to_plain'), '.3g')} |",
    ]
    if s.get("predicted_min_headroom_bits") is not None:
        lines.append(f"| smallest modulus headroom (predicted from plain) | "
                     f"{_num(s['predicted_min_headroom_bits'], '.2f')} bits |")
    diag = s.get("diagnostics") or {}
    if diag.get("min_headroom_bits") is not None:
        lines.append(f"| smallest modulus headroom (emulated) | {_num(diag['min_headroom_bits'], '.2f')} bits |")
    mism = s.get("level_mismatches") or []
    fewer = [m for m in mism if m.get("kind") == "fewer"]
    if fewer:
        lines.append(f"| values with FEWER levels than planned (op table vs backend disagree) | {len(fewer)} |")
    if len(mism) > len(fewer):
        lines.append(f"| values with more levels than planned (benign: product with an all-zero plaintext "
                     f"returns a fresh encryption of 0) | {len(mism) - len(fewer)} |")
    lines.append("")
    if s.get("error_per_layer"):
        lines += ["## Error per encoder layer (hidden state vs plain, valid tokens)", "",
                  "| layer | value | max abs error | mean abs error |", "|---|---|---|---|"]
        for d in s["error_per_layer"]:
            lines.append(f"| {d['layer']} | `{d['value']}` | {_num(d['max_abs_error'])} | "
                         f"{_num(d['mean_abs_error'])} |")
        lines.append("")
    if s.get("poly_out_of_interval_plain") or s.get("poly_out_of_interval"):
        lines += ["## Polynomial inputs outside their intervals", "",
                  "| group | op | layer | interval | out (plain) | out (backend) | seen | observed range |",
                  "|---|---|---|---|---|---|---|---|"]
        pl, bk = s.get("poly_out_of_interval_plain") or {}, s.get("poly_out_of_interval") or {}
        for k in sorted(set(pl) | set(bk)):
            a = pl.get(k) or bk.get(k)
            b = bk.get(k) or {}
            iv = a.get("interval") or [None, None]
            lines.append(f"| `{k}` | {a.get('op')} | {a.get('layer')} | [{_num(iv[0])}, {_num(iv[1])}] | "
                         f"{pl.get(k, {}).get('n_out', 'n/a')} | {b.get('n_out', 'n/a')} | {a.get('n_seen')} | "
                         f"[{_num(a.get('min'))}, {_num(a.get('max'))}] |")
        lines.append("")
    ops = s.get("op_stats") or {}
    if ops:
        lines += [f"## Backend operations ({s['backend']})", "", "| op | count | total s | ms / op |",
                  "|---|---|---|---|"]
        for k, v in ops.items():
            lines.append(f"| {k} | {v['count']} | {_num(v['seconds'], '.3g')} | {_num(v['ms_per_op'], '.4g')} |")
        lines.append("")
    if s.get("refresh_plan"):
        lines += [f"## {label} positions (encrypted values refreshed right after they are produced)", "",
                  ", ".join(f"`{v}`" for v in s["refresh_plan"]), ""]
    return "\n".join(lines)


def plot_layers(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = s.get("error_per_layer") or []
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if rows:
        xs = [str(d["layer"]) for d in rows]
        mx = [max(d["max_abs_error"], 1e-300) for d in rows]
        mean = [max(d["mean_abs_error"], 1e-300) for d in rows]
        ax.semilogy(xs, mx, "o-", label="max abs error")
        ax.semilogy(xs, mean, "s--", label="mean abs error")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no layer outputs traced", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("after encoder layer")
    ax.set_ylabel("|hidden - plain|")
    ax.set_title(f"{s['backend']}: error growth per layer ({s['n_examples']} ex., "
                 f"{s['refreshes']} {plural(s.get('refresh_label', 'refresh'))})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(summary: dict, out_dir) -> dict[str, Path]:
    from ..io import atomic_write, check_output_dir, write_json, write_text

    out = check_output_dir(out_dir)
    paths = {"json": out / "simulation.json", "md": out / "simulation.md", "png": out / "error_per_layer.png"}
    # the figure and the markdown first, simulation.json (what marks the run as done) last
    atomic_write(paths["png"], lambda tmp: plot_layers(summary, tmp))
    write_text(paths["md"], markdown(summary))
    write_json(paths["json"], _jsonable(summary), sort_keys=False)
    return paths


__all__ = ["write_report", "markdown", "plot_layers"]
