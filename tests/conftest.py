import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


def _find_mrpc():
    env = os.environ.get("CGF_FHE_DATA_DIR")
    cands = [Path(env)] if env else []
    cands.append(REPO.parent / "shared" / "data" / "mrpc")
    for c in cands:
        if (c / "validation.tsv").is_file():
            return c
    return None


@pytest.fixture(scope="session")
def mrpc_dir():
    d = _find_mrpc()
    if d is None:
        pytest.fail("MRPC folder not found: set CGF_FHE_DATA_DIR or place it at ../shared/data/mrpc")
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from cgf_fhe.models import load_tokenizer

    return load_tokenizer("tiny")
