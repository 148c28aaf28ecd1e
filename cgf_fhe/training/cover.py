"""Finished checkpoints: scoring (:func:`evaluate_checkpoint`) and widening a polynomial student's intervals
(:func:`cover`)."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..models import load_checkpoint, save_checkpoint, SETTINGS_FILE
from .engine import get_accelerator
from .evaluate import evaluate_model, probe_softmax
from .common import (RunOptions, TrainingError, _checkpoint_max_length, _done, _is_main, _log, _reload_check,
                     _seed_folders, _surgery, collator, load_split)


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
    _log_cover(changed, before, after, depth_before, depth_after)
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


def _log_cover(changed: dict, before: dict, after: dict, depth_before, depth_after) -> None:
    for key, c in changed.items():
        _log(f"[cover]   {key}: interval [{c['old'][0]:.4g}, {c['old'][1]:.4g}] -> [{c['new'][0]:.4g}, "
             f"{c['new'][1]:.4g}] (measured [{c['measured'][0]:.4g}, {c['measured'][1]:.4g}]), depth "
             f"{c['depth_old']} -> {c['depth_new']}")
    _log(f"[cover] dev accuracy {before['accuracy']:.4f} ({before['n_nonfinite']} non-finite) -> "
         f"{after['accuracy']:.4f} ({after['n_nonfinite']} non-finite); depth {depth_before} -> {depth_after}; "
         f"{len(changed)} ops refitted")
