"""Export the server part of a student to ONNX, with FHE metadata, and check torch/ONNX parity.

``cgf-fhe export CKPT -o model.onnx`` exports ``split.ServerModel(split.fold_for_export(model))`` with
``torch.onnx.export(dynamo=True)`` (opset 18 by default; dynamic ``batch`` and ``seq`` dims). Graph interface:

* input ``embeddings`` float32 ``[batch, seq, hidden]`` -- encrypted (the client's embedding output);
* input ``attention_mask`` float32 ``[batch, seq]`` -- public 0/1 keep-mask;
* output ``logits`` float32 ``[batch, num_labels]``.

``metadata_props`` (strings stored as is, other values as JSON; read them back with :func:`read_metadata`):

=============================  ======================================================================
``cgf_fhe.encrypted_inputs``   ``["embeddings"]``
``cgf_fhe.checkpoint``         absolute path of the source checkpoint (client part: tokenizer, embeddings)
``cgf_fhe.poly``               polynomial node groups: ``[{"module", "op", "layer", "interval", "degree", "form",
                               "depth", "nodes": [ONNX node names]}, ...]`` (+ the LayerNorm mode)
``cgf_fhe.fhe``                the checkpoint's full polynomial settings (``settings["fhe"]``)
``cgf_fhe.calibration``        calibration statistics (input ranges per op per layer)
``cgf_fhe.coeff``              CGF coefficient of the trained model (before export folding)
``cgf_fhe.softmax``            ``"cgf"`` or ``"exact"``
``cgf_fhe.model_config``       the transformers config (dict)
``cgf_fhe.exporter_version``   cgf-fhe / torch / onnx / onnxscript versions, opset
``cgf_fhe.max_length``         tokenizer max length the model was trained with (when known)
``cgf_fhe.parity``             the parity result (when ``--verify N`` ran)
=============================  ======================================================================
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import layout
from ..errors import UserError
from ..graph import METADATA_PREFIX, read_metadata  # noqa: F401  (read_metadata re-exported: the one reader)

EMB, MASK, LOGITS = "embeddings", "attention_mask", "logits"
PREFIX = METADATA_PREFIX


def _jsonable(obj):
    try:
        return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    except (TypeError, ValueError):
        return str(obj)


def _versions(opset: int) -> dict:
    import onnxscript

    import cgf_fhe

    return {"cgf_fhe": cgf_fhe.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": getattr(onnxscript, "__version__", "?"), "opset": opset, "exporter": "torch.onnx dynamo"}


def poly_groups(model: torch.nn.Module, graph: onnx.ModelProto | None = None) -> list[dict]:
    """The polynomial modules of ``model`` (:func:`cgf_fhe.surgery.named_approx_modules`) with interval, degree,
    evaluation form and stated depth (levels, after export folding) and -- when ``graph`` is given -- the ONNX
    nodes implementing each one (matched on the exporter's module scopes)."""
    from ..surgery import named_approx_modules
    from ..graphinfo import layer_index, module_path

    names = {id(m): n for n, m in model.named_modules()}
    groups = []
    for key, mod in named_approx_modules(model):
        st = mod.to_settings()
        approx = st.get("approx") or {}
        g = {"key": key, "kind": st.get("kind"), "module": names.get(id(mod), ""),
             "layer": layer_index(names.get(id(mod), "")),
             "interval": [approx["a"], approx["b"]] if approx else None,
             "degree": approx.get("degree"), "form": approx.get("form"), "baby": approx.get("baby"),
             "r": approx.get("r"), "max_error": approx.get("max_error"),
             "depth": int(mod.depth), "prescaled": bool(getattr(mod, "prescaled", False))}
        if approx:
            g["alpha"], g["beta"] = approx.get("alpha"), approx.get("beta")
        for k in ("newton_steps", "inv_sigma", "rel_error"):
            if k in st:
                g[k] = st[k]
        groups.append(_jsonable(g))
    if graph is not None:
        gnodes = list(graph.graph.node)
        paths = [(n.name, module_path(n)) for n in gnodes]
        consts = {i.name for i in graph.graph.initializer}
        consts |= {o for n in gnodes if n.op_type == "Constant" for o in n.output}
        by_name = {n.name: n for n in gnodes}
        for g in groups:
            key = "." + g["module"] + "."
            g["nodes"] = [nm for nm, p in paths if key in "." + p + "."]
            inside = {o for nm in g["nodes"] for o in by_name[nm].output}
            ext = list(dict.fromkeys(x for nm in g["nodes"] for x in by_name[nm].input
                                     if x and x not in inside and x not in consts))
            # the graph value holding the polynomial's argument (alpha * x when prescaled)
            g["input"] = ext[0] if len(ext) == 1 else None
    return groups


def _example_inputs(model, batch: int = 2, seq: int = 16):
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(batch, seq, hidden, generator=g)
    mask = torch.ones(batch, seq)
    mask[1, seq // 2:] = 0.0
    return emb, mask


def export_model(model, out_path: str | Path, *, settings: dict | None = None, checkpoint: str | Path | None = None,
                 opset: int = 18, optimize: bool = True, extra_metadata: dict | None = None,
                 fold_layernorms: bool = True, fold_stats: bool = True) -> onnx.ModelProto:
    """Export ``ServerModel(fold_for_export(model))`` to ``out_path`` with metadata; returns the ModelProto."""
    from ..split import ServerModel, fold_for_export

    settings = settings or {}
    folded = fold_for_export(model, fold_layernorms=fold_layernorms, fold_stats=fold_stats)
    server = ServerModel(folded).eval()
    emb, mask = _example_inputs(model)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dyn = {EMB: {0: batch, 1: seq}, MASK: {0: batch, 1: seq}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(server, (emb, mask), dynamo=True, opset_version=opset, input_names=[EMB, MASK],
                                     output_names=[LOGITS], dynamic_shapes=dyn, optimize=optimize, verbose=False)
        except Exception as exc:
            raise UserError(f"torch.onnx.export failed for {checkpoint or type(model).__name__}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    proto = prog.model_proto
    meta = {
        "encrypted_inputs": [EMB],
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "poly": poly_groups(folded, proto),
        "fhe": settings.get("fhe"),
        "calibration": (settings.get("fhe") or {}).get("calibration", settings.get("calibration")),
        "coeff": float(getattr(model.config, "cgf_coeff", 0.5)),
        "coeff_heads": getattr(model.config, "cgf_coeff_heads", None),
        "softmax": getattr(model.config, "cgf_softmax", settings.get("softmax")),
        "model_config": model.config.to_dict(),
        "exporter_version": _versions(opset),
        "max_length": settings.get("max_length") or (settings.get("data") or {}).get("max_length"),
    }
    meta.update(extra_metadata or {})
    set_metadata(proto, meta)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise UserError(f"onnx.checker rejects the exported graph: {exc}") from exc
    from ..io import atomic_write, check_output_file

    out = check_output_file(out_path)
    atomic_write(out, lambda tmp: onnx.save(proto, str(tmp)))
    return proto


def set_metadata(proto: onnx.ModelProto, meta: dict) -> None:
    """Write ``cgf_fhe.<key>`` into ``metadata_props`` (replacing existing keys; None skipped): strings as they are
    (e.g. the checkpoint path), everything else as JSON."""
    keep = [p for p in proto.metadata_props if not (p.key.startswith(PREFIX) and p.key[len(PREFIX):] in meta)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in meta.items():
        if v is None:
            continue
        p = proto.metadata_props.add()
        p.key = PREFIX + k
        p.value = v if isinstance(v, str) else json.dumps(_jsonable(v), sort_keys=True)


def parity(onnx_path: str | Path, model, tokenizer, n: int = 32, data_dir=None, max_length: int = 128,
           batch_size: int = 16, progress: bool = True) -> dict:
    """onnxruntime (server graph on ``client_embed`` inputs) vs the torch student (full model) on the first ``n``
    MRPC dev examples: max/mean abs logit difference, prediction agreement, both accuracies."""
    import onnxruntime as ort
    from tqdm.auto import tqdm

    from ..data import load_mrpc, make_loader, tokenize_split
    from ..split import client_embed

    if n <= 0:
        raise UserError("--verify N needs N >= 1")
    dev = tokenize_split(load_mrpc(data_dir)["validation"], tokenizer, max_length=max_length, max_samples=n)
    loader = make_loader(dev, tokenizer, batch_size=batch_size, shuffle=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    model.eval()
    diffs, agree, correct_t, correct_o, total = [], 0, 0, 0, 0
    both_bad, one_bad = [], []  # example indices: non-finite logits in torch and ONNX alike / in only one of them
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in tqdm(loader, desc="parity", disable=not progress, leave=False):
            ids, tt, am = b["input_ids"], b.get("token_type_ids"), b["attention_mask"]
            ref = model(input_ids=ids, token_type_ids=tt, attention_mask=am).logits.float().numpy()
            emb = client_embed(model, ids, tt).float().numpy()
            got = sess.run([LOGITS], {EMB: emb, MASK: am.float().numpy()})[0]
            fin_r = np.isfinite(ref).reshape(len(ref), -1).all(axis=1)
            fin_o = np.isfinite(got).reshape(len(got), -1).all(axis=1)
            both_bad += [total + i for i in np.flatnonzero(~fin_r & ~fin_o).tolist()]
            one_bad += [total + i for i in np.flatnonzero(fin_r != fin_o).tolist()]
            ok = fin_r & fin_o
            diffs.append(np.abs(got - ref).reshape(len(ref), -1).max(axis=1)[ok])
            agree += int((got.argmax(-1) == ref.argmax(-1))[ok].sum())
            labels = b["labels"].numpy()
            correct_t += int((ref.argmax(-1) == labels).sum())
            correct_o += int((got.argmax(-1) == labels).sum())
            total += len(ref)
    d = np.concatenate(diffs)
    n_fin = int(d.size)
    return {"n_examples": total, "n_compared": n_fin,
            "max_abs_logit_diff": float(d.max()) if n_fin else float("nan"),
            "mean_abs_logit_diff": float(d.mean()) if n_fin else float("nan"),
            "agreement": agree / n_fin if n_fin else 0.0, "torch_accuracy": correct_t / total,
            "onnx_accuracy": correct_o / total,
            # the student's own overflow (an input outside a polynomial's interval), the same in torch and ONNX:
            # not a parity failure, but listed so it is not hidden; one-sided non-finite logits are a failure
            "nonfinite_both": both_bad, "nonfinite_one_side": one_bad,
            "max_length": max_length, "seconds": time.perf_counter() - t0}


def export_checkpoint(ckpt: str | Path, out_path: str | Path, *, opset: int = 18, verify: int = 0, data_dir=None,
                      max_length: int | None = None, batch_size: int = 16, optimize: bool = True,
                      fold_layernorms: bool = True, fold_stats: bool = True) -> dict:
    """Load a checkpoint, export it, run the FHE check and (``verify`` > 0) the parity check.
    Returns ``{"onnx", "check": summary, "parity": dict|None, "seconds"}``."""
    from ..models import load_checkpoint
    from .verify import check

    t0 = time.perf_counter()
    model, tok, settings = load_checkpoint(ckpt)
    model = model.float().eval()
    max_length = layout.max_length(settings, max_length)
    proto = export_model(model, out_path, settings=settings, checkpoint=ckpt, opset=opset, optimize=optimize,
                         extra_metadata={"max_length": max_length}, fold_layernorms=fold_layernorms,
                         fold_stats=fold_stats)
    res = check(proto)
    result = {"onnx": str(Path(out_path).resolve()), "check": res.summary(), "parity": None}
    result["check"]["file"] = result["onnx"]
    if verify:
        par = parity(out_path, model, tok, n=verify, data_dir=data_dir, max_length=max_length, batch_size=batch_size)
        result["parity"] = par
        set_metadata(proto, {"parity": par})
        from ..io import atomic_write, write_json

        atomic_write(out_path, lambda tmp: onnx.save(proto, str(tmp)))
        write_json(Path(out_path).with_suffix(".parity.json"), par)
    result["seconds"] = time.perf_counter() - t0
    return result


def run_export(args) -> int:
    from .verify import format_text, check

    res = export_checkpoint(args.checkpoint, args.output, opset=args.opset, verify=args.verify,
                            fold_layernorms=getattr(args, "fold_layernorms", True),
                            fold_stats=getattr(args, "fold_stats", True),
                            data_dir=args.data_dir, max_length=args.max_length, batch_size=args.batch_size,
                            optimize=not args.no_optimize)
    s = res["check"]
    print(f"exported {res['onnx']} ({s['nodes']} nodes, opset {args.opset}) in {res['seconds']:.1f}s")
    text = format_text(check(res["onnx"]))
    print(text if not s["ok"] else "\n".join(text.splitlines()[1:]))
    par = res["parity"]
    if par:
        ok = (par["max_abs_logit_diff"] <= 1e-4 and par["agreement"] == 1.0 and not par["nonfinite_one_side"])
        bad = ""
        if par["nonfinite_both"]:
            bad += (f"; {len(par['nonfinite_both'])} example(s) non-finite in torch and ONNX alike (the student "
                    f"overflows there, not the export): dev index {par['nonfinite_both'][:10]}")
        if par["nonfinite_one_side"]:
            bad += f"; non-finite on one side only: dev index {par['nonfinite_one_side'][:10]}"
        print(f"parity on {par['n_examples']} MRPC dev examples: max |logit diff| = {par['max_abs_logit_diff']:.2e}, "
              f"mean = {par['mean_abs_logit_diff']:.2e} over {par['n_compared']} finite, agreement = "
              f"{100 * par['agreement']:.2f}% (torch acc {par['torch_accuracy']:.4f}, onnx acc {par['onnx_accuracy']:.4f})"
              f"{bad} -> {'OK' if ok else 'MISMATCH'}; saved {Path(args.output).with_suffix('.parity.json')}")
    if args.strict and not s["ok"]:
        return 1
    return 0


__all__ = ["export_model", "export_checkpoint", "parity", "read_metadata", "set_metadata", "poly_groups"]
