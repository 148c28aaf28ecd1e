"""Distillation as a plan plus named steps.

:func:`distill_one` (one seed) = :func:`plan_distill` (check the options, fix the settings; no weights touched),
the teacher (given, or trained once by :func:`.seeds._ensure_teacher`), then the steps :func:`init_student`,
:func:`polynomialize_student` (polynomial students only), :func:`fit_student` and :func:`finalize_student`.
:func:`distill` runs it over a seed set and writes the summary."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .. import __version__, layout
from ..memory import limited_heap_fragmentation
from ..models import CheckpointError, load_checkpoint, read_settings, save_checkpoint, SETTINGS_FILE
from ..softmax import fix_head_coeffs, train_head_coeffs
from . import engine
from .engine import DIVERGED_FILE, KDStep, TrainingDiverged, clear_state, get_accelerator, set_dropout
from .evaluate import evaluate_model, model_inputs, summarize_seeds, format_summary, mean_std
from .poly_train import StudentSchedule
from .recipes import Recipe
from .common import (FHE_STATE_FILE, RunOptions, STATE_SUBDIR, TrainingError, _as_recipe, _backbone_of, _barrier,
                     _fhe_options, _finish, _is_main, _log, _options_dict, _reload_check, _run_key, _seed_checkpoint,
                     _seed_dirs, _select_settings, _skip_finished, _surgery, _with_precision, _write_json, collator,
                     load_data)
from .seeds import _ensure_teacher, _teacher_dir


@dataclass
class DistillPlan:
    """What one seed's distillation will do, decided and checked before any weights are touched
    (:func:`plan_distill`); the named steps of :func:`distill_one` read it."""
    model: str | None
    out: Path
    seed: int
    coeff: float
    softmax: str
    recipe: Recipe
    opts: RunOptions
    tdir: Path  # the teacher checkpoint of this seed
    teacher_given: bool  # by the user (else trained here once, into tdir)
    fhe_opts: object | None
    poly: bool
    schedule: StudentSchedule | None
    student_layers: int | None
    student_hidden: int | None
    student_init: Path | None
    interval_penalty: float
    settings: dict  # the checkpoint settings so far (what identifies the run)

    @property
    def state_dir(self) -> Path:
        return self.out / STATE_SUBDIR

    @property
    def tag(self) -> str:
        return ((f"distill c={self.coeff:g}" if self.softmax == "cgf" else "distill exact")
                + (" poly" if self.poly else "") + f" seed {self.seed}")


@dataclass
class Student:
    """The student being distilled and what came with its initialisation."""
    model: object
    layer_map: list
    projection: dict | None = None  # narrow students: P and its description
    coeff_heads: dict | None = None  # what to record about per-head / trained CGF coefficients
    coeff_start: list | None = None  # trained coefficients: where they start
    fhe_settings: dict | None = None  # polynomial students: the settings after polynomialize


def plan_distill(model: str, out_dir, seed: int = 42, teacher=None, coeff: float = 0.5,
                 recipe: Recipe | str | None = None, opts: RunOptions | None = None, fhe=None,
                 student_layers: int | None = None, interval_penalty: float = 0.0, multi: bool = False,
                 teacher_root: Path | None = None, guard: bool = True, blend_epochs: float | None = None,
                 refit: bool = False, student_hidden: int | None = None, student_init=None,
                 epoch_cover: bool = False, softmax: str = "cgf") -> DistillPlan:
    """Check the options of :func:`distill_one` against each other and fix the run's settings."""
    recipe = _as_recipe(recipe)
    out = Path(out_dir)
    tdir, given = _teacher_dir(teacher, teacher_root if teacher_root is not None else out, seed, multi)
    fhe_opts = _fhe_options(fhe)
    poly = fhe_opts is not None and getattr(fhe_opts, "poly", "none") != "none"
    opts = _with_precision(opts or RunOptions(), poly)
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
    return DistillPlan(model=model, out=out, seed=int(seed), coeff=coeff, softmax=softmax, recipe=recipe, opts=opts,
                       tdir=tdir, teacher_given=given, fhe_opts=fhe_opts, poly=poly, schedule=schedule,
                       student_layers=student_layers, student_hidden=student_hidden, student_init=student_init,
                       interval_penalty=interval_penalty, settings=settings)


def init_student(plan: DistillPlan, t_model, train, collate) -> Student:
    """Step 1: the student's weights (the teacher's, a shallower copy, a narrow random init or ``--student-init``)
    and CGF coefficients (one, per head, or trainable)."""
    n_teacher_layers = t_model.config.num_hidden_layers
    layer_map, projection = list(range(n_teacher_layers)), None
    if plan.student_hidden is not None:
        student, layer_map, projection = _narrow_student(t_model, plan.tdir, plan.student_hidden, plan.student_layers,
                                                         plan.coeff, plan.seed, train, collate, plan.recipe,
                                                         plan.opts, plan.state_dir, plan.student_init, plan.poly)
    elif plan.student_init is not None:
        student, layer_map = _full_width_init(plan.student_init, t_model, plan.tdir, plan.coeff)
    else:
        student, _, _ = load_checkpoint(plan.tdir, softmax=plan.softmax,
                                        coeff=plan.coeff if plan.softmax == "cgf" else None)
        k = plan.student_layers
        if k is not None and k != n_teacher_layers:
            try:
                layer_map = [int(i) for i in _surgery().shrink_layers(student, int(k))]
            except ValueError as exc:
                raise TrainingError(f"--student-layers {k}: {exc}") from None
    recipe = plan.recipe
    coeff_heads = _coeff_per_head(student, train, collate, recipe, plan.opts) if recipe.coeff_per_head else None
    if coeff_heads is not None:
        plan.settings["coeff_heads"] = coeff_heads
    if recipe.coeff_lr and coeff_heads is None:  # where the trained coefficients start
        coeff_heads = {"source": "student init" if getattr(student.config, "cgf_coeff_heads", None) else "--coeff"}
    coeff_start = train_head_coeffs(student) if recipe.coeff_lr else None
    student.train()
    return Student(student, layer_map, projection, coeff_heads, coeff_start)


def polynomialize_student(plan: DistillPlan, student: Student, train, collate) -> None:
    """Step 2 (polynomial students): calibrate the ranges on the training data and replace every non-linearity
    (or restore the polynomials of an interrupted run); the schedule gets the data its refit calibrates on."""
    from torch.utils.data import DataLoader

    surgery, opts, recipe = _surgery(), plan.opts, plan.recipe
    if recipe.poly_dropout is not None:
        set_dropout(student.model, recipe.poly_dropout)
    saved = plan.state_dir / FHE_STATE_FILE
    device = get_accelerator(opts.device, opts.mixed_precision).device
    if opts.resume and saved.is_file():
        student.fhe_settings = json.loads(saved.read_text())
        surgery.apply_fhe_settings(student.model, student.fhe_settings)
        _log(f"[distill] resume: polynomial settings restored from {saved}")
    else:
        student.model.to(device)
        calib_loader = DataLoader(train, batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=collate)
        n_cal = len(train) if opts.calib_batches is None else min(len(train), opts.calib_batches * recipe.eval_batch_size)
        _log(f"[distill] calibrating ranges on {n_cal} training examples")
        ranges = surgery.calibrate(student.model, calib_loader, device=str(device), max_batches=opts.calib_batches,
                                   progress=opts.progress)
        student.fhe_settings = surgery.polynomialize(student.model, plan.fhe_opts, ranges)
        if _is_main(opts):
            plan.state_dir.mkdir(parents=True, exist_ok=True)
            _write_json(saved, student.fhe_settings)
        _barrier(opts)
    plan.schedule.attach(DataLoader(train, batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=collate),
                         device, opts.calib_batches, opts.progress)


def fit_student(plan: DistillPlan, student: Student, t_model, train, dev, select, collate):
    """Step 3: KD from the frozen teacher (see :class:`.engine.KDStep`) under the plan's schedule."""
    recipe, opts = plan.recipe, plan.opts
    penalty_fn = _surgery().interval_penalty if plan.interval_penalty else None
    projection = student.projection
    step = KDStep(t_model, student.layer_map, alpha=recipe.kd_alpha, beta=recipe.kd_beta, T=recipe.kd_temperature,
                  ce_weight=recipe.kd_ce_weight, penalty_weight=plan.interval_penalty, penalty_fn=penalty_fn,
                  teacher_proj=projection["P"] if projection else None, attn_weight=recipe.kd_attn_weight)
    return engine.fit(student.model, step, train, dev, collate, recipe, seed=plan.seed, state_dir=plan.state_dir,
                      resume=opts.resume, device=opts.device, mixed_precision=opts.mixed_precision,
                      progress=opts.progress, stop_after=opts.stop_after, desc=plan.tag,
                      run_info=_run_key(plan.settings), schedule=plan.schedule, select_dataset=select)


def finalize_student(plan: DistillPlan, student: Student, res, t_model, t_settings: dict, tok, train, dev, select,
                     collate) -> dict:
    """Step 4: the trained student in its exported form, its settings (metrics, teacher's dev on the same set,
    polynomial reports) and the saved checkpoint (checked by reloading it)."""
    from torch.utils.data import DataLoader

    settings, model, tag = plan.settings, student.model, plan.tag
    if student.coeff_start is not None:  # the trained coefficients (of the best checkpoint) become constants
        settings["coeff_heads"] = {**(student.coeff_heads or {}), "coeffs": fix_head_coeffs(model),
                                   "start": student.coeff_start, "trained": True}
        _log(f"[{tag}] trained CGF coefficients: {_range_text(settings['coeff_heads']['coeffs'])} "
             f"(started at {_range_text(student.coeff_start)})")
    if plan.schedule is not None:
        plan.schedule.finish(model)  # the exported form: guard off, blend 1 (what the dev metrics measured)
    device = next(model.parameters()).device
    dev_loader = DataLoader(dev, batch_size=plan.recipe.eval_batch_size, shuffle=False, collate_fn=collate)
    teacher_dev = evaluate_model(t_model.to(device), dev_loader, device)  # same eval set as the student
    settings.update({
        "status": "done", "dev": res.best_metrics, "best_epoch": res.best_epoch, "best_at": res.best_at,
        "history": res.history, "seconds_per_epoch": res.seconds_per_epoch,
        "backbone": _backbone_of(model) or t_settings.get("backbone"), "teacher_dev": teacher_dev,
        "layer_map": student.layer_map, "student_layers": model.config.num_hidden_layers,
        **_select_settings(res, select),
    })
    if student.projection is not None:
        settings["projection"] = {k: v for k, v in student.projection.items() if k != "P"}
    if student.fhe_settings is not None:
        settings["fhe"] = _trained_fhe_settings(plan, student, res)
        settings.update(_poly_reports(model, _surgery(), train, dev_loader, collate, plan.recipe, plan.opts, device,
                                      res.best_metrics, tag))
    if _is_main(plan.opts):
        _save_student(plan, student, tok, t_model, dev_loader, device)
    _barrier(plan.opts)
    return settings


def _trained_fhe_settings(plan: DistillPlan, student: Student, res) -> dict:
    """The trained polynomial modules' settings (+ the calibration, the refit's, what each epoch cover widened)."""
    surgery, schedule = _surgery(), plan.schedule
    fhe_settings = student.fhe_settings
    if hasattr(surgery, "fhe_settings"):  # the trained modules' current state (+ the calibration)
        fhe_settings = surgery.fhe_settings(student.model, fhe_settings.get("calibration"))
    if schedule.refit_result is not None:  # the exp/GELU/tanh intervals come from this re-calibration
        fhe_settings["calibration_refit"] = schedule.refit_result["ranges"]
        fhe_settings["refit_step"] = schedule.refit_result["step"]
    if schedule.epoch_cover:  # which intervals each epoch's cover widened
        fhe_settings["epoch_cover"] = [{"epoch": m.get("at", h["epoch"]), "widened": sorted(m.get("covered") or {})}
                                       for h in res.history for m in [*h.get("mid_evals", []), h]]
    return fhe_settings


def _save_student(plan: DistillPlan, student: Student, tok, t_model, dev_loader, device) -> None:
    out, projection, model = plan.out, student.projection, student.model
    save_checkpoint(model, tok, out, plan.settings)
    if projection is not None:
        from .narrow import PROJ_FILE, save_projection

        save_projection(projection["P"], out / PROJ_FILE,
                        {"method": projection["method"],
                         "explained_second_moment": projection["explained_second_moment"]})
        if not plan.opts.keep_state:
            (plan.state_dir / PROJ_FILE).unlink(missing_ok=True)
    if plan.poly or projection is not None or student.layer_map != list(range(t_model.config.num_hidden_layers)):
        _reload_check(model, out, dev_loader, device)
    _finish(out, plan.state_dir, plan.opts)


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
    and out-of-interval counts are stored for train (``interval_report_train``) and dev (``interval_report``).
    On Linux/glibc that post-training phase runs with the mmap threshold pinned at 128 KiB, unless
    ``MALLOC_MMAP_THRESHOLD_`` is set (:func:`cgf_fhe.memory.limited_heap_fragmentation`): freed tensor buffers
    then no longer fragment the heap (a 6-layer MiniLM student's calibration reached 13.3 GB RSS with ~79 MiB
    of live tensors), at the price of more page faults (CPU time)."""
    plan = plan_distill(model, out_dir, seed, teacher, coeff, recipe, opts, fhe, student_layers, interval_penalty,
                        multi, teacher_root, guard, blend_epochs, refit, student_hidden, student_init, epoch_cover,
                        softmax)
    if not plan.teacher_given:
        ts = _ensure_teacher(model, plan.tdir, plan.seed, plan.recipe, plan.opts)
        if ts.get("status") != "done":
            return {"status": "partial", "teacher": str(plan.tdir)}
    if plan.opts.resume and (s := _skip_finished(plan.out, plan.settings, "distill")):
        return s
    t_model, tok, t_settings = load_checkpoint(plan.tdir, softmax="exact")
    train, dev, select = load_data(tok, plan.opts, plan.recipe, with_select=True)
    collate = collator(tok)
    if not plan.opts.resume:
        clear_state(plan.state_dir)
    student = init_student(plan, t_model, train, collate)
    if plan.poly:
        polynomialize_student(plan, student, train, collate)
    res = fit_student(plan, student, t_model, train, dev, select, collate)
    if not res.completed:
        _log(f"[{plan.tag}] stopped after epoch {len(res.history)}/{plan.recipe.epochs}; continue with --resume")
        return {**plan.settings, "status": "partial", "history": res.history}
    return finalize_student(plan, student, res, t_model, t_settings, tok, train, dev, select, collate)


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
    with limited_heap_fragmentation():  # glibc: keeps RSS from growing batch after batch (cgf_fhe.memory)
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
            _write_json(out / layout.SUMMARY_FILE, {"kind": "distill", "status": "diverged", "diverged": diverged,
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
        _write_json(out / layout.SUMMARY_FILE, summary)
    _log(format_summary(summary["teacher"], "teacher"))
    _log(format_summary(summary["student"], "student"))
    return summary


def _teacher_secs(run: dict):
    try:
        return read_settings(run["teacher"]).get("seconds_per_epoch")
    except CheckpointError:
        return None
