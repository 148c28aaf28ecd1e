"""GLUE/MRPC data: a local folder of GLUE TSVs or the `datasets` hub, tokenized in pairs.

Source selection (first that is given wins): ``data_dir`` argument (CLI ``--data-dir``), the
environment variable ``CGF_FHE_DATA_DIR``, the hub (``datasets.load_dataset("glue", "mrpc")``).
The local format is the GLUE one: tab-separated, header ``label sentence1 sentence2 idx``, and
**no quoting at all** (sentences contain ``"``), so it is read with ``quoting=csv.QUOTE_NONE``.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import DataCollatorWithPadding

ENV_VAR = "CGF_FHE_DATA_DIR"
COLUMNS = ("label", "sentence1", "sentence2", "idx")
SPLITS = ("train", "validation")


from .errors import DataError  # noqa: E402  (re-exported)


def read_glue_tsv(path: str | Path) -> datasets.Dataset:
    """Read one GLUE MRPC TSV (no quoting) into a `datasets.Dataset` with columns label/sentence1/sentence2/idx."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MRPC split file not found: {path}")
    rows = {name: [] for name in COLUMNS}
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != list(COLUMNS):
            raise DataError(f"{path}: expected header {list(COLUMNS)} (tab-separated), got {header!r}")
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(COLUMNS):
                raise DataError(f"{path}:{lineno}: expected {len(COLUMNS)} tab-separated fields, got {len(row)}")
            try:
                label, idx = int(row[0]), int(row[3])
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: label and idx must be integers ({exc})") from None
            if label not in (0, 1):
                raise DataError(f"{path}:{lineno}: label must be 0 or 1, got {label}")
            rows["label"].append(label)
            rows["sentence1"].append(row[1])
            rows["sentence2"].append(row[2])
            rows["idx"].append(idx)
    if not rows["label"]:
        raise DataError(f"{path}: no examples (only the header line); MRPC {path.stem} needs at least one row")
    return datasets.Dataset.from_dict(rows)


MIN_PAIR_LENGTH = 5  # [CLS] s1 [SEP] s2 [SEP] with at least one token of each sentence
MAX_POSITIONS = 512  # BERT-family position embeddings


def check_max_length(value: int | None, flag: str = "--max-length") -> int | None:
    """Refuse a tokenizer length that cannot hold a sentence pair; warn (stderr) on legal but odd ones."""
    import sys

    from .errors import UserError

    if value is None:
        return None
    if value < MIN_PAIR_LENGTH:
        raise UserError(f"{flag} {value} is too short for a sentence pair ([CLS] s1 [SEP] s2 [SEP] needs a few "
                        f"tokens of each sentence): use at least {MIN_PAIR_LENGTH} (MRPC pairs average ~50 tokens)")
    if value > MAX_POSITIONS:
        print(f"warning: {flag} {value} exceeds the {MAX_POSITIONS} positions BERT-family models have; pairs are "
              "cut there anyway", file=sys.stderr)
    elif value < 16:
        print(f"warning: {flag} {value} truncates most MRPC pairs (they average ~50 tokens); accuracy will suffer",
              file=sys.stderr)
    return value


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The local folder to read, or None to use the hub."""
    if data_dir:
        return Path(data_dir)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else None


def load_mrpc(data_dir: str | Path | None = None) -> datasets.DatasetDict:
    """Load MRPC train/validation from a local GLUE folder or the hub; one clear error if neither works."""
    local = resolve_data_dir(data_dir)
    if local is not None:
        origin = "--data-dir" if data_dir else f"${ENV_VAR}"
        if not local.is_dir():
            raise DataError(
                f"MRPC data folder {str(local)!r} (from {origin}) does not exist. Pass --data-dir with a folder "
                f"holding train.tsv and validation.tsv, set {ENV_VAR}, or leave both unset to use the "
                "`datasets` hub (glue/mrpc)."
            )
        return datasets.DatasetDict({s: read_glue_tsv(local / f"{s}.tsv") for s in SPLITS})
    try:
        ds = datasets.load_dataset("glue", "mrpc")
    except Exception as exc:  # offline, no cache, ...
        raise DataError(
            "Could not load MRPC: no --data-dir given, no $CGF_FHE_DATA_DIR set, and the `datasets` hub "
            f"(glue/mrpc) failed: {type(exc).__name__}: {exc}"
        ) from exc
    return datasets.DatasetDict({s: ds[s] for s in SPLITS})


def swap_pairs(ds: datasets.Dataset) -> datasets.Dataset:
    """``ds`` followed by every row with sentence1 and sentence2 exchanged (for symmetric pair labels)."""
    swapped = ds.rename_columns({"sentence1": "_s2", "sentence2": "sentence1"}).rename_column("_s2", "sentence2")
    return datasets.concatenate_datasets([ds, swapped.cast(ds.features)])


HOLDOUT_SEED = 0  # the same held-out examples for every training seed (paired comparisons stay paired)


def holdout_split(ds: datasets.Dataset, fraction: float, seed: int = HOLDOUT_SEED):
    """``(rest, held)``: a label-stratified ``fraction`` of ``ds`` held out (e.g. from training, for selecting
    the best checkpoint without looking at dev). Deterministic in ``seed``; both parts keep ``ds``'s order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(ds["label"])
    rng = np.random.default_rng(seed)
    held = []
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        k = int(round(fraction * len(idx)))
        held.extend(rng.permutation(idx)[:k].tolist())
    held_set = set(held)
    if not held_set or len(held_set) == len(ds):
        raise ValueError(f"holdout fraction {fraction} of {len(ds)} examples leaves an empty part")
    rest = [i for i in range(len(ds)) if i not in held_set]
    return ds.select(rest), ds.select(sorted(held_set))


def tokenize_split(ds: datasets.Dataset, tokenizer, max_length: int = 128, max_samples: int | None = None,
                   swap: bool = False):
    """Pair-tokenize (sentence1, sentence2) with truncation; padding is left to the collator (dynamic).

    ``swap``: append the swapped pairs (see :func:`swap_pairs`), after ``max_samples`` is applied."""
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    if swap:
        ds = swap_pairs(ds)

    def enc(batch):
        out = tokenizer(batch["sentence1"], batch["sentence2"], truncation=True, max_length=max_length)
        out["labels"] = batch["label"]
        return out

    keep = ("input_ids", "token_type_ids", "attention_mask", "labels")
    ds = ds.map(enc, batched=True, desc=None)
    ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
    ds.set_format("torch")
    return ds


def make_loader(ds, tokenizer, batch_size: int, shuffle: bool, seed: int = 0, pad_to_multiple_of: int | None = None):
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=gen)


def load_tokenized(tokenizer, data_dir=None, max_length=128, max_train_samples=None, max_eval_samples=None):
    raw = load_mrpc(data_dir)
    return (
        tokenize_split(raw["train"], tokenizer, max_length, max_train_samples),
        tokenize_split(raw["validation"], tokenizer, max_length, max_eval_samples),
    )
