"""Python API of the training stage (the CLI in :mod:`cgf_fhe.training.cli` is a thin layer over it).

Where things live: :mod:`.seeds` (fine-tuning one seed or a seed set, the teachers distillation trains, the
coefficient sweep), :mod:`.distill` (distillation as a plan plus named steps), :mod:`.cover` (scoring and
covering finished checkpoints), :mod:`.common` (run options, data, settings of finished runs), :mod:`.engine`
(the training loop). This module gathers their public names.

Output layout (described once in :mod:`cgf_fhe.layout`)
-------------------------------------------------------
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

from ..models import read_settings, resolve_model, save_checkpoint  # noqa: F401  (re-exported)
from .common import (FHE_STATE_FILE, STATE_SUBDIR, RunOptions, TrainingError, _seed_checkpoint,  # noqa: F401
                     _surgery, collator, load_data, load_split)
from .cover import cover, evaluate_checkpoint  # noqa: F401
from .distill import (DistillPlan, Student, distill, distill_one, finalize_student, fit_student,  # noqa: F401
                      init_student, plan_distill, polynomialize_student)
from .recipes import Recipe, get_recipe  # noqa: F401
from .seeds import finetune, finetune_seeds, format_sweep, sweep  # noqa: F401
