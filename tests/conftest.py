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


def server_export_depth(server, emb, mask) -> int:
    """Export a server model (embeddings, attention mask -> logits) to ONNX with torch's dynamo exporter and
    return the total multiplicative depth cgf_fhe.fhe_ops measures on it (asserting it has no FHE violations)."""
    import warnings

    from cgf_fhe import fhe_ops

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(server, (emb, mask), dynamo=True, opset_version=18,
                                 input_names=["embeddings", "attention_mask"], output_names=["logits"], verbose=False)
    an = fhe_ops.analyze(prog.model_proto, ["embeddings"])
    assert an.violations == []
    return an.total_depth


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from cgf_fhe.models import load_tokenizer

    return load_tokenizer("tiny")


def build_student(out_dir, tokenizer, mrpc_dir, *, hidden=8, layers=1, heads=2, intermediate=16, max_length=6,
                  fold_layernorms=True, fold_stats=True, newton_steps=2):
    """A random-weight polynomial student (CGF softmax, Newton LayerNorm, degree-7 polynomials), saved and
    exported to ``out_dir/student.onnx`` (its checkpoint in ``out_dir/ckpt``)."""
    from transformers import BertConfig, BertForSequenceClassification

    from cgf_fhe import surgery
    from cgf_fhe.data import load_mrpc, make_loader, tokenize_split
    from cgf_fhe.export.onnx_export import export_checkpoint
    from cgf_fhe.models import save_checkpoint
    from cgf_fhe.softmax import set_softmax

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=2, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate)
    model = BertForSequenceClassification(cfg)
    set_softmax(model, "cgf", None)
    model.eval()
    ds = tokenize_split(load_mrpc(mrpc_dir)["train"], tokenizer, max_length=max_length, max_samples=32)
    ranges = surgery.calibrate(model, make_loader(ds, tokenizer, 16, False), progress=False)
    opts = surgery.FheOptions(poly="all", ln="newton", exp_degree=7, gelu_degree=7, tanh_degree=7,
                              invsqrt_degree=7, newton_steps=newton_steps, margin=0.5)
    fhe = surgery.polynomialize(model, opts, ranges)
    save_checkpoint(model, tokenizer, Path(out_dir) / "ckpt",
                    {"softmax": "cgf", "coeff": 0.5, "fhe": fhe, "max_length": max_length})
    export_checkpoint(Path(out_dir) / "ckpt", Path(out_dir) / "student.onnx", fold_layernorms=fold_layernorms,
                      fold_stats=fold_stats)
    return Path(out_dir)


@pytest.fixture(scope="session")
def micro_student_packed(tmp_path_factory, mrpc_dir, tiny_tokenizer):
    """Hidden 8, 1 layer, 2 heads, <= 6 tokens (the micro student of test_simulate, shared). Exported without the
    LayerNorm folds of cgf_fhe.fold: the packed SEAL backend does not pack a folded LayerNorm's per-token scalar
    times a row yet (its dry run refuses such a graph before encrypting, naming the node; issue #23)."""
    return build_student(tmp_path_factory.mktemp("packed_student"), tiny_tokenizer, mrpc_dir, fold_layernorms=False)
