"""Python API of the training stage (the CLI in :mod:`cgf_fhe.training.cli` is a thin layer over it).

Output layout
-------------
* ``finetune(...)``: ``out_dir`` is the checkpoint (best-on-dev weights).
  ``finetune_seeds(..., seeds=[...])``: ``out_dir/seed<S>/`` per seed + ``out_dir/summary.json``.
* ``distill(..., seeds=None)``: the student checkpoint in ``out_dir``, the teacher (trained once if not
  given) in ``out_dir/teacher``. With ``seeds=[...]``: ``out_dir/seed<S>/`` and ``out_dir/teacher/seed<S>/``.
  Always ``out_dir/summary.json`` (student vs teacher on the same seeds: mean, std, paired difference).
* ``sweep``: ``out_dir/c<coeff>/seed<S>/`` + ``out_dir/sweep.json``.
Resumable training state lives in ``<checkpoint>/train_state/`` until the run finishes (kept with
``keep_state=True``). A finished checkpoint has ``"status": "done"`` in its settings; with ``resume=True``
finished runs are skipped.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data import holdout_split, load_mrpc, tokenize_split
from ..models import (CheckpointError, is_checkpoint, load_checkpoint, read_settings, resolve_model,
                      save_checkpoint, SETTINGS_FILE)
from ..softmax import fix_head_coeffs, train_head_coeffs
from .engine import (DIVERGED_FILE, CEStep, KDStep, TrainingDiverged, clear_state, fit, get_accelerator,
                     resolve_precision, set_dropout)
from .evaluate import evaluate_model, model_inputs, probe_softmax, summarize_seeds, format_summary, mean_std
from .poly_train import StudentSchedule
from .recipes import Recipe, get_recipe

STATE_SUBDIR = "train_state"
FHE_STATE_FILE = "fhe_settings.json"


class TrainingError(CheckpointError):
    """User-facing problem in the training stage (wrong teacher folder, missing surgery module, ...)."""


@dataclass
class RunOptions:
    """Options that do not change what is trained, only where the data comes from and how it runs."""
    data_dir: str | None = None
    max_length: int | None = None  # None = the recipe's
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    device: str | None = None
    mixed_precision: str = "auto"
    resume: bool = False
    progress: bool = True
    keep_state: bool = False
    stop_after: int | None = None  # stop after this many epochs (resume later)
    calib_batches: int | None = None  # calibration batches for --poly all (None = whole train split)

    def data_settings(self, recipe: Recipe) -> dict:
        return {"data_dir": str(self.data_dir) if self.data_dir else None,
                "max_length": self.max_length or recipe.max_length,
                "max_train_samples": self.max_train_samples, "max_eval_samples": self.max_eval_samples}


def _as_recipe(recipe: Recipe | str | None, **overrides) -> Recipe:
    if recipe is None:
        recipe = "reference"
    if isinstance(recipe, str):
        return get_recipe(recipe, **overrides)
    return recipe.override(**overrides)


def _with_precision(opts: RunOptions, polynomial: bool) -> RunOptions:
    """``opts`` with ``mixed_precision`` resolved once for the whole run (one precision per process)."""
    return replace(opts, mixed_precision=resolve_precision(opts.mixed_precision, opts.device, polynomial))


def _log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # multi-process runs (accelerate launch / torchrun): main rank only
        tqdm.write(msg)


# ---------------------------------------------------------------- data

_RAW_CACHE: dict = {}


def _raw(data_dir):
    key = str(data_dir) if data_dir else (os.environ.get("CGF_FHE_DATA_DIR") or "<hub>")
    if key not in _RAW_CACHE:
        _RAW_CACHE[key] = load_mrpc(data_dir)
    return _RAW_CACHE[key]


def load_split(tokenizer, split: str, opts: RunOptions, recipe: Recipe | None = None, max_samples=None,
               swap: bool = False):
    raw = _raw(opts.data_dir)
    if split not in raw:
        raise TrainingError(f"unknown split {split!r}; available: {sorted(raw)}")
    max_length = opts.max_length or (recipe.max_length if recipe else 128)
    return tokenize_split(raw[split], tokenizer, max_length, max_samples, swap=swap)


def load_data(tokenizer, opts: RunOptions, recipe: Recipe, with_select: bool = False):
    """Tokenized ``(train, dev)``; ``with_select``: ``(train, dev, select)`` where ``select`` is the part of the
    training set held out for best-checkpoint selection (``recipe.select_holdout``; None when 0) and ``train``
    is the rest (swapped pairs, if any, are added to the rest only, so no held-out pair is trained on)."""
    dev = load_split(tokenizer, "validation", opts, recipe, opts.max_eval_samples)
    if not recipe.select_holdout:
        train = load_split(tokenizer, "train", opts, recipe, opts.max_train_samples, swap=recipe.swap_pairs)
        return (train, dev, None) if with_select else (train, dev)
    raw = _raw(opts.data_dir)["train"]
    if opts.max_train_samples is not None:
        raw = raw.select(range(min(opts.max_train_samples, len(raw))))
    try:
        rest, held = holdout_split(raw, recipe.select_holdout)
    except ValueError as exc:
        raise TrainingError(f"--select-holdout: {exc}") from exc
    max_length = opts.max_length or recipe.max_length
    train = tokenize_split(rest, tokenizer, max_length, swap=recipe.swap_pairs)
    select = tokenize_split(held, tokenizer, max_length)
    return (train, dev, select) if with_select else (train, dev)


def collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


# ---------------------------------------------------------------- helpers

def _select_settings(res, select) -> dict:
    """What a run selected on a held-out part of train records: that part's size and the best point's metrics."""
    if select is None:
        return {}
    return {"selected_on": "train-holdout", "select": res.best_select, "n_select": len(select)}


def _is_main(opts: RunOptions) -> bool:
    return get_accelerator(opts.device, opts.mixed_precision).is_main_process


def _barrier(opts: RunOptions) -> None:
    """Multi-process runs: the other ranks wait until the main rank has written its files."""
    get_accelerator(opts.device, opts.mixed_precision).wait_for_everyone()


def _run_key(settings: dict) -> dict:
    """What identifies a run's result: everything in its settings that changes the trained weights."""
    # through Recipe so fields added in later versions compare as their defaults
    full = Recipe.from_dict(settings.get("recipe") or {}).to_dict()
    recipe = {k: v for k, v in full.items() if k not in ("name", "note", "tuned")}
    fhe = settings.get("fhe_options")
    data = settings.get("data") or {}
    # through JSON so a freshly built run (tuples) compares equal to the saved one (lists)
    return _flatten(json.loads(json.dumps({
        "kind": settings.get("kind"), "softmax": settings.get("softmax"), "coeff": settings.get("coeff"),
        "init": settings.get("init"), "seed": settings.get("seed"), "recipe": recipe,
        "max_train_samples": data.get("max_train_samples"), "max_length": data.get("max_length"),
        "kd": settings.get("kd"), "fhe_options": fhe, "student_layers": settings.get("student_layers_requested"),
        "student_hidden": settings.get("student_hidden"), "student_init": settings.get("student_init"),
        "teacher": settings.get("teacher"), "poly_training": settings.get("poly_training"),
    })))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _skip_finished(out: Path, want: dict, tag: str) -> dict | None:
    """With --resume: the finished run in ``out`` if it matches ``want`` (else a clear error)."""
    s = _done(out)
    if s is None:
        return None
    have = _run_key(s)
    wanted = _run_key(want)
    diff = [f"{k}: saved {have.get(k)!r} vs now {wanted.get(k)!r}" for k in sorted(set(have) | set(wanted))
            if have.get(k) != wanted.get(k)]
    if diff:
        raise TrainingError(f"{out} already holds a finished run with different settings ({'; '.join(diff)}); "
                            "use another -o or drop --resume to overwrite it")
    _log(f"[{tag}] {out} is already finished (dev accuracy {s['dev']['accuracy']:.4f}); skipping")
    return s


def _done(path: Path) -> dict | None:
    if is_checkpoint(path):
        s = read_settings(path)
        if s.get("status") == "done":
            return s
    return None


def _backbone_of(model) -> str | None:
    return getattr(model.config, "cgf_backbone", None)


def _update_settings(ckpt: Path, extra: dict) -> dict:
    s = read_settings(ckpt)
    s.update(extra)
    (ckpt / SETTINGS_FILE).write_text(json.dumps(s, indent=2, sort_keys=True))
    return s


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def _seed_dirs(out_dir: Path, seeds: Sequence[int] | None, seed: int):
    """[(seed, dir)]: per-seed subfolders when a seed list is given, else out_dir itself."""
    if seeds:
        return [(int(s), out_dir / f"seed{int(s)}") for s in seeds]
    return [(int(seed), out_dir)]


def _finish(ckpt: Path, state_dir: Path, opts: RunOptions) -> None:
    if not opts.keep_state and _is_main(opts):
        clear_state(state_dir)
        try:
            state_dir.rmdir()
        except OSError:
            pass


# ---------------------------------------------------------------- finetune

def finetune(model: str = "tiny", out_dir: str | os.PathLike = "out/finetune", softmax: str = "exact",
             coeff: float | None = None, seed: int = 42, recipe: Recipe | str | None = None,
             opts: RunOptions | None = None) -> dict:
    """CE fine-tune one seed of ``model`` (backbone name or checkpoint) into the checkpoint ``out_dir``.

    Returns the checkpoint settings (``settings["dev"]`` = best dev metrics)."""
    opts = opts or RunOptions()
    recipe = _as_recipe(recipe)
    out = Path(out_dir)
    if softmax == "cgf" and coeff is None:
        coeff = 0.5
    settings = {
        "kind": "finetune", "softmax": softmax, "coeff": float(coeff) if softmax == "cgf" else None,
        "recipe": recipe.to_dict(), "seed": int(seed), "init": str(model), "teacher": None, "layer_map": None,
        "data": opts.data_settings(recipe), "cgf_fhe_version": __version__,
    }
    if opts.resume and (s := _skip_finished(out, settings, "finetune")):
        return s
    net, tok, src_settings = resolve_model(model, softmax, coeff, seed)
    if recipe.reinit_layers:
        from ..models import reinit_top_layers

        try:
            settings["reinitialized"] = reinit_top_layers(net, recipe.reinit_layers, seed)
        except ValueError as exc:
            raise TrainingError(f"--reinit-layers: {exc}") from exc
    train, dev, select = load_data(tok, opts, recipe, with_select=True)
    state_dir = out / STATE_SUBDIR
    if not opts.resume:
        clear_state(state_dir)
    tag = f"finetune {softmax}" + (f" c={coeff:g}" if softmax == "cgf" else "") + f" seed {seed}"
    res = fit(net, CEStep(), train, dev, collator(tok), recipe, seed=seed, state_dir=state_dir,
              resume=opts.resume, device=opts.device, mixed_precision=opts.mixed_precision,
              progress=opts.progress, stop_after=opts.stop_after, desc=tag, run_info=_run_key(settings),
              select_dataset=select)
    settings.update({
        "status": "done" if res.completed else "partial", "dev": res.best_metrics, "best_epoch": res.best_epoch,
        "best_at": res.best_at, "history": res.history, "seconds_per_epoch": res.seconds_per_epoch,
        **_select_settings(res, select),
        "backbone": _backbone_of(net) or str(model),
    })
    if src_settings.get("fhe"):
        settings["fhe"] = src_settings["fhe"]
    if not res.completed:
        _log(f"[{tag}] stopped after epoch {len(res.history)}/{recipe.epochs}; continue with --resume")
        return settings
    if _is_main(opts):
        save_checkpoint(net, tok, out, settings)
        _finish(out, state_dir, opts)
    _barrier(opts)
    return settings


def _read_reference(reference: str | os.PathLike | None, seeds: Sequence[int]) -> dict | None:
    """{seed: dev metrics} from a multi-seed run folder (reference/seed<S>/) or a single checkpoint."""
    if reference is None:
        return None
    ref = Path(reference)
    if is_checkpoint(ref):
        m = read_settings(ref)["dev"]
        return {s: m for s in seeds}
    out = {}
    for s in seeds:
        d = ref / f"seed{s}"
        if not is_checkpoint(d):
            raise TrainingError(f"reference run {ref} has no checkpoint for seed {s} ({d})")
        out[s] = read_settings(d)["dev"]
    return out


def finetune_seeds(model: str, out_dir, seeds: Sequence[int], softmax: str = "exact", coeff: float | None = None,
                   recipe: Recipe | str | None = None, opts: RunOptions | None = None,
                   reference: str | os.PathLike | None = None) -> dict:
    """Fine-tune each seed into ``out_dir/seed<S>`` and write ``out_dir/summary.json``."""
    opts = opts or RunOptions()
    recipe = _as_recipe(recipe)
    out = Path(out_dir)
    runs = {}
    for s, d in _seed_dirs(out, seeds, seeds[0]):
        st = finetune(model, d, softmax, coeff, s, recipe, opts)
        if st.get("status") != "done":
            return {"status": "partial"}
        runs[s] = st
    ref = _read_reference(reference, list(runs))
    summary = {
        "kind": "finetune", "softmax": softmax, "coeff": coeff, "model": str(model), "recipe": recipe.to_dict(),
        "seeds": list(runs), **summarize_seeds({s: r["dev"] for s, r in runs.items()}, ref),
        "seconds_per_epoch": mean_std([r["seconds_per_epoch"] for r in runs.values()]),
        "reference_run": str(reference) if reference else None,
        "runs": {str(s): str(_seed_dirs(out, [s], s)[0][1]) for s in runs},
    }
    if _is_main(opts):
        _write_json(out / "summary.json", summary)
    _log(format_summary(summary, softmax))
    return summary


# ---------------------------------------------------------------- distill

def _surgery():
    try:
        from .. import surgery
    except ImportError as exc:
        raise TrainingError(f"--poly/--student-layers need cgf_fhe.surgery, which cannot be imported: {exc}") from exc
    return surgery


def _seed_checkpoint(path: Path, seed: int, flag: str) -> Path:
    """``path`` itself if it is a checkpoint, else its ``seed<seed>/`` (a seed-set folder written by ``--seeds``)."""
    if is_checkpoint(path):
        return path
    if is_checkpoint(path / f"seed{seed}"):
        return path / f"seed{seed}"
    raise TrainingError(f"{flag} {path}: neither a cgf-fhe checkpoint nor a folder with seed{seed}/ "
                        f"(expected {path / SETTINGS_FILE} or {path / f'seed{seed}' / SETTINGS_FILE})")


def _teacher_dir(teacher, out: Path, seed: int, multi: bool) -> tuple[Path, bool]:
    """(teacher checkpoint dir for this seed, given_by_user)."""
    if teacher is not None:
        return _seed_checkpoint(Path(teacher), seed, "--teacher"), True
    root = out / "teacher"
    return (root / f"seed{seed}" if multi else root), False


def _ensure_teacher(model: str, tdir: Path, seed: int, recipe: Recipe, opts: RunOptions) -> dict:
    """Train the exact teacher into ``tdir`` once; reuse it when it is finished and compatible."""
    s = _done(tdir)
    if s is not None:
        data_keys = ("max_length", "max_train_samples")  # what changes the trained weights
        cached_recipe = Recipe.from_dict(s.get("recipe") or {}).finetune_fields()
        want = {"backbone": str(model), "seed": int(seed), **{f"recipe.{k}": v for k, v in recipe.finetune_fields().items()},
                **{f"data.{k}": opts.data_settings(recipe)[k] for k in data_keys}}
        have = {"backbone": s.get("init"), "seed": s.get("seed"), **{f"recipe.{k}": v for k, v in cached_recipe.items()},
                **{f"data.{k}": (s.get("data") or {}).get(k) for k in data_keys}}
        diff = [f"{k}: cached {have[k]!r} vs requested {want[k]!r}" for k in want if want[k] != have[k]]
        if diff:
            raise TrainingError(f"cached teacher {tdir} was trained with different settings ({'; '.join(diff)}); "
                                "pass --teacher, use another -o, or delete that folder")
        _log(f"[distill] using cached teacher {tdir} (dev accuracy {s['dev']['accuracy']:.4f})")
        return s
    _log(f"[distill] training the exact teacher (seed {seed}) into {tdir}")
    return finetune(model, tdir, "exact", None, seed, recipe, opts)


def _fhe_options(fhe) -> object | None:
    if fhe is None:
        return None
    surgery = _surgery()
    if isinstance(fhe, dict):
        return surgery.FheOptions.from_dict(fhe) if hasattr(surgery.FheOptions, "from_dict") else surgery.FheOptions(**fhe)
    return fhe


def distill_one(model: str, out_dir, seed: int = 42, teacher: str | os.PathLike | None = None,
                coeff: float = 0.5, recipe: Recipe | str | None = None, opts: RunOptions | None = None,
                fhe=None, student_layers: int | None = None, interval_penalty: float = 0.0,
                multi: bool = False, teacher_root: Path | None = None, guard: bool = True,
                blend_epochs: float | None = None, refit: bool = False, student_hidden: int | None = None,
                student_init: str | os.PathLike | None = None, epoch_cover: bool = False,
                softmax: str = "cgf") -> dict:
    """Distill one seed: exact teacher -> CGF (optionally polynomial / shallower / narrower) student in ``out_dir``.

    ``softmax="exact"``: the control student, an exact-softmax copy of the teacher (optionally shallower) trained
    with the same KD; it measures what distillation and checkpoint selection alone cost, apart from CGF
    (not polynomial, full width, one coefficient-free softmax: refused with ``fhe``, ``student_hidden``,
    ``student_init``, ``coeff_per_head``, ``coeff_lr`` and ``kd_attn_weight``).

    ``student_hidden`` H (< the teacher's hidden size, a multiple of its head size): a narrow student with random
    encoder/pooler/classifier and the teacher's embeddings projected by a fixed orthonormal ``P`` [D, H]; the
    hidden-state KD targets are the teacher's hidden states ``@ P`` (see :mod:`.narrow`). ``P`` is kept in the
    training state for resume and saved with the checkpoint as ``kd_projection.safetensors``.
    ``student_init``: a finished non-polynomial ``distill`` student (or a seed-set folder holding ``seed<seed>/``,
    like ``teacher``) to start from instead of the teacher's weights (full width: its weights and layer map) or the
    random init (narrow: its weights and its ``P``);
    ``student_hidden`` / ``student_layers`` default to its own and must match it. Typical use: a polynomial
    student (``fhe``) calibrated on, and trained from, an already distilled CGF student (two stages: CGF first,
    then the polynomials); for narrow students the activation ranges are then those of a trained model (a
    random-init encoder's are far too small).

    Polynomial students (see :mod:`.poly_train`): ``guard`` clamps polynomial inputs into their intervals
    while training; with frozen LayerNorms the blend exact -> frozen ramps linearly over the first
    ``blend_epochs`` epochs (None = half of them, 0 = frozen from the start) and, with ``refit``, the exp /
    GELU / tanh polynomials are refitted on ranges re-measured when the blend reaches 1; with ``epoch_cover``
    every epoch ends by widening the intervals its training inputs left (see :mod:`.poly_train`). Dev metrics, the best-epoch
    choice (only epochs that ended at blend 1) and the saved checkpoint are all the exported form: guard off,
    blend 1. After training the ranges are re-measured on the training data (``calibration_trained``)
    and out-of-interval counts are stored for train (``interval_report_train``) and dev (``interval_report``)."""
    opts = opts or RunOptions()
    recipe = _as_recipe(recipe)
    out = Path(out_dir)
    tdir, given = _teacher_dir(teacher, teacher_root if teacher_root is not None else out, seed, multi)
    fhe_opts = _fhe_options(fhe)
    poly = fhe_opts is not None and getattr(fhe_opts, "poly", "none") != "none"
    opts = _with_precision(opts, poly)
    if epoch_cover and not poly:
        raise TrainingError("epoch_cover needs a polynomial student (fhe poly='all')")
    _check_student_softmax(softmax, poly, student_hidden, student_init, recipe)
    schedule = _poly_schedule(fhe_opts, recipe, guard, blend_epochs, refit, epoch_cover) if poly else None
    if recipe.softmax_blend_epochs and schedule is None:  # a CGF student that is not polynomial
        schedule = StudentSchedule(guard=False, softmax_blend_epochs=_softmax_blend_epochs(recipe))
    if student_init is not None:
        student_init = _seed_checkpoint(Path(student_init), seed, "--student-init").resolve()
        if student_init == out.resolve():
            raise TrainingError(f"--student-init {student_init} is the output folder; write the new student elsewhere")
        student_hidden, student_layers = _check_student_init(student_init, student_hidden, student_layers)
    if not given:
        ts = _ensure_teacher(model, tdir, seed, recipe, opts)
        if ts.get("status") != "done":
            return {"status": "partial", "teacher": str(tdir)}

    settings = {
        "kind": "distill", "softmax": softmax, "coeff": float(coeff) if softmax == "cgf" else None,
        "recipe": recipe.to_dict(), "seed": int(seed),
        "init": str(model) if model else None, "teacher": str(tdir.resolve()),
        "kd": {"alpha": recipe.kd_alpha, "beta": recipe.kd_beta, "T": recipe.kd_temperature,
               "ce_weight": recipe.kd_ce_weight, "interval_penalty": float(interval_penalty),
               **({"attn_weight": recipe.kd_attn_weight} if recipe.kd_attn_weight else {})},
        "fhe_options": _options_dict(fhe_opts) if poly else None,
        "student_layers_requested": int(student_layers) if student_layers is not None else None,
        "student_hidden": int(student_hidden) if student_hidden is not None else None,
        "student_init": str(student_init) if student_init is not None else None,
        "poly_training": schedule.to_dict() if schedule is not None else None,
        "data": opts.data_settings(recipe), "cgf_fhe_version": __version__,
    }
    if opts.resume and (s := _skip_finished(out, settings, "distill")):
        return s

    t_model, tok, t_settings = load_checkpoint(tdir, softmax="exact")
    train, dev, select = load_data(tok, opts, recipe, with_select=True)
    collate = collator(tok)

    state_dir = out / STATE_SUBDIR
    if not opts.resume:
        clear_state(state_dir)
    n_teacher_layers = t_model.config.num_hidden_layers
    layer_map = list(range(n_teacher_layers))
    projection = None
    if student_hidden is not None:
        student, layer_map, projection = _narrow_student(t_model, tdir, student_hidden, student_layers, coeff, seed,
                                                         train, collate, recipe, opts, state_dir, student_init,
                                                         poly)
    elif student_init is not None:
        student, layer_map = _full_width_init(student_init, t_model, tdir, coeff)
    else:
        student, _, _ = load_checkpoint(tdir, softmax=softmax, coeff=coeff if softmax == "cgf" else None)
        if student_layers is not None and student_layers != n_teacher_layers:
            try:
                layer_map = [int(i) for i in _surgery().shrink_layers(student, int(student_layers))]
            except ValueError as exc:
                raise TrainingError(f"--student-layers {student_layers}: {exc}") from None
    coeff_heads = _coeff_per_head(student, train, collate, recipe, opts) if recipe.coeff_per_head else None
    if coeff_heads is not None:
        settings["coeff_heads"] = coeff_heads
    if recipe.coeff_lr and coeff_heads is None:  # where the trained coefficients start
        coeff_heads = {"source": "student init" if getattr(student.config, "cgf_coeff_heads", None) else "--coeff"}
    coeff_start = train_head_coeffs(student) if recipe.coeff_lr else None
    student.train()
    fhe_settings = None
    if poly:
        surgery = _surgery()
        if recipe.poly_dropout is not None:
            set_dropout(student, recipe.poly_dropout)
        saved = state_dir / FHE_STATE_FILE
        if opts.resume and saved.is_file():
            fhe_settings = json.loads(saved.read_text())
            surgery.apply_fhe_settings(student, fhe_settings)
            _log(f"[distill] resume: polynomial settings restored from {saved}")
        else:
            from torch.utils.data import DataLoader

            device = get_accelerator(opts.device, opts.mixed_precision).device
            student.to(device)
            calib_loader = DataLoader(train, batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=collate)
            n_cal = len(train) if opts.calib_batches is None else min(len(train), opts.calib_batches * recipe.eval_batch_size)
            _log(f"[distill] calibrating ranges on {n_cal} training examples")
            ranges = surgery.calibrate(student, calib_loader, device=str(device), max_batches=opts.calib_batches,
                                       progress=opts.progress)
            fhe_settings = surgery.polynomialize(student, fhe_opts, ranges)
            if _is_main(opts):
                state_dir.mkdir(parents=True, exist_ok=True)
                _write_json(saved, fhe_settings)
            _barrier(opts)
        from torch.utils.data import DataLoader

        schedule.attach(DataLoader(train, batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=collate),
                        get_accelerator(opts.device, opts.mixed_precision).device, opts.calib_batches, opts.progress)

    penalty_fn = _surgery().interval_penalty if interval_penalty else None
    step = KDStep(t_model, layer_map, alpha=recipe.kd_alpha, beta=recipe.kd_beta, T=recipe.kd_temperature,
                  ce_weight=recipe.kd_ce_weight, penalty_weight=interval_penalty, penalty_fn=penalty_fn,
                  teacher_proj=projection["P"] if projection else None, attn_weight=recipe.kd_attn_weight)
    tag = ((f"distill c={coeff:g}" if softmax == "cgf" else "distill exact") + (" poly" if poly else "")
           + f" seed {seed}")
    res = fit(student, step, train, dev, collate, recipe, seed=seed, state_dir=state_dir, resume=opts.resume,
              device=opts.device, mixed_precision=opts.mixed_precision, progress=opts.progress,
              stop_after=opts.stop_after, desc=tag, run_info=_run_key(settings), schedule=schedule,
              select_dataset=select)
    if not res.completed:
        _log(f"[{tag}] stopped after epoch {len(res.history)}/{recipe.epochs}; continue with --resume")
        return {**settings, "status": "partial", "history": res.history}
    if coeff_start is not None:  # the trained coefficients (of the best checkpoint) become plaintext constants
        settings["coeff_heads"] = {**(coeff_heads or {}), "coeffs": fix_head_coeffs(student), "start": coeff_start,
                                   "trained": True}
        _log(f"[{tag}] trained CGF coefficients: {_range_text(settings['coeff_heads']['coeffs'])} "
             f"(started at {_range_text(coeff_start)})")
    if schedule is not None:
        schedule.finish(student)  # the exported form: guard off, blend 1 (what the dev metrics measured)

    device = next(student.parameters()).device
    from torch.utils.data import DataLoader

    dev_loader = DataLoader(dev, batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=collate)
    teacher_dev = evaluate_model(t_model.to(device), dev_loader, device)  # same eval set as the student
    settings.update({
        "status": "done", "dev": res.best_metrics, "best_epoch": res.best_epoch, "best_at": res.best_at,
        "history": res.history, "seconds_per_epoch": res.seconds_per_epoch,
        "backbone": _backbone_of(student) or t_settings.get("backbone"), "teacher_dev": teacher_dev,
        "layer_map": layer_map, "student_layers": student.config.num_hidden_layers, **_select_settings(res, select),
    })
    if projection is not None:
        settings["projection"] = {k: v for k, v in projection.items() if k != "P"}
    if fhe_settings is not None:
        surgery = _surgery()
        if hasattr(surgery, "fhe_settings"):  # the trained modules' current state (+ the calibration)
            fhe_settings = surgery.fhe_settings(student, fhe_settings.get("calibration"))
        if schedule.refit_result is not None:  # the exp/GELU/tanh intervals come from this re-calibration
            fhe_settings["calibration_refit"] = schedule.refit_result["ranges"]
            fhe_settings["refit_step"] = schedule.refit_result["step"]
        if schedule.epoch_cover:  # which intervals each epoch's cover widened
            fhe_settings["epoch_cover"] = [{"epoch": m.get("at", h["epoch"]), "widened": sorted(m.get("covered") or {})}
                                           for h in res.history for m in [*h.get("mid_evals", []), h]]
        settings["fhe"] = fhe_settings
        settings.update(_poly_reports(student, surgery, train, dev_loader, collate, recipe, opts, device,
                                      res.best_metrics, tag))
    if _is_main(opts):
        save_checkpoint(student, tok, out, settings)
        if projection is not None:
            from .narrow import PROJ_FILE, save_projection

            save_projection(projection["P"], out / PROJ_FILE,
                            {"method": projection["method"],
                             "explained_second_moment": projection["explained_second_moment"]})
            if not opts.keep_state:
                (state_dir / PROJ_FILE).unlink(missing_ok=True)
        if poly or projection is not None or layer_map != list(range(n_teacher_layers)):
            _reload_check(student, out, dev_loader, device)
        _finish(out, state_dir, opts)
    _barrier(opts)
    return settings


def _check_student_softmax(softmax: str, poly: bool, hidden, init, recipe: Recipe) -> None:
    if softmax == "cgf":
        return
    if softmax != "exact":
        raise TrainingError(f"student softmax {softmax!r}: choose 'cgf' or 'exact'")
    bad = [name for name, on in (("--poly all", poly), ("--student-hidden", hidden is not None),
                                 ("--student-init", init is not None), ("--coeff-per-head", recipe.coeff_per_head),
                                 ("--coeff-lr", recipe.coeff_lr), ("--attn-weight", recipe.kd_attn_weight),
                                 ("--softmax-blend-epochs", recipe.softmax_blend_epochs)) if on]
    if bad:
        raise TrainingError(f"an exact-softmax student is the KD control (the teacher's own softmax): it does not "
                            f"take {', '.join(bad)}")


def _range_text(coeffs) -> str:
    flat = [c for layer in coeffs for c in layer]
    return f"{min(flat):.3g}-{max(flat):.3g} (mean {sum(flat) / len(flat):.3g})"


HEAD_CALIB_EXAMPLES = 512  # training examples the per-head CGF coefficients are chosen on


def _coeff_per_head(student, train, collate, recipe: Recipe, opts: RunOptions) -> dict | None:
    """``--coeff-per-head``: choose a CGF coefficient per layer and head on the student's initial weights
    (kept as they are when the student was initialised from one that has them). Returns what to record."""
    from torch.utils.data import DataLoader

    from ..softmax import calibrate_head_coeffs

    if getattr(student.config, "cgf_coeff_heads", None) is not None:
        _log("[distill] per-head CGF coefficients kept from the initial student")
        return {"coeffs": student.config.cgf_coeff_heads, "source": "student init"}
    device = get_accelerator(opts.device, opts.mixed_precision).device
    student.to(device)
    n = min(len(train), HEAD_CALIB_EXAMPLES)
    loader = DataLoader(train.select(range(n)), batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=collate)
    res = calibrate_head_coeffs(student, (model_inputs(b) for b in loader), device=device)
    mean = sum(map(sum, res["l1"])) / sum(map(len, res["l1"]))
    single = sum(map(sum, res["l1_at_single"])) / sum(map(len, res["l1_at_single"]))
    _log(f"[distill] per-head CGF coefficients on {n} training examples: mean L1 to softmax rows {single:.3f} "
         f"(one c) -> {mean:.3f}; coefficients {sorted({c for layer in res['coeffs'] for c in layer})}")
    return {**res, "examples": n, "source": "calibrated"}


def _check_student_init(init: Path, hidden: int | None, layers: int | None) -> tuple[int | None, int]:
    """(student_hidden or None for a full-width student, student_layers) of a ``--student-init`` checkpoint: a
    finished, non-polynomial ``distill`` student, checked against the requested hidden size and depth."""
    from .narrow import PROJ_FILE

    s = read_settings(init)
    if s.get("kind") != "distill":
        raise TrainingError(f"--student-init {init}: not a distilled student ({SETTINGS_FILE} has kind "
                            f"{s.get('kind')!r}); make one with distill (without --poly)")
    if s.get("status") != "done":
        raise TrainingError(f"--student-init {init}: the run is not finished (status {s.get('status')!r})")
    if s.get("fhe"):
        raise TrainingError(f"--student-init {init}: already polynomial; start from a non-polynomial student")
    have_k = int(s["student_layers"])
    if s.get("student_hidden") is None:
        if hidden is not None:
            raise TrainingError(f"--student-hidden {hidden}: --student-init {init} is a full-width student, not a "
                                "narrow one (drop --student-hidden)")
        have_h = None
    else:
        if not (init / PROJ_FILE).is_file():
            raise TrainingError(f"--student-init {init}: a narrow student without its projection {PROJ_FILE}")
        have_h = int(s["student_hidden"])
        if hidden is not None and int(hidden) != have_h:
            raise TrainingError(f"--student-hidden {hidden} differs from --student-init {init} (hidden {have_h})")
    if layers is not None and int(layers) != have_k:
        raise TrainingError(f"--student-layers {layers} differs from --student-init {init} ({have_k} layers)")
    return have_h, have_k


def _warn_other_teacher(init: Path, s_init: dict, tdir: Path, what: str = "") -> None:
    if s_init.get("teacher") != str(tdir.resolve()):
        _log(f"[distill] WARNING: --student-init {init} was distilled from {s_init.get('teacher')}, not {tdir}{what}")


def _full_width_init(init: Path, t_model, tdir: Path, coeff: float):
    """(student, layer_map) from a finished full-width (optionally shallower) CGF student ``init``: its weights
    and its teacher-layer map, checked against the teacher's structure."""
    student, _, s_init = load_checkpoint(init, softmax="cgf", coeff=coeff)
    keys = ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
    got = {k: getattr(student.config, k) for k in keys}
    want = {k: getattr(t_model.config, k) for k in keys}
    layer_map = [int(i) for i in s_init.get("layer_map") or range(student.config.num_hidden_layers)]
    n_teacher = t_model.config.num_hidden_layers
    if got != want or len(layer_map) != student.config.num_hidden_layers or not all(0 <= i < n_teacher
                                                                                   for i in layer_map):
        raise TrainingError(f"--student-init {init}: structure {got} / layer map {layer_map} does not fit teacher "
                            f"{tdir} ({want}, {n_teacher} layers)")
    if s_init.get("coeff") is not None and float(s_init["coeff"]) != float(coeff):
        _log(f"[distill] WARNING: --student-init {init} was trained with CGF c={s_init['coeff']:g}; continuing "
             f"with c={coeff:g}")
    _warn_other_teacher(init, s_init, tdir)
    _log(f"[distill] student initialised from {init} ({len(layer_map)} layers, teacher layers {layer_map})")
    return student, layer_map


def _narrow_student(t_model, tdir: Path, hidden: int, layers: int | None, coeff: float, seed: int, train, collate,
                    recipe: Recipe, opts: RunOptions, state_dir: Path, init: Path | None = None, poly: bool = False):
    """(student, layer_map, projection info incl. "P") for ``--student-hidden`` (see :mod:`.narrow`);
    ``init``: a narrow student checkpoint to start from (its weights and its ``P``)."""
    from torch.utils.data import DataLoader

    from . import narrow

    n_teacher = t_model.config.num_hidden_layers
    if layers is not None:
        try:
            layer_map = [int(i) for i in _surgery().kept_layer_indices(n_teacher, int(layers))]
        except ValueError as exc:
            raise TrainingError(f"--student-layers {layers}: {exc}") from None
    else:
        layer_map = list(range(n_teacher))
    try:
        config = narrow.narrow_config(t_model.config, int(hidden), len(layer_map))
    except ValueError as exc:
        raise TrainingError(f"--student-hidden {hidden} (teacher {tdir}): {exc}") from None
    device = get_accelerator(opts.device, opts.mixed_precision).device
    t_model.to(device)
    loader = DataLoader(train, batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=collate)
    want_shape = (t_model.config.hidden_size, int(hidden))
    saved = init / narrow.PROJ_FILE if init is not None else state_dir / narrow.PROJ_FILE
    if init is not None or (opts.resume and saved.is_file()):
        P, meta = narrow.load_projection(saved)
        if tuple(P.shape) != want_shape:
            raise TrainingError(f"{saved} holds a projection of shape {tuple(P.shape)}, expected {want_shape} "
                                f"(teacher hidden {want_shape[0]} -> student hidden {hidden})"
                                + ("" if init is not None else "; drop --resume or use another -o"))
        explained = float(meta["explained_second_moment"]) if meta.get("explained_second_moment") else None
        _log(f"[distill] projection restored from {saved}")
    else:
        _log(f"[distill] projection {t_model.config.hidden_size} -> {hidden}: top principal directions of the "
             f"teacher's hidden states on the first {narrow.PROJ_BATCHES} training batches")
        P, explained = narrow.teacher_projection(t_model, loader, int(hidden), narrow.PROJ_BATCHES, device)
        if _is_main(opts):
            narrow.save_projection(P, saved, {"method": narrow.PROJ_METHOD, "explained_second_moment": explained})
        _barrier(opts)
    if init is not None:
        student, _, s_init = load_checkpoint(init, softmax="cgf", coeff=coeff)
        got = {k: getattr(student.config, k) for k in ("hidden_size", "num_attention_heads", "intermediate_size",
                                                        "num_hidden_layers", "vocab_size")}
        want = {k: getattr(config, k) for k in got}
        if got != want or list(s_init.get("layer_map") or []) != layer_map:
            raise TrainingError(f"--student-init {init}: structure {got} / layer map {s_init.get('layer_map')} does not "
                                f"match the narrow student of teacher {tdir} ({want} / {layer_map})")
        _warn_other_teacher(init, s_init, tdir, "; its projection P was computed from that teacher")
    else:
        student = narrow.init_narrow_student(t_model, config, P, seed, coeff, loader, narrow.PROJ_BATCHES, device)
        if poly:
            _log("[distill] WARNING: the polynomial intervals are calibrated on a random-init encoder, whose "
                 "activations are far smaller than a trained one's (the exported form may give NaN logits); "
                 "distill a non-polynomial narrow student first and pass it as --student-init")
    info = {"P": P, "method": narrow.PROJ_METHOD, "batches": narrow.PROJ_BATCHES,
            "batch_size": recipe.eval_batch_size, "file": narrow.PROJ_FILE, "teacher_hidden": t_model.config.hidden_size,
            "explained_second_moment": explained, "embedding_ln_init": "lstsq" if init is None else None,
            "init": str(init) if init is not None else None,
            "student_config": {"hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
                               "intermediate_size": config.intermediate_size,
                               "num_hidden_layers": config.num_hidden_layers}}
    _log(f"[distill] narrow student: hidden {config.hidden_size}, {config.num_attention_heads} heads, "
         f"intermediate {config.intermediate_size}, {config.num_hidden_layers} layers (teacher layers {layer_map})"
         + (f"; P keeps {explained:.1%} of the hidden states' second moment" if explained is not None else ""))
    return student, layer_map, info


def _poly_schedule(fhe_opts, recipe: Recipe, guard: bool, blend_epochs: float | None,
                   refit: bool = False, epoch_cover: bool = False) -> StudentSchedule:
    frozen = bool(getattr(fhe_opts, "any_frozen", False))
    if blend_epochs is not None and not frozen:
        raise TrainingError(f"--blend-epochs {blend_epochs:g} needs --ln frozen or frozen-attn (the blend anneals "
                            "frozen LayerNorms)")
    if frozen:
        blend_epochs = recipe.epochs / 2 if blend_epochs is None else float(blend_epochs)
        if not 0 <= blend_epochs < recipe.epochs:
            raise TrainingError(f"--blend-epochs {blend_epochs:g} must be >= 0 and < --epochs {recipe.epochs} "
                                "(the best checkpoint is chosen among the epochs that end at blend 1)")
    return StudentSchedule(guard=guard, blend_epochs=blend_epochs or 0.0, frozen=frozen, refit=refit,
                           epoch_cover=epoch_cover, softmax_blend_epochs=_softmax_blend_epochs(recipe))


def _softmax_blend_epochs(recipe: Recipe) -> float:
    f = float(recipe.softmax_blend_epochs)
    if not 0 <= f < recipe.epochs:
        raise TrainingError(f"--softmax-blend-epochs {f:g} must be >= 0 and < --epochs {recipe.epochs} (the best "
                            "checkpoint is chosen among the points reached at blend 1)")
    return f


def _poly_reports(student, surgery, train, dev_loader, collate, recipe: Recipe, opts: RunOptions, device,
                  best_metrics: dict, tag: str) -> dict:
    """The trained polynomial student in its exported form (guard off, blend 1): ranges re-measured on the
    training data, out-of-interval counts on train and dev, and the dev metrics measured again."""
    from torch.utils.data import DataLoader

    calib_loader = DataLoader(train, batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=collate)
    surgery.reset_interval_counters(student)
    ranges = surgery.calibrate(student, calib_loader, device=str(device), max_batches=opts.calib_batches,
                               progress=opts.progress)
    train_report = surgery.interval_report(student)
    surgery.reset_interval_counters(student)
    final = evaluate_model(student, dev_loader, device)
    dev_report = surgery.interval_report(student)
    if final["n_nonfinite"]:
        _log(f"[{tag}] WARNING: the exported form (guard off, blend 1) gives NaN/inf logits on {final['n_nonfinite']}/"
             f"{final['n']} dev examples: inputs leave the polynomial intervals (see interval_report); the training "
             "guard clamped them")
    if final["accuracy"] != best_metrics.get("accuracy") or final["n_nonfinite"] != best_metrics.get("n_nonfinite"):
        _log(f"[{tag}] WARNING: the exported form scores dev accuracy {final['accuracy']:.4f}, but training "
             f"recorded {best_metrics.get('accuracy')} for the best epoch")
    _log(f"[{tag}] out-of-interval inputs (exported form): train {train_report['n_out']}/{train_report['n_seen']}"
         f" ({train_report['frac_out']:.2e}), dev {dev_report['n_out']}/{dev_report['n_seen']}"
         f" ({dev_report['frac_out']:.2e}); non-finite dev logits: {final['n_nonfinite']}")
    return {"calibration_trained": ranges, "interval_report_train": train_report, "interval_report": dev_report,
            "dev_final": final}


def _reload_check(model, ckpt: Path, loader, device) -> None:
    """The saved checkpoint must give the trained model's logits back (structure rebuilt from settings)."""
    batch = next(iter(loader))
    with torch.no_grad():
        model.eval()
        want = model(**model_inputs(batch, device)).logits.float().cpu()
        re, _, _ = load_checkpoint(ckpt)
        got = re.to(device)(**model_inputs(batch, device)).logits.float().cpu()
    same = (want == got) | (want.isnan() & got.isnan())  # NaN/inf logits must be reproduced too
    err = float(torch.where(same, torch.zeros_like(want), (want - got).abs().nan_to_num(nan=float("inf"))).max())
    _update_settings(ckpt, {"reload_max_abs_diff": err})
    if not err <= 1e-4 * max(1.0, float(want.abs().max())):
        _log(f"[distill] WARNING: reloading {ckpt} changes the logits (max |diff| {err:.3g}); "
             "the polynomial settings do not rebuild the trained model exactly")


def distill(model: str = "tiny", out_dir="out/distill", teacher=None, coeff: float = 0.5,
            seeds: Sequence[int] | None = None, seed: int = 42, recipe: Recipe | str | None = None,
            opts: RunOptions | None = None, fhe=None, student_layers: int | None = None,
            interval_penalty: float = 0.0, guard: bool = True, blend_epochs: float | None = None,
            refit: bool = False, student_hidden: int | None = None, student_init=None,
            epoch_cover: bool = False, softmax: str = "cgf") -> dict:
    """Teacher (given or trained once) -> CGF student per seed; writes ``out_dir/summary.json``.

    ``fhe``: a :class:`cgf_fhe.surgery.FheOptions` (or its dict) to make the student polynomial; ``guard``,
    ``blend_epochs``, ``refit``, ``epoch_cover``: its training aids (see :func:`distill_one`).
    ``student_hidden``: hidden size of a narrow student, ``student_init``: a narrow student checkpoint to start
    from (see :func:`distill_one`, :mod:`.narrow`).
    Returns the summary: student and teacher mean/std and the paired difference student - teacher."""
    opts = opts or RunOptions()
    recipe = _as_recipe(recipe)
    out = Path(out_dir)
    multi = bool(seeds)
    opts = _with_precision(opts, getattr(_fhe_options(fhe), "poly", "none") != "none")
    runs, diverged = {}, {}
    for s, d in _seed_dirs(out, seeds, seed):
        try:
            st = distill_one(model, d, s, teacher, coeff, recipe, opts, fhe, student_layers, interval_penalty,
                             multi=multi, teacher_root=out, guard=guard, blend_epochs=blend_epochs, refit=refit,
                             student_hidden=student_hidden, student_init=student_init, epoch_cover=epoch_cover,
                             softmax=softmax)
        except TrainingDiverged as exc:  # record it and go on with the other seeds; fail at the end
            _log(str(exc))
            diverged[s] = {k: exc.record.get(k) for k in ("epoch", "step", "at", "loss", "parts", "blend")}
            continue
        if st.get("status") != "done":
            return {"status": "partial"}
        runs[s] = st
    if diverged:
        if _is_main(opts) and multi:
            _write_json(out / "summary.json", {"kind": "distill", "status": "diverged", "diverged": diverged,
                                               "finished_seeds": list(runs), "recipe": recipe.to_dict(),
                                               "fhe_options": _options_dict(_fhe_options(fhe))})
        raise TrainingError(f"training diverged (non-finite loss) for seed(s) {', '.join(map(str, diverged))} of "
                            f"{out}: " + "; ".join(f"seed {s}: step {r['step']} (epoch {r['at']:g}"
                                                   + (f", blend {r['blend']:.3g}" if r.get("blend") is not None else "")
                                                   + f"), loss {r['loss']}" for s, r in diverged.items())
                            + f". Each is recorded in <seed dir>/train_state/{DIVERGED_FILE}"
                            + (f"; seed(s) {', '.join(map(str, runs))} finished" if runs else ""))
    student = {s: r["dev"] for s, r in runs.items()}
    ref = {s: r["teacher_dev"] for s, r in runs.items()}
    summary = {
        "kind": "distill", "model": str(model), "softmax": softmax, "coeff": coeff if softmax == "cgf" else None,
        "recipe": recipe.to_dict(), "seeds": list(runs),
        "student": summarize_seeds(student, ref), "teacher": summarize_seeds(ref),
        "seconds_per_epoch": {
            "student": mean_std([r["seconds_per_epoch"] for r in runs.values()]),
            "teacher": mean_std([_teacher_secs(r) for r in runs.values() if _teacher_secs(r) is not None]),
        },
        "fhe_options": _options_dict(_fhe_options(fhe)),
        "student_layers": student_layers, "student_hidden": next(iter(runs.values())).get("student_hidden"),
        "student_init": str(student_init) if student_init else None, "interval_penalty": interval_penalty,
        "poly_training": next(iter(runs.values())).get("poly_training"),
        "runs": {str(s): str(d) for s, d in _seed_dirs(out, seeds, seed)},
        "teachers": {str(s): r["teacher"] for s, r in runs.items()},
    }
    if _is_main(opts):
        _write_json(out / "summary.json", summary)
    _log(format_summary(summary["teacher"], "teacher"))
    _log(format_summary(summary["student"], "student"))
    return summary


def _options_dict(o):
    if o is None:
        return None
    if hasattr(o, "to_dict"):
        return o.to_dict()
    from dataclasses import asdict, is_dataclass

    return asdict(o) if is_dataclass(o) else dict(o)


def _teacher_secs(run: dict):
    try:
        return read_settings(run["teacher"]).get("seconds_per_epoch")
    except CheckpointError:
        return None


# ---------------------------------------------------------------- evaluate / probe / sweep

def _seed_folders(path: Path) -> list[Path]:
    """The ``seed*/`` checkpoints of a ``--seeds`` run folder (empty when ``path`` is itself a checkpoint)."""
    if is_checkpoint(path) or not path.is_dir():
        return []
    return sorted(p.parent for p in path.glob(f"seed*/{SETTINGS_FILE}"))


def _checkpoint_max_length(settings: dict, override: int | None = None) -> int:
    """``override``, else the max length the checkpoint was trained with (its data settings, then its recipe)."""
    return (override or (settings.get("data") or {}).get("max_length")
            or (settings.get("recipe") or {}).get("max_length", 128))


def evaluate_checkpoint(ckpt, softmax: str | None = None, coeff: float | None = None, split: str = "validation",
                        opts: RunOptions | None = None, probe: bool = False, batch_size: int = 64) -> dict:
    """Score a checkpoint: {"accuracy", "f1", "n", "loss", "softmax", "coeff", ...} (+ interval counts for
    polynomial students, + {"probe": {"exact": .., "cgf": ..}} when ``probe``)."""
    from torch.utils.data import DataLoader

    opts = opts or RunOptions()
    ckpt = Path(ckpt)
    if seeds := _seed_folders(ckpt):
        raise TrainingError(f"{ckpt} is a multi-seed run folder ({', '.join(p.name for p in seeds)}); pass one of its "
                            "seed folders")
    model, tok, settings = load_checkpoint(ckpt, softmax, coeff)
    device = get_accelerator(opts.device, "no").device
    model.to(device)
    max_length = _checkpoint_max_length(settings, opts.max_length)
    run_opts = RunOptions(**{**opts.__dict__, "max_length": max_length})
    ds = load_split(tok, split, run_opts, None, opts.max_eval_samples)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collator(tok))
    fhe = settings.get("fhe")
    if fhe:
        surgery = _surgery()
        surgery.reset_interval_counters(model)
    m = evaluate_model(model, loader, device)
    out = {**m, "checkpoint": str(ckpt), "split": split, "softmax": model.config.cgf_softmax,
           "coeff": float(model.config.cgf_coeff) if model.config.cgf_softmax == "cgf" else None,
           "max_length": max_length, "polynomial": bool(fhe)}
    if fhe:
        out["intervals"] = surgery.interval_report(model)
    if probe:
        out["probe"] = probe_softmax(model, loader, coeff if coeff is not None else settings.get("coeff"), device)
    return out


def sweep(model: str = "tiny", coeffs: Iterable[float] = (0.5, 0.65, 0.8), out_dir="out/sweep",
          seeds: Sequence[int] = (42,), recipe: Recipe | str | None = None, opts: RunOptions | None = None,
          with_exact: bool = False) -> dict:
    """CE-only CGF fine-tunes per coefficient (and optionally an exact reference on the same seeds)."""
    opts = opts or RunOptions()
    recipe = _as_recipe(recipe)
    out = Path(out_dir)
    seeds = [int(s) for s in seeds]
    reference = None
    rows = []
    if with_exact:
        ex = finetune_seeds(model, out / "exact", seeds, "exact", None, recipe, opts)
        if ex.get("status") == "partial":
            return ex
        reference = out / "exact"
        rows.append({"softmax": "exact", "coeff": None, "accuracy": ex["accuracy"], "f1": ex["f1"]})
    for c in coeffs:
        summ = finetune_seeds(model, out / f"c{c:g}", seeds, "cgf", float(c), recipe, opts, reference)
        if summ.get("status") == "partial":
            return summ
        rows.append({"softmax": "cgf", "coeff": float(c), "accuracy": summ["accuracy"], "f1": summ["f1"]})
    result = {"kind": "sweep", "model": str(model), "seeds": seeds, "recipe": recipe.to_dict(), "rows": rows}
    if _is_main(opts):
        _write_json(out / "sweep.json", result)
    _log(format_sweep(result))
    return result


def format_sweep(result: dict) -> str:
    head = f"{'softmax':<8} {'coeff':>6}  {'accuracy':>18}  {'f1':>18}  {'paired diff acc':>18}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        a, f = r["accuracy"], r["f1"]
        d = a.get("paired_diff")
        diff = f"{d['mean']:+.4f} +- {d['std']:.4f}" if d else ""
        c = f"{r['coeff']:g}" if r["coeff"] is not None else "-"
        lines.append(f"{r['softmax']:<8} {c:>6}  {a['mean']:.4f} +- {a['std']:.4f}  {f['mean']:.4f} +- {f['std']:.4f}"
                     f"  {diff:>18}")
    return "\n".join(lines)


def cover(ckpt, out_dir, opts: RunOptions | None = None, batch_size: int = 64) -> dict:
    """Widen the intervals a trained polynomial student's inputs leave (see :func:`cgf_fhe.surgery.cover_ranges`).

    During distillation the guard clamps every polynomial input into its interval, so training never sees
    what the exported (unclamped) polynomials do to the few inputs that drift outside: a Newton LayerNorm
    fed a variance past its interval diverges and the NaN spreads to every later layer. ``cover`` measures
    the ranges on the training data in the training form (guard on: each op sees the inputs a sane upstream
    gives it), refits only the ops whose range exceeds their interval, on the union of both (same degree;
    Newton LayerNorm may take more steps), and saves the student with the new intervals to ``out_dir``.
    The weights are unchanged. ``ckpt``: a polynomial student, or a ``--seeds`` folder (each ``seed*/``).
    Returns the saved settings (``cover``: the refitted ops, old/new intervals and depths, dev before/after)."""
    from torch.utils.data import DataLoader

    opts = opts or RunOptions()
    ckpt, out = Path(ckpt), Path(out_dir)
    if seeds := _seed_folders(ckpt):
        return {"kind": "cover-set", "runs": {sub.name: cover(sub, out / sub.name, opts, batch_size) for sub in seeds}}
    if out.resolve() == ckpt.resolve():
        raise TrainingError(f"cover: -o {out} is the input checkpoint; write the covered student elsewhere")
    model, tok, settings = load_checkpoint(ckpt)
    if not settings.get("fhe"):
        raise TrainingError(f"cover: {ckpt} is not a polynomial student (no 'fhe' in its {SETTINGS_FILE}); "
                            "make one with distill --poly all")
    if settings.get("status") != "done":
        raise TrainingError(f"cover: {ckpt} is not finished (status {settings.get('status')!r})")
    if opts.resume and (done := _done(out)) is not None and (done.get("cover") or {}).get("source") == str(ckpt.resolve()):
        _log(f"[cover] {out} is already covered from {ckpt}; skipping")
        return done
    surgery = _surgery()
    device = get_accelerator(opts.device, "no").device
    model.to(device)
    run_opts = RunOptions(**{**opts.__dict__, "max_length": _checkpoint_max_length(settings)})
    train = load_split(tok, "train", run_opts, None, opts.max_train_samples)
    dev = load_split(tok, "validation", run_opts, None, opts.max_eval_samples)
    collate = collator(tok)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=False, collate_fn=collate)
    dev_loader = DataLoader(dev, batch_size=batch_size, shuffle=False, collate_fn=collate)
    surgery.reset_interval_counters(model)
    before = evaluate_model(model, dev_loader, device)
    dev_report_before = surgery.interval_report(model)
    depth_before = surgery.model_depth(model).get("total")
    _log(f"[cover] {ckpt}: measuring ranges on {len(train)} training examples (training form, guard on)")
    surgery.set_guard(model, True)
    try:
        ranges = surgery.calibrate(model, train_loader, device=str(device), max_batches=opts.calib_batches,
                                   progress=opts.progress)
    finally:
        surgery.set_guard(model, False)
    try:
        changed = surgery.cover_ranges(model, ranges)
    except ValueError as exc:
        raise TrainingError(f"cover: {ckpt}: {exc}") from None
    surgery.reset_interval_counters(model)
    after = evaluate_model(model, dev_loader, device)
    dev_report = surgery.interval_report(model)
    depth_after = surgery.model_depth(model).get("total")
    for key, c in changed.items():
        _log(f"[cover]   {key}: interval [{c['old'][0]:.4g}, {c['old'][1]:.4g}] -> [{c['new'][0]:.4g}, "
             f"{c['new'][1]:.4g}] (measured [{c['measured'][0]:.4g}, {c['measured'][1]:.4g}]), depth "
             f"{c['depth_old']} -> {c['depth_new']}")
    _log(f"[cover] dev accuracy {before['accuracy']:.4f} ({before['n_nonfinite']} non-finite) -> "
         f"{after['accuracy']:.4f} ({after['n_nonfinite']} non-finite); depth {depth_before} -> {depth_after}; "
         f"{len(changed)} ops refitted")
    new = dict(settings)
    fhe = surgery.fhe_settings(model, (settings.get("fhe") or {}).get("calibration"))
    fhe["calibration_cover"] = ranges
    new.update({
        "fhe": fhe, "dev": after, "dev_final": after, "interval_report": dev_report,
        "cover": {"source": str(ckpt.resolve()), "n_train": len(train), "changed": changed,
                  "dev_before": before, "interval_report_before": dev_report_before,
                  "depth_before": depth_before, "depth_after": depth_after},
    })
    new.pop("interval_report_train", None)  # measured on the uncovered student
    if _is_main(opts):
        save_checkpoint(model, tok, out, new)
        _reload_check(model, out, dev_loader, device)
        from .narrow import PROJ_FILE

        if (ckpt / PROJ_FILE).is_file():  # narrow students carry their projection along
            shutil.copy2(ckpt / PROJ_FILE, out / PROJ_FILE)
    return new
