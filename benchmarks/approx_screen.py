#!/usr/bin/env python
"""Screen of approximation choices on an UNTRAINED polynomial student (issue #22): one kind of non-linearity
replaced at a time, no distillation.

The exact teacher (a checkpoint folder, or a backbone name) is switched to the CGF softmax (per-head
coefficients calibrated on the calibration pairs unless --no-head-coeffs), its approximated ops' input ranges
are calibrated on --calib MRPC training pairs, and for each config the ops of the named kind(s) are replaced by
the polynomials of the FHE profile with the config's overrides (``surgery.polynomialize`` with ``kinds``).
Every row is measured on the first --dev MRPC dev pairs with the training guard on (inputs clamped into the
intervals: the training form) and off (the exported form): accuracy, agreement with and mean squared logit
error to the CGF model with exact functions (the ``baseline`` row, always included), non-finite logits and the
fraction of approximated inputs outside their intervals. Per replaced op: its levels as exported
(normalisation folded; exp counts its squarings; a Newton LayerNorm ``poly.newton_ln_depth``: ``3 + P``, or
``2 + P + 2*steps`` with steps) and the max absolute / relative error of its fit on its interval (LayerNorm: of 1/sqrt after the Newton steps).

This is not the accuracy of a trained student: distillation recovers much of what an untrained replacement
loses. It tells which single choice breaks the model before any training.

    python benchmarks/approx_screen.py --teacher runs/minilm/teacher/seed42 --calib 256 --dev 256 \\
        --configs exp exp:exp_degree=7,exp_squarings=2 gelu:gelu_degree=31 ln:ln_band=None,newton_steps=1 \\
        -o benchmarks/results/approx_screen.json --label seed42

Config syntax: ``KIND[:key=value,...]`` with KIND one of exp, gelu, ln, tanh, all (every kind) or baseline;
keys are ``cgf_fhe.surgery.FheOptions`` fields, values int, float, true/false, None (e.g. ``ln_band=None``:
the calibrated maximum instead of a quantile) or a word (``ln=frozen``). Rows are added to -o (same label and
config: replaced), written atomically.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cgf_fhe.errors import CgfFheError, UserError

SCREEN_KINDS = ("exp", "gelu", "ln", "tanh")
FIXED_KEYS = ("poly", "kinds")  # set by the config's kind, not by overrides


# ----------------------------------------------------------------------------------------------- configs
def _value(text: str):
    low = text.lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_config(text: str) -> tuple[tuple[str, ...], dict]:
    """``KIND[:key=value,...]`` -> (kinds replaced, overrides). Raises UserError naming the bad token."""
    from cgf_fhe.surgery import FheOptions

    kind, _, rest = text.partition(":")
    if kind == "baseline":
        if rest:
            raise UserError(f"config {text!r}: baseline takes no overrides (it replaces nothing)")
        return (), {}
    if kind not in SCREEN_KINDS + ("all",):
        raise UserError(f"config {text!r}: unknown kind {kind!r}; choose from {', '.join(SCREEN_KINDS)}, all, "
                        "baseline")
    kinds = SCREEN_KINDS if kind == "all" else (kind,)
    names = {f.name for f in dataclasses.fields(FheOptions)} - set(FIXED_KEYS)
    over: dict = {}
    for tok in (rest.split(",") if rest else []):
        key, eq, val = tok.partition("=")
        key = key.strip()
        if not eq or not key or not val.strip():
            raise UserError(f"config {text!r}: token {tok!r} is not key=value")
        if key not in names:
            raise UserError(f"config {text!r}: token {tok!r}: {key!r} is not an FheOptions field "
                            f"(e.g. {', '.join(sorted(names)[:6])}, ...)")
        if key in over:
            raise UserError(f"config {text!r}: token {tok!r} sets {key!r} twice")
        over[key] = _value(val.strip())
    return kinds, over


def options_for(profile: str, kinds: tuple[str, ...], overrides: dict, config: str = ""):
    """The profile's FheOptions restricted to ``kinds`` with ``overrides`` applied as given: a None override
    is kept (``FheOptions.from_profile`` ignores None values, e.g. ``ln_band=None`` = no band)."""
    from cgf_fhe.surgery import FheOptions

    try:
        return dataclasses.replace(FheOptions.from_profile(profile), kinds=kinds, **overrides)
    except (TypeError, ValueError) as exc:
        raise UserError(f"config {config!r}: {exc}") from None


# ----------------------------------------------------------------------------------------------- measuring
def batches_of(ds, tok, batch_size: int) -> list[dict]:
    from cgf_fhe.data import make_loader

    return [dict(b) for b in make_loader(ds, tok, batch_size, False)]


INPUTS = ("input_ids", "token_type_ids", "attention_mask")


@torch.no_grad()
def logits_of(model, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    out, labels = [], []
    model.eval()
    for b in batches:
        out.append(model(**{k: b[k] for k in INPUTS if k in b}).logits.double())
        labels.append(b["labels"])
    return torch.cat(out), torch.cat(labels)


def score(logits: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor | None) -> dict:
    fin = torch.isfinite(logits).all(-1)
    pred = logits.argmax(-1)
    d = {"accuracy": float((pred == labels).double().mean()), "nonfinite": int((~fin).sum())}
    if ref is not None:
        d["agreement"] = float((pred == ref.argmax(-1)).double().mean())
        d["logit_mse"] = float(((logits - ref)[fin] ** 2).mean()) if fin.any() else None
    return d


def op_entry(key: str, m) -> dict:
    """Levels and fit errors of one replaced op, read from its module."""
    from cgf_fhe import poly as P

    a = m.approx
    e = {"key": key, "kind": m.kind, "interval": [float(a.a), float(a.b)], "degree": int(a.degree),
         "squarings": int(a.squarings), "depth_module": int(m.depth)}
    if isinstance(m, P.NewtonLayerNorm):
        e["levels"] = int(m.depth)  # already the prescaled (exported) schedule
        e["newton_steps"] = m.newton_steps
        v = torch.linspace(a.a, a.b, P.GRID, dtype=torch.float64)
        ref = v.rsqrt()
        y = m.invsqrt(v)
        e["max_abs_error"] = float((y - ref).abs().max())
        e["max_rel_error"] = float(m.rel_error())
        e["guess_max_rel_error"] = float(a.max_rel_error)
    else:
        e["levels"] = int(a.depth(prescaled=True))  # as exported: the normalisation rides on the previous layer
        e["max_abs_error"] = float(a.max_error)
        e["max_rel_error"] = float(a.max_rel_error)
    return e


def per_kind(ops: list[dict]) -> tuple[dict, dict, dict]:
    """{op name: levels per layer}, {kind: worst max abs error}, {kind: worst max rel error}."""
    levels: dict = {}
    abs_err: dict = {}
    rel_err: dict = {}
    for e in ops:
        name = e["key"].rsplit(".", 1)[1]
        levels.setdefault(name, []).append(e["levels"])
        k = "ln" if name.startswith("ln") else name
        abs_err[k] = max(abs_err.get(k, 0.0), e["max_abs_error"])
        rel_err[k] = max(rel_err.get(k, 0.0), e["max_rel_error"])
    return levels, abs_err, rel_err


def screen(model, calib: list[dict], dev: list[dict], configs: list[str], profile: str = "lean",
           head_coeffs: bool = True, log=print, on_row=None) -> list[dict]:
    """The rows of the screen (``baseline`` first) for a CGF ``model`` with exact functions (changed in place:
    head coefficients; each config works on a copy). ``on_row(row)`` is called as each row is finished."""
    from cgf_fhe import surgery
    from cgf_fhe.softmax import calibrate_head_coeffs

    parsed = [(c, *parse_config(c)) for c in configs if c != "baseline"]
    for c, kinds, over in parsed:  # every config checked before any work
        options_for(profile, kinds, over, c)
    if surgery.named_approx_modules(model):
        raise UserError("the teacher already has polynomial modules: give an exact model (the screen replaces them)")
    if head_coeffs:
        calibrate_head_coeffs(model, [{k: b[k] for k in INPUTS if k in b} for b in calib])
    ranges = surgery.calibrate(model, calib, progress=False)
    t0 = time.time()
    ref, labels = logits_of(model, dev)
    base = score(ref, labels, ref)
    rows = [{"config": "baseline", "kinds": [], "overrides": {}, "levels": {}, "max_abs_error": {},
             "max_rel_error": {}, "guard_on": base, "guard_off": base, "seconds": round(time.time() - t0, 1),
             "ops": []}]
    log(f"baseline: accuracy {base['accuracy']:.4f}")
    if on_row:
        on_row(rows[0])
    for c, kinds, over in parsed:
        t0 = time.time()
        opts = options_for(profile, kinds, over, c)
        m = copy.deepcopy(model)
        surgery.polynomialize(m, opts, ranges)
        ops = [op_entry(k, mod) for k, mod in surgery.named_approx_modules(m)]
        levels, abs_err, rel_err = per_kind(ops)
        row = {"config": c, "kinds": list(kinds), "overrides": over, "levels": levels, "max_abs_error": abs_err,
               "max_rel_error": rel_err}
        if set(kinds) == set(SCREEN_KINDS):
            row["layer_levels_exported"] = surgery.model_depth(m)["per_layer"]
        for guard in (True, False):
            surgery.set_guard(m, guard)
            surgery.reset_interval_counters(m)
            lg, _ = logits_of(m, dev)
            s = score(lg, labels, ref)
            s["frac_out"] = surgery.interval_report(m)["frac_out"]
            row["guard_on" if guard else "guard_off"] = s
        row["seconds"] = round(time.time() - t0, 1)
        row["ops"] = ops
        rows.append(row)
        if on_row:
            on_row(row)
        on, off = row["guard_on"], row["guard_off"]
        log(f"{c}: levels {levels} | guard on acc {on['accuracy']:.4f} mse {on['logit_mse']} nonfinite "
            f"{on['nonfinite']} | guard off acc {off['accuracy']:.4f} mse {off['logit_mse']} nonfinite "
            f"{off['nonfinite']} | {row['seconds']} s")
    return rows


def _clean(v):
    """JSON without NaN/inf (as null)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def write_rows(path: Path, rows: list[dict], command: str | None) -> dict:
    """Add ``rows`` to the document at ``path`` (rows with the same label and config are replaced), atomically;
    ``command`` (None: the rows belong to the last command already stored) is added to its commands."""
    from cgf_fhe.io import read_json, write_text

    doc = read_json(path) if path.exists() else {}
    new = {(r.get("label"), r["config"]) for r in rows}
    doc["rows"] = [r for r in doc.get("rows", []) if (r.get("label"), r.get("config")) not in new] + rows
    if command is not None:
        doc["command"] = command
        doc["commands"] = doc.get("commands", []) + [command]
    write_text(path, json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--teacher", required=True, help="exact teacher: a checkpoint folder or a backbone name")
    ap.add_argument("--calib", type=int, default=256, help="MRPC training pairs for ranges and head coefficients")
    ap.add_argument("--dev", type=int, default=256, help="first N MRPC dev pairs measured")
    ap.add_argument("--configs", nargs="+", default=["exp", "gelu", "ln", "tanh", "all"],
                    help="KIND[:key=value,...] (KIND: exp gelu ln tanh all baseline); baseline is always included")
    ap.add_argument("--profile", default="lean", help="FHE profile the overrides start from (lean|default)")
    ap.add_argument("--coeff", type=float, default=0.5, help="CGF coefficient before the per-head calibration")
    ap.add_argument("--no-head-coeffs", action="store_true", help="keep the single CGF coefficient")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data-dir", default=os.environ.get("CGF_FHE_DATA_DIR"))
    ap.add_argument("--label", default="", help="a label stored with the rows (e.g. the teacher seed)")
    ap.add_argument("-o", "--output", type=Path)
    a = ap.parse_args(argv)
    command = "python benchmarks/approx_screen.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        from cgf_fhe import surgery
        from cgf_fhe.data import load_mrpc, tokenize_split
        from cgf_fhe.io import check_output_file
        from cgf_fhe.models import resolve_model

        if a.profile not in surgery.PROFILES:
            raise UserError(f"--profile {a.profile!r}: choose from {', '.join(sorted(surgery.PROFILES))}")
        for c in a.configs:
            if c != "baseline":
                options_for(a.profile, *parse_config(c), c)
        if a.calib < 1 or a.dev < 1:
            raise UserError("--calib and --dev must be >= 1")
        if a.output:
            check_output_file(a.output)
        torch.manual_seed(0)
        model, tok, _ = resolve_model(a.teacher, "cgf", a.coeff)
        ds = load_mrpc(a.data_dir)
        calib = batches_of(tokenize_split(ds["train"], tok, a.max_length, a.calib), tok, a.batch_size)
        dev = batches_of(tokenize_split(ds["validation"], tok, a.max_length, a.dev), tok, a.batch_size)
        common = {"label": a.label, "teacher": str(a.teacher), "profile": a.profile,
                  "n_calib": sum(len(b["labels"]) for b in calib), "n_dev": sum(len(b["labels"]) for b in dev),
                  "head_coeffs": not a.no_head_coeffs}
        done: list[dict] = []

        def keep(row):  # each finished row is written at once (a long run interrupted keeps what it measured)
            done.append({**common, **row})
            if a.output:
                write_rows(a.output, done[-1:], command if len(done) == 1 else None)

        screen(model, calib, dev, a.configs, a.profile, not a.no_head_coeffs, log=lambda s: print(s, flush=True),
               on_row=keep)
        if a.output:
            print(f"wrote {len(done)} rows to {a.output}")
    except CgfFheError as e:
        print(f"approx_screen: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
