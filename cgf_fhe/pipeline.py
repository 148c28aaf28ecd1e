"""`cgf-fhe pipeline`: teacher -> polynomial CGF student -> cover -> export -> check -> report -> simulate.

Each stage is the stage's own CLI command run in-process with arguments derived from one config (YAML or
TOML). The whole config is validated before any stage runs: an unknown key or a stage option the stage's
command does not take is an error naming it.

One top-level ``levels:`` list of level budgets drives both the depth reports (``report-L<L>``) and the
encrypted emulation (``emulate-L<L>``), so every figure of the summary names the budget it was measured at.

Stages are resumable. A stage is skipped only when ``RUN_DIR/.stages/<stage>.json`` records the same key --
its command line, the resolved MRPC data (folder and content hash) and the hash of every input file -- and
every output still has the hash recorded when it was written; a missing, truncated or unreadable stamp means
"run it again", never a traceback. Every file is written atomically (see :mod:`cgf_fhe.io`) and the run
directory is locked while a pipeline writes to it. The resolved config is written to ``RUN_DIR/config.yaml``;
the run ends with a summary table in ``RUN_DIR/summary.md`` and ``RUN_DIR/summary.json``.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import time
from pathlib import Path

from .errors import UserError

PRESETS: dict[str, dict] = {
    # end to end on the random-init tiny model in a few minutes on a 2-core CPU
    "smoke": {
        "model": "tiny",
        "max_length": 32,
        # level budgets (levels of a fresh ciphertext): one depth report and one emulation per budget
        "levels": [7, 14],
        "teacher": {"epochs": 3, "max_train_samples": 512, "max_eval_samples": 128, "seed": 42, "lr": 1e-3},
        # the lean FHE profile (issue #22: 27 levels per exported layer instead of ~47), its LayerNorm variance penalty on
        "student": {"epochs": 3, "coeff": 0.5, "beta": 10.0, "fhe_profile": "lean", "interval_penalty": 0.1,
                    "student_layers": 1, "max_train_samples": 512, "max_eval_samples": 128, "seed": 42,
                    "margin": 0.5, "epoch_cover": True},
        # widen the intervals the trained student's inputs leave (measured in the training form; see `cover`)
        "cover": {"enabled": True, "max_train_samples": 512, "max_eval_samples": 128},
        "export": {"verify": 16},
        "report": {},
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
        "levels": [9, 14],
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
        "report": {},
        # client-aided refreshes, what TenSEAL does (a value past the modulus stops the run with its node named)
        "emulate": {"limit": None, "emulate_refresh": "client"},
        # a 384-wide student under real TenSEAL is ~10^7 ciphertext ops per layer even at 16 tokens (days on
        # 2 cores): off by default; the emulator, validated per primitive against TenSEAL, carries the dev set
        "tenseal": {"enabled": False, "limit": 4, "max_length": 16, "poly_modulus": 16384},
    },
}


# config section -> the `cgf-fhe` command its options become flags of
SECTIONS = {"teacher": "finetune", "student": "distill", "cover": "cover", "export": "export", "report": "report",
            "emulate": "simulate", "tenseal": "simulate"}
TOP_KEYS = ("model", "max_length", "levels", *SECTIONS)
SWITCHES = {"cover": ("enabled",), "tenseal": ("enabled",)}  # keys that are not flags of the command
# flags the pipeline sets itself (a section may not set them: the stages must agree on them)
RESERVED = {
    "teacher": ("model", "softmax", "output", "data_dir", "max_length", "overwrite", "resume"),
    "student": ("model", "teacher", "output", "data_dir", "max_length", "overwrite", "resume"),
    "cover": ("output", "data_dir", "no_progress", "resume"),
    "export": ("output", "data_dir"),
    "report": ("levels", "seq_len", "output", "output_dir", "format"),
    "emulate": ("levels", "backend", "output", "output_dir", "data_dir"),
    "tenseal": ("backend", "output", "output_dir", "data_dir"),
}
DATA_STAGES = ("teacher", "student", "cover", "export", "emulate", "tenseal")  # stages that read MRPC


def load_config(path: str | None, preset: str | None) -> dict:
    """The preset (default smoke) with the config file merged over it, validated as a whole."""
    cfg = copy.deepcopy(PRESETS[preset or "smoke"])
    if path:
        import yaml

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
        if isinstance(user.get("report"), dict) and "levels" in user["report"]:
            raise UserError(f"{p}: report.levels is now the top-level `levels:` list (one list of level budgets "
                            "for both the depth reports and the emulation)")
        _merge(cfg, user)
        try:
            validate_config(cfg)
        except UserError as exc:
            raise UserError(f"{p}: {exc}") from None
    else:
        validate_config(cfg)
    return cfg


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _command_options(command: str) -> set[str]:
    """Option names (``max_length`` for ``--max-length``) the `cgf-fhe COMMAND` parser accepts."""
    from .cli import build_parser

    sub = _subparser(build_parser(), command)
    return {s[2:].replace("-", "_") for s in sub._option_string_actions if s.startswith("--")}


def _subparser(parser, command: str):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def validate_config(cfg: dict) -> None:
    """Refuse a config that would fail (or be silently ignored) in some stage, before any stage runs."""
    for key in cfg:
        if key not in TOP_KEYS:
            raise UserError(f"config: unknown key {key!r}{_suggest(key, TOP_KEYS)}; valid top-level keys: "
                            f"{', '.join(TOP_KEYS)}")
    for key in ("model", "max_length", "levels", "teacher", "student", "export", "emulate", "tenseal"):
        if key not in cfg:
            raise UserError(f"config: {key!r} is missing")
    if not isinstance(cfg["model"], str) or not cfg["model"]:
        raise UserError(f"config: model must be a model name or folder, got {cfg['model']!r}")
    ml = cfg["max_length"]
    if not isinstance(ml, int) or isinstance(ml, bool) or ml < 5:
        raise UserError(f"config: max_length must be an integer >= 5 (a sentence pair), got {ml!r}")
    levels = cfg["levels"]
    if (not isinstance(levels, list) or not levels
            or any(not isinstance(lv, int) or isinstance(lv, bool) or lv < 1 for lv in levels)):
        raise UserError(f"config: levels must be a non-empty list of level budgets (integers >= 1), got {levels!r}")
    if len(set(levels)) != len(levels):
        raise UserError(f"config: levels lists a budget twice: {levels}")
    options: dict[str, set] = {}
    for section, command in SECTIONS.items():
        opts = cfg.get(section)
        if opts is None and section in ("cover", "report"):
            continue
        if not isinstance(opts, dict):
            raise UserError(f"config: {section} must be a mapping of option -> value, got {opts!r}")
        if command not in options:
            options[command] = _command_options(command)
        for key in opts:
            if key in SWITCHES.get(section, ()):
                continue
            if key in RESERVED[section]:
                raise UserError(f"config: {section}.{key} is set by the pipeline itself"
                                + (" (use the top-level `levels:` list)" if key == "levels" else "")
                                + (" (use the top-level `max_length:`)" if key == "max_length" else ""))
            if key not in options[command]:
                valid = sorted(options[command] - set(RESERVED[section]) - {"help"})
                raise UserError(f"config: {section}.{key}: `cgf-fhe {command}` has no option "
                                f"--{key.replace('_', '-')}{_suggest(key, valid)}")
    _parse_every_stage(cfg)


def _parse_every_stage(cfg: dict) -> None:
    """Parse each stage's command line with the real parser (types, choices), naming the stage on failure."""
    import contextlib
    import io as _io

    from .cli import build_parser

    parser = build_parser()
    for name, argv, _, _ in stage_plan(cfg, Path("RUN_DIR"), "DATA_DIR"):
        err = _io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(argv)
        except SystemExit:
            msg = (err.getvalue().strip().splitlines() or ["invalid options"])[-1]
            raise UserError(f"config: stage {name!r}: {msg}") from None


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


def stage_plan(cfg: dict, run: Path, data_dir: str | None) -> list[tuple[str, list[str], list[Path], list[Path]]]:
    """(stage name, cgf-fhe argv, input paths, outputs it must leave) for every stage, in order."""
    data = ["--data-dir", str(data_dir)] if data_dir else []
    common = ["--max-length", str(cfg["max_length"])]
    teacher, student, onnx_path = run / "teacher", run / "student", run / "student.onnx"
    covered = run / "student-cover"
    t_opts = dict(cfg["teacher"])
    s_opts = dict(cfg["student"])
    c_opts = _cover_options(cfg)
    tenseal = dict(cfg["tenseal"])
    # the run directory is the pipeline's own: a stage that reruns replaces its earlier result (--overwrite)
    plan = [
        ("teacher", ["finetune", "--model", cfg["model"], "--softmax", "exact", *common, *data, *_flags(t_opts),
                     "--overwrite", "-o", str(teacher)], [], [teacher]),
        ("student", ["distill", "--model", cfg["model"], "--teacher", str(teacher), *common, *data, *_flags(s_opts),
                     "--overwrite", "-o", str(student)], [teacher], [student]),
    ]
    if c_opts is not None:
        plan.append(("cover", ["cover", str(student), "-o", str(covered), *data, *_flags(c_opts), "--no-progress"],
                     [student], [covered]))
    exported = covered if c_opts is not None else student
    plan += [
        ("export", ["export", str(exported), "-o", str(onnx_path), *data, *_flags(cfg["export"])], [exported],
         [onnx_path]),
        ("check", ["check", str(onnx_path), "--format", "json"], [onnx_path], []),
    ]
    report_opts = _flags(cfg.get("report") or {})
    for lv in cfg["levels"]:
        out = run / f"report-L{lv}"
        plan.append((f"report-L{lv}", ["report", str(onnx_path), "--levels", str(lv), "--seq-len",
                                       str(cfg["max_length"]), *report_opts, "-o", str(out)],
                     [onnx_path], [out / "report.json"]))
    emulate = {"max_length": cfg["max_length"], **cfg["emulate"]}  # same truncation as training unless set
    for lv in cfg["levels"]:
        out = run / f"emulate-L{lv}"
        plan.append((f"emulate-L{lv}", ["simulate", str(onnx_path), "--backend", "emulate", "--levels", str(lv),
                                        *data, *_flags(emulate), "-o", str(out)],
                     [onnx_path, exported], [out / "simulation.json"]))
    if tenseal.pop("enabled", True):
        plan.append(("tenseal", ["simulate", str(onnx_path), "--backend", "tenseal", *data, *_flags(tenseal),
                                 "-o", str(run / "tenseal")], [onnx_path, exported], [run / "tenseal" / "simulation.json"]))
    return plan


def stage_names(cfg: dict) -> list[str]:
    return [name for name, *_ in stage_plan(cfg, Path("RUN_DIR"), None)]


ALIASES = {"report": "report-L", "emulate": "emulate-L"}  # --only report = every report-L<L> stage


def select_stages(cfg: dict, only: list[str] | None) -> set[str] | None:
    """The stage names ``--only`` selects (None: all); an unknown name is an error listing the valid ones."""
    if not only:
        return None
    names = stage_names(cfg)
    chosen = set()
    for item in only:
        if item in names:
            chosen.add(item)
        elif item in ALIASES:
            chosen |= {n for n in names if n.startswith(ALIASES[item])}
        else:
            valid = names + [a for a in ALIASES if any(n.startswith(ALIASES[a]) for n in names)]
            raise UserError(f"--only: unknown stage {item!r}{_suggest(item, valid)}; stages of this config: "
                            f"{', '.join(names)} (report = every report-L<L>, emulate = every emulate-L<L>)")
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# content hashes: what a stage's key is made of and how its outputs are validated
# ---------------------------------------------------------------------------------------------------------------
_HASH_CACHE: dict[tuple, str] = {}
_SKIP_PARTS = ("train_state",)  # resumable training state is not part of a checkpoint's content


def _file_hash(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def content_hash(path: Path) -> str | None:
    """sha256 of a file, or of a folder's files (relative names + contents); None when missing."""
    from .io import LOCK_NAME, TMP_PREFIX

    path = Path(path)
    if path.is_file():
        return _file_hash(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if rel.parts[0] in _SKIP_PARTS or f.name == LOCK_NAME or f.name.startswith(TMP_PREFIX):
            continue
        h.update(f"{rel.as_posix()}\0{_file_hash(f)}\n".encode())
    return h.hexdigest()


def resolve_data(data_dir: str | None) -> tuple[str | None, dict]:
    """(folder passed to the stages, its identity for stage keys): the folder's absolute path and the hash of
    its split files, or the hub. A named folder that does not exist is an error now, before any stage."""
    from .errors import DataError

    src = data_dir or os.environ.get("CGF_FHE_DATA_DIR")
    if not src:
        return None, {"source": "hub:glue/mrpc"}
    folder = Path(src).expanduser().resolve()
    origin = "--data-dir" if data_dir else "$CGF_FHE_DATA_DIR"
    if not folder.is_dir():
        raise DataError(f"MRPC data folder {src!r} (from {origin}) does not exist")
    files = {}
    for split in ("train", "validation"):
        f = folder / f"{split}.tsv"
        if not f.is_file():
            raise DataError(f"MRPC data folder {folder} (from {origin}) has no {split}.tsv")
        files[f.name] = _file_hash(f)
    return str(folder), {"source": str(folder), "files": files}


def _read_stamp(stamp: Path) -> dict | None:
    try:
        rec = json.loads(stamp.read_text())
    except (OSError, ValueError):  # missing, truncated, not JSON: the stage simply runs again
        return None
    return rec if isinstance(rec, dict) else None


def _outputs_valid(outputs: list[Path], recorded: dict) -> bool:
    """Every output exists with the content it had when the stage finished (a 0-byte or truncated file is not)."""
    for o in outputs:
        want = recorded.get(str(o))
        if want is None or content_hash(o) != want:
            return False
    return True


def run_pipeline(cfg: dict, run_dir: str | Path, data_dir: str | None = None, only: list[str] | None = None) -> dict:
    from . import cli
    from .io import output_lock, write_json, write_text

    validate_config(cfg)
    selected = select_stages(cfg, only)
    data_arg, data_id = resolve_data(data_dir)
    run = Path(run_dir)
    with output_lock(run):
        import yaml

        (run / ".stages").mkdir(exist_ok=True)
        write_text(run / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        timings = {}
        rewritten: set[str] = set()  # outputs of the stages run now: whatever reads them runs again too
        for name, argv, inputs, outputs in stage_plan(cfg, run, data_arg):
            if selected is not None and name not in selected:
                continue
            stamp = run / ".stages" / f"{name}.json"
            key = {"argv": argv, "inputs": {str(p): content_hash(p) for p in inputs},
                   "data": data_id if name.split("-L")[0] in DATA_STAGES else None}
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
            rec = _read_stamp(stamp)
            if (rec and rec.get("sha256") == digest and not any(str(p) in rewritten for p in inputs)
                    and _outputs_valid(outputs, rec.get("outputs") or {})):
                print(f"[pipeline] {name}: up to date, skipped")
                timings[name] = rec.get("seconds")
                continue
            stamp.unlink(missing_ok=True)
            print(f"[pipeline] {name}: cgf-fhe {' '.join(argv)}", flush=True)
            t0 = time.perf_counter()
            rc = cli.main(argv)
            dt = time.perf_counter() - t0
            if rc != 0:
                raise UserError(f"stage {name!r} failed with exit code {rc} (command: cgf-fhe {' '.join(argv)})")
            missing = [str(o) for o in outputs if not o.exists()]
            if missing:
                raise UserError(f"stage {name!r} finished but did not write {missing}")
            write_json(stamp, {"sha256": digest, **key, "outputs": {str(o): content_hash(o) for o in outputs},
                               "seconds": dt})
            timings[name] = dt
            rewritten |= {str(o) for o in outputs}
        return summarize(run, cfg, timings)


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def summarize(run: Path, cfg: dict, timings: dict) -> dict:
    from .io import write_json, write_text

    levels = list(cfg["levels"])
    teacher = _read(run / "teacher" / "cgf_fhe.json").get("dev", {})
    student = _read(run / "student" / "cgf_fhe.json").get("dev", {})
    covered = _read(run / "student-cover" / "cgf_fhe.json") if _cover_options(cfg) is not None else {}
    cover_info = covered.get("cover") or {}
    emuls = {lv: _read(run / f"emulate-L{lv}" / "simulation.json") for lv in levels}
    ten = _read(run / "tenseal" / "simulation.json")
    reports = {lv: _read(run / f"report-L{lv}" / "report.json") for lv in levels}
    first = next((e for e in emuls.values() if e), {})
    fmt = lambda v, p=4: "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
    budget = lambda s, lv=None: s.get("level_budget", lv) if s else lv  # noqa: E731
    rows = [
        ("teacher (exact softmax), plaintext", "-", teacher.get("accuracy"), teacher.get("f1"), None,
         timings.get("teacher")),
        ("student (CGF, polynomial), plaintext", "-", student.get("accuracy"), student.get("f1"), None,
         timings.get("student")),
        ("student after cover (exported), plaintext", "-", covered.get("dev", {}).get("accuracy"),
         covered.get("dev", {}).get("f1"), None, timings.get("cover")),
        ("student, ONNX plain backend", "-", first.get("plain_accuracy"), first.get("plain_f1"),
         first.get("n_examples"), None),
    ]
    for lv, e in emuls.items():
        rows.append((f"student, emulated CKKS at L={fmt(budget(e, lv))}", fmt(budget(e, lv)), e.get("accuracy"),
                     e.get("f1"), e.get("n_examples"), e.get("seconds")))
    rows.append(("student, TenSEAL CKKS (real)" + (f" at L={fmt(budget(ten))}" if ten else ", not run"),
                 fmt(budget(ten)), ten.get("accuracy"), ten.get("f1"), ten.get("n_examples"), ten.get("seconds")))
    lines = ["# Pipeline summary", "", f"Run directory: `{run}`", "",
             "Level budgets (levels of a fresh ciphertext): " + ", ".join(f"L={lv}" for lv in levels)
             + "; every encrypted figure below names the budget it was measured or planned at.", "",
             "| stage | level budget | accuracy | F1 | examples | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {fmt(r[2])} | {fmt(r[3])} | {fmt(r[4])} | {fmt(r[5], 1)} |")
    lines += ["", "| encrypted evaluation | level budget | agreement with plaintext | max logit error | refreshes |",
              "|---|---|---|---|---|"]
    for lv, e in emuls.items():
        lines.append(f"| emulate | {fmt(budget(e, lv))} | {fmt(e.get('agreement'))} | "
                     f"{fmt(e.get('max_logit_error'), 6)} | {fmt(e.get('refreshes'))} |")
    lines.append(f"| tenseal | {fmt(budget(ten))} | {fmt(ten.get('agreement'))} | {fmt(ten.get('max_logit_error'), 6)} "
                 f"| {fmt(ten.get('refreshes'))} |")
    lines += ["", "| level budget | total depth | bootstraps / refreshes | estimated latency (s) |", "|---|---|---|---|"]
    for lv, rep in reports.items():
        lat = rep.get("latency_seconds", rep.get("estimated_latency_s"))
        lines.append(f"| {lv} | {fmt(rep.get('total_depth'))} | {fmt(rep.get('bootstraps_total'))} | {fmt(lat, 1)} |")
    text = "\n".join(lines) + "\n"
    write_text(run / "summary.md", text)
    summary = {"teacher": teacher, "student": student, "levels": levels,
               # the emulation at the first budget (its level_budget inside), and every budget's by level
               "emulate": first, "emulate_by_level": {str(k): v for k, v in emuls.items()}, "tenseal": ten,
               "cover": ({"dev": covered.get("dev"), "changed": sorted(cover_info.get("changed", {})),
                          "depth_before": cover_info.get("depth_before"), "depth_after": cover_info.get("depth_after")}
                         if covered else None),
               "reports": {str(k): {kk: v.get(kk) for kk in ("total_depth", "bootstraps_total", "level_budget")}
                           for k, v in reports.items()}, "seconds": timings}
    write_json(run / "summary.json", summary, default=str)
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
    select_stages(cfg, args.only)  # an unknown --only name fails even with --print-config
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    if not args.output:
        raise UserError("--output RUN_DIR is required (unless --print-config)")
    run_pipeline(cfg, args.output, args.data_dir, args.only)
    return 0


DESCRIPTION = """\
Run every stage in order into one run directory, each as its own cgf-fhe command:
teacher (finetune) -> student (distill --poly all) -> cover -> export -> check -> report-L<L> -> emulate-L<L>
[-> tenseal], one report-L<L> and one emulate-L<L> per level budget L of the config's `levels:` list.
The config is a preset (--preset, default smoke) with --config's YAML/TOML merged over it; it is validated
as a whole before any stage runs. Rerunning resumes: a stage is skipped when its command line, the MRPC data
(folder + content hash) and its input files are unchanged and its outputs still hold what it wrote.
Results: RUN_DIR/summary.md and summary.json."""


def register(sub) -> None:
    import argparse

    p = sub.add_parser("pipeline", help="all stages end to end (teacher -> student -> export -> report -> "
                                        "emulate), resumable", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML or TOML file overriding the preset (same keys as RUN_DIR/config.yaml)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="base configuration (default: smoke)")
    p.add_argument("--data-dir", help="MRPC folder holding GLUE train.tsv and validation.tsv (default: "
                                      "$CGF_FHE_DATA_DIR, else the datasets hub glue/mrpc)")
    p.add_argument("--only", nargs="+", metavar="STAGE",
                   help="run only these stages: teacher, student, cover, export, check, report-L<L>, emulate-L<L>, "
                        "tenseal (the ones the config has); `report` / `emulate` = every level budget's")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("-o", "--output", help="run directory (required unless --print-config)")
    p.set_defaults(func=_cmd)
