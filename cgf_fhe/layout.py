"""The run-folder layout, described once (light: no torch import).

A checkpoint is a folder with :data:`SETTINGS_FILE` (``cgf_fhe.json``) next to the model weights and tokenizer.

* one seed: the output folder is the checkpoint;
* a seed set (``--seeds``): ``<out>/seed<S>/`` per seed (:func:`seed_dir`) + ``<out>/summary.json``;
* distillation: the teacher it trains is ``<out>/teacher/`` (one seed) or ``<out>/teacher/seed<S>/`` (a seed set);
* a coefficient sweep: ``<out>/c<coeff>/seed<S>/`` + ``<out>/sweep.json``;
* an unfinished run keeps its resumable state in ``<checkpoint>/train_state/``.

Where a seed's checkpoint is expected, either a checkpoint or a seed-set folder holding ``seed<S>/`` is accepted
(:func:`seed_checkpoint`). The tokenizer max length of a checkpoint is :func:`max_length`'s fallback chain.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

SETTINGS_FILE = "cgf_fhe.json"  # the same name as cgf_fhe.models.SETTINGS_FILE
SEED_PREFIX = "seed"
SUMMARY_FILE = "summary.json"
SWEEP_FILE = "sweep.json"
TEACHER_DIR = "teacher"
STATE_DIR = "train_state"
DEFAULT_MAX_LENGTH = 128


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SETTINGS_FILE).is_file()


def seed_dir(root: str | os.PathLike, seed: int) -> Path:
    """``root/seed<S>``: seed ``seed``'s folder in a seed set."""
    return Path(root) / f"{SEED_PREFIX}{int(seed)}"


def seed_dirs(root: str | os.PathLike, seeds: Sequence[int] | None, seed: int) -> list[tuple[int, Path]]:
    """``[(seed, folder)]`` of a run: per-seed folders when a seed list is given, else ``root`` itself."""
    if seeds:
        return [(int(s), seed_dir(root, s)) for s in seeds]
    return [(int(seed), Path(root))]


def seed_folders(path: str | os.PathLike) -> list[Path]:
    """The ``seed*/`` checkpoints of a seed-set folder, sorted by name (empty when ``path`` is itself a checkpoint
    or not a folder)."""
    path = Path(path)
    if is_checkpoint(path) or not path.is_dir():
        return []
    return sorted(p.parent for p in path.glob(f"{SEED_PREFIX}*/{SETTINGS_FILE}"))


def seed_checkpoint(path: str | os.PathLike, seed: int) -> Path | None:
    """``path`` if it is a checkpoint, else its ``seed<S>/`` if that is one, else None."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    if is_checkpoint(seed_dir(path, seed)):
        return seed_dir(path, seed)
    return None


def teacher_dir(root: str | os.PathLike, seed: int, multi: bool) -> Path:
    """Where a distillation run trains its own teacher for ``seed``."""
    base = Path(root) / TEACHER_DIR
    return seed_dir(base, seed) if multi else base


def state_dir(ckpt: str | os.PathLike) -> Path:
    return Path(ckpt) / STATE_DIR


def max_length(settings: dict, override: int | None = None, metadata: dict | None = None) -> int:
    """The tokenizer max length for a checkpoint: ``override``, else the exported model's ``metadata``, else the
    settings' top-level ``max_length``, its data settings', its recipe's, else :data:`DEFAULT_MAX_LENGTH`."""
    settings = settings or {}
    return int(override or (metadata or {}).get("max_length") or settings.get("max_length")
               or (settings.get("data") or {}).get("max_length") or (settings.get("recipe") or {}).get("max_length")
               or DEFAULT_MAX_LENGTH)
