"""`cgf-fhe pipeline`: teacher -> polynomial CGF student -> cover -> export -> check -> report -> simulate.

Each stage is the stage's own CLI command run in-process with arguments derived from one config (YAML or
TOML). Stages are resumable: a stage whose ``RUN_DIR/.stages/<stage>.json`` records the same arguments and
whose outputs exist is skipped. The whole resolved config is written to ``RUN_DIR/config.yaml``; the end of
the run prints a summary table and writes ``RUN_DIR/summary.md`` and ``RUN_DIR/summary.json``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import yaml

from .errors import UserError

PRESETS: dict[str, dict] = {
    # end to end on the random-init tiny model in a few minutes on a 2-core CPU
    "smoke": {
        "model": "tiny",
        "max_length": 32,
        "teacher": {"epochs": 3, "max_train_samples": 512, "max_eval_samples": 128, "seed": 42, "lr": 1e-3},
        # the lean FHE profile (issue #22: 32 levels per layer instead of ~52), its LayerNorm variance penalty on
        "student": {"epochs": 3, "coeff": 0.5, "beta": 10.0, "fhe_profile": "lean", "interval_penalty": 0.1,
                    "student_layers": 1, "max_train_samples": 512, "max_eval_samples": 128, "seed": 42,
                    "margin": 0.5, "epoch_cover": True},
        # widen the intervals the trained student's inputs leave (measured in the training form; see `cover`)
        "cover": {"enabled": True, "max_train_samples": 512, "max_eval_samples": 128},
        "export": {"verify": 16},
        "report": {"levels": [7, 14]},
        "emulate": {"limit": 128},
        # real encryption costs ~1-2 ms per ciphertext op per tensor element: even this 1-layer student at
        # 6 tokens takes ~20 min on 2 cores, so the smoke run leaves it off (`tenseal: {enabled: true}` turns it on)
        "tenseal": {"enabled": False, "limit": 2, "max_length": 6, "poly_modulus": 8192},
    },
    # the real run: MiniLM teacher on full MRPC (the tuned `minilm` recipe), 6-layer polynomial CGF student
    # (Newton LayerNorm; 2 epochs: ~30 min each with one thread per process, see docs/results.md)
    "mrpc-minilm": {
        "model": "minilm",
        "max_length": 128,
        "teacher": {"epochs": 5, "seed": 42, "preset": "minilm"},
        # epoch cover: each epoch is scored in the form that is exported (MiniLM, 3 seeds: -1.31 pp vs the
        # teacher, against -1.96 pp for training without it + `cover` afterwards; docs/results.md)
        # the best measured flags (poly6-newton-ecover-heads-clr in docs/results.md: per-head CGF coefficients
        # trained at lr 0.01, 4 scored points in one epoch); the default FHE profile until the lean one meets the
        # accuracy bar on MiniLM (issue #22)
        "student": {"epochs": 1, "coeff": 0.5, "beta": 10.0, "poly": "all", "ln": "newton", "seed": 42,
                    "epoch_cover": True, "evals_per_epoch": 4, "coeff_per_head": True, "coeff_lr": 0.01},
        # the guard hides inputs drifting out of their intervals during training; unclamped, a Newton LayerNorm
        # past its interval diverges (seed 7: 109/408 NaN dev logits before cover, 0 after; docs/results.md)
        "cover": {"enabled": True},
        "export": {"verify": 408},
        "report": {"levels": [9, 14]},
        # client-aided refreshes, what TenSEAL does (a value past the modulus stops the run with its node named)
        "emulate": {"limit": None, "emulate_refresh": "client"},
        # a 384-wide student under real TenSEAL is ~10^7 ciphertext ops per layer even at 16 tokens (days on
        # 2 cores): off by default; the emulator, validated per primitive against TenSEAL, carries the dev set
        "tenseal": {"enabled": False, "limit": 4, "max_length": 16, "poly_modulus": 16384},
    },
}


def load_config(path: str | None, preset: str | None) -> dict:
    cfg = copy.deepcopy(PRESETS[preset or "smoke"])
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        text = p.read_text()
        try:
            if p.suffix == ".toml":
                import tomllib

                user = tomllib.loads(text)
            else:
                user = yaml.safe_load(text) or {}
        except Exception as exc:
            raise UserError(f"{p}: cannot parse config ({exc})") from None
        if not isinstance(user, dict):
            raise UserError(f"{p}: the config must be a mapping of stage -> options")
        _merge(cfg, user)
    return cfg


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _flags(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif isinstance(v, (list, tuple)):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def _cover_options(cfg: dict) -> dict | None:
    """The ``cover`` stage's flags, or None when the stage is off (no ``cover`` key, or ``enabled: false``)."""
    opts = dict(cfg.get("cover") or {"enabled": False})
    return opts if opts.pop("enabled", True) else None


def stage_plan(cfg: dict, run: Path, data_dir: str | None) -> list[tuple[str, list[str], list[Path]]]:
    """(stage name, cgf-fhe argv, outputs that must exist) for every stage, in order."""
    data = ["--data-dir", data_dir] if data_dir else []
    common = ["--max-length", str(cfg["max_length"])]
    teacher, student, onnx_path = run / "teacher", run / "student", run / "student.onnx"
    covered = run / "student-cover"
    t_opts = dict(cfg["teacher"])
    s_opts = dict(cfg["student"])
    c_opts = _cover_options(cfg)
    tenseal = dict(cfg["tenseal"])
    levels = cfg["report"]["levels"]
    plan = [
        ("teacher", ["finetune", "--model", cfg["model"], "--softmax", "exact", *common, *data, *_flags(t_opts),
                     "-o", str(teacher)], [teacher / "cgf_fhe.json"]),
        ("student", ["distill", "--model", cfg["model"], "--teacher", str(teacher), *common, *data, *_flags(s_opts),
                     "-o", str(student)], [student / "cgf_fhe.json"]),
    ]
    if c_opts is not None:
        plan.append(("cover", ["cover", str(student), "-o", str(covered), *data, *_flags(c_opts), "--no-progress"],
                     [covered / "cgf_fhe.json"]))
    exported = covered if c_opts is not None else student
    plan += [
        ("export", ["export", str(exported), "-o", str(onnx_path), *data, *_flags(cfg["export"])], [onnx_path]),
        ("check", ["check", str(onnx_path), "--format", "json"], []),
    ]
    for lv in levels:
        plan.append((f"report-L{lv}", ["report", str(onnx_path), "--levels", str(lv), "--seq-len",
                                        str(cfg["max_length"]), "-o", str(run / f"report-L{lv}")],
                     [run / f"report-L{lv}" / "report.json"]))
    emulate = {"max_length": cfg["max_length"], **cfg["emulate"]}  # same truncation as training unless set
    plan.append(("emulate", ["simulate", str(onnx_path), "--backend", "emulate", *data, *_flags(emulate),
                             "-o", str(run / "emulate")], [run / "emulate" / "simulation.json"]))
    if tenseal.pop("enabled", True):
        plan.append(("tenseal", ["simulate", str(onnx_path), "--backend", "tenseal", *data, *_flags(tenseal),
                                 "-o", str(run / "tenseal")], [run / "tenseal" / "simulation.json"]))
    return plan


def run_pipeline(cfg: dict, run_dir: str | Path, data_dir: str | None = None, only: list[str] | None = None) -> dict:
    from .cli import main as cli_main

    run = Path(run_dir)
    (run / ".stages").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    timings = {}
    upstream_ran = False  # once a stage reruns, every later stage reruns (its inputs changed)
    for name, argv, outputs in stage_plan(cfg, run, data_dir):
        if only and name not in only:
            continue
        stamp = run / ".stages" / f"{name}.json"
        digest = hashlib.sha256(json.dumps(argv).encode()).hexdigest()
        fresh = stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == digest
        if fresh and not upstream_ran and all(o.exists() for o in outputs):
            print(f"[pipeline] {name}: up to date, skipped")
            timings[name] = json.loads(stamp.read_text()).get("seconds")
            continue
        upstream_ran = True
        stamp.unlink(missing_ok=True)
        print(f"[pipeline] {name}: cgf-fhe {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = cli_main(argv)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise UserError(f"stage {name!r} failed with exit code {rc} (command: cgf-fhe {' '.join(argv)})")
        missing = [str(o) for o in outputs if not o.exists()]
        if missing:
            raise UserError(f"stage {name!r} finished but did not write {missing}")
        stamp.write_text(json.dumps({"sha256": digest, "argv": argv, "seconds": dt}))
        timings[name] = dt
    summary = summarize(run, cfg, timings)
    return summary


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def summarize(run: Path, cfg: dict, timings: dict) -> dict:
    teacher = _read(run / "teacher" / "cgf_fhe.json").get("dev", {})
    student = _read(run / "student" / "cgf_fhe.json").get("dev", {})
    covered = _read(run / "student-cover" / "cgf_fhe.json") if _cover_options(cfg) is not None else {}
    cover_info = covered.get("cover") or {}
    emul = _read(run / "emulate" / "simulation.json")
    ten = _read(run / "tenseal" / "simulation.json")
    reports = {lv: _read(run / f"report-L{lv}" / "report.json") for lv in cfg["report"]["levels"]}
    rows = [
        ("teacher (exact softmax), plaintext", teacher.get("accuracy"), teacher.get("f1"), None, timings.get("teacher")),
        ("student (CGF, polynomial), plaintext", student.get("accuracy"), student.get("f1"), None, timings.get("student")),
        ("student after cover (exported), plaintext", covered.get("dev", {}).get("accuracy"),
         covered.get("dev", {}).get("f1"), None, timings.get("cover")),
        ("student, ONNX plain backend", emul.get("plain_accuracy"), None, emul.get("n_examples"), None),
        ("student, emulated CKKS", emul.get("accuracy"), emul.get("f1"), emul.get("n_examples"), emul.get("seconds")),
        ("student, TenSEAL CKKS (real)", ten.get("accuracy"), ten.get("f1"), ten.get("n_examples"), ten.get("seconds")),
    ]
    lines = ["# Pipeline summary", "", f"Run directory: `{run}`", "",
             "| stage | accuracy | F1 | examples | seconds |", "|---|---|---|---|---|"]
    fmt = lambda v, p=4: "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in rows:
        lines.append(f"| {r[0]} | {fmt(r[1])} | {fmt(r[2])} | {fmt(r[3])} | {fmt(r[4], 1)} |")
    lines += ["", "| encrypted evaluation | agreement with plaintext | max logit error | refreshes |", "|---|---|---|---|"]
    for label, s in (("emulate", emul), ("tenseal", ten)):
        lines.append(f"| {label} | {fmt(s.get('agreement'))} | {fmt(s.get('max_logit_error'), 6)} | {fmt(s.get('refreshes'))} |")
    lines += ["", "| level budget | total depth | bootstraps / refreshes | estimated latency (s) |", "|---|---|---|---|"]
    for lv, rep in reports.items():
        lat = rep.get("latency_seconds", rep.get("estimated_latency_s"))
        lines.append(f"| {lv} | {fmt(rep.get('total_depth'))} | {fmt(rep.get('bootstraps_total'))} | {fmt(lat, 1)} |")
    text = "\n".join(lines) + "\n"
    (run / "summary.md").write_text(text)
    summary = {"teacher": teacher, "student": student, "emulate": emul, "tenseal": ten,
               "cover": ({"dev": covered.get("dev"), "changed": sorted(cover_info.get("changed", {})),
                          "depth_before": cover_info.get("depth_before"), "depth_after": cover_info.get("depth_after")}
                         if covered else None),
               "reports": {str(k): {kk: v.get(kk) for kk in ("total_depth", "bootstraps_total", "level_budget")}
                           for k, v in reports.items()}, "seconds": timings}
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_table(text)
    return summary


def _print_table(markdown: str) -> None:
    try:
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(markdown))
    except Exception:  # rich missing or no terminal
        print(markdown)


def _cmd(args) -> int:
    if args.config is None and args.preset is None:
        args.preset = "smoke"
    cfg = load_config(args.config, args.preset)
    if args.print_config:
        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    if not args.output:
        raise UserError("-o RUN_DIR is required")
    run_pipeline(cfg, args.output, args.data_dir, args.only)
    return 0


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="train -> distill -> export -> check -> report -> simulate, resumable")
    p.add_argument("--config", help="YAML or TOML file overriding the preset (same keys as RUN_DIR/config.yaml)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="base configuration (default: smoke)")
    p.add_argument("--data-dir", help="MRPC folder of GLUE TSVs (else $CGF_FHE_DATA_DIR, else the hub)")
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("-o", "--output", help="run directory (required unless --print-config)")
    p.set_defaults(func=_cmd)
