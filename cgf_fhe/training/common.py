"""What the training stage's commands share: run options, data, settings of finished runs, multi-process
helpers (see :mod:`.api` for the public API)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .. import layout
from ..data import holdout_split, load_mrpc, tokenize_split
from ..models import CheckpointError, is_checkpoint, load_checkpoint, read_settings, SETTINGS_FILE
from .engine import clear_state, get_accelerator, resolve_precision
from .evaluate import model_inputs
from .recipes import Recipe, get_recipe

STATE_SUBDIR = layout.STATE_DIR  # <checkpoint>/train_state/: the resumable state of an unfinished run
FHE_STATE_FILE = "fhe_settings.json"  # in it: a polynomial student's settings (restored on resume)


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
    _write_json(ckpt / SETTINGS_FILE, s)  # atomic: a kill never leaves a truncated settings file
    return s


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def _seed_dirs(out_dir: Path, seeds: Sequence[int] | None, seed: int):
    """[(seed, dir)]: per-seed subfolders when a seed list is given, else out_dir itself."""
    return layout.seed_dirs(out_dir, seeds, seed)


def _finish(ckpt: Path, state_dir: Path, opts: RunOptions) -> None:
    if not opts.keep_state and _is_main(opts):
        clear_state(state_dir)
        try:
            state_dir.rmdir()
        except OSError:
            pass


def _surgery():
    try:
        from .. import surgery
    except ImportError as exc:
        raise TrainingError(f"--poly/--student-layers need cgf_fhe.surgery, which cannot be imported: {exc}") from exc
    return surgery


def _seed_checkpoint(path: Path, seed: int, flag: str) -> Path:
    """``path`` itself if it is a checkpoint, else its ``seed<seed>/`` (a seed-set folder written by ``--seeds``)."""
    found = layout.seed_checkpoint(path, seed)
    if found is None:
        sub = layout.seed_dir(path, seed)
        raise TrainingError(f"{flag} {path}: neither a cgf-fhe checkpoint nor a folder with {sub.name}/ "
                            f"(expected {path / SETTINGS_FILE} or {sub / SETTINGS_FILE})")
    return found


def _fhe_options(fhe) -> object | None:
    if fhe is None:
        return None
    surgery = _surgery()
    if isinstance(fhe, dict):
        return surgery.FheOptions.from_dict(fhe) if hasattr(surgery.FheOptions, "from_dict") else surgery.FheOptions(**fhe)
    return fhe


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


def _options_dict(o):
    if o is None:
        return None
    if hasattr(o, "to_dict"):
        return o.to_dict()
    from dataclasses import asdict, is_dataclass

    return asdict(o) if is_dataclass(o) else dict(o)


def _seed_folders(path: Path) -> list[Path]:
    """The ``seed*/`` checkpoints of a ``--seeds`` run folder (empty when ``path`` is itself a checkpoint)."""
    return layout.seed_folders(path)


def _checkpoint_max_length(settings: dict, override: int | None = None) -> int:
    """``override``, else the max length the checkpoint was trained with (see :func:`cgf_fhe.layout.max_length`)."""
    return layout.max_length(settings, override)
