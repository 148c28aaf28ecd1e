"""What every ``simulate`` backend shares: the run's configuration, the per-batch evaluation with the plain
baseline alongside (:class:`BatchRunner`), the client part (tokenize + embed MRPC dev examples) and the summary.

:mod:`cgf_fhe.simulate.runner` (element packing: plain / emulate / tenseal, worker processes) and
:mod:`cgf_fhe.simulate.packed_runner` (``--backend seal``) both build on this module; it imports neither.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..ckks import CKKSParams
from .. import layout
from ..errors import UserError
from .backends import make_backend
from .backends.base import ModulusOverflowError, SimulationError
from .interpreter import Interpreter, layer_outputs, load, poly_inputs, read_metadata

EMB, MASK, LOGITS = "embeddings", "attention_mask", "logits"


@dataclass
class SimConfig:
    backend: str = "emulate"
    poly_modulus: int | None = None
    coeff_bits: tuple | None = None
    scale_bits: int = 40
    levels: int | None = None
    insecure: bool = False
    refresh: object = "plan"  # "plan" | "none" | list of value names
    # emulator
    emulate_refresh: str = "bootstrap"  # bootstrap | client
    bootstrap_bits: float = 24.0
    bootstrap_bound: float = 1024.0
    on_overflow: str = "raise"
    on_exhausted: str = "raise"
    pinned_scale: bool = True
    seed: int = 0
    # data
    limit: int | None = None
    examples: tuple[int, ...] | None = None  # seal: only these dev example indices (0-based; resumable subsets)
    data_dir: str | None = None
    checkpoint: str | None = None
    max_length: int | None = None
    batch_size: int | None = None
    workers: int = 1
    progress: bool = True
    trace_layers: bool = True
    device: str | None = None
    compare_emulator: bool = False  # seal: also run the emulator's matching mode, per-layer errors side by side
    dry_run: bool = False  # seal: only the packed dry run (packability, counts, time and memory estimates)

    def ckks_params(self) -> CKKSParams:
        """The run's CKKS parameters, built once (again only if a parameter field changes)."""
        key = (self.poly_modulus, self.coeff_bits, self.scale_bits, self.levels, self.insecure)
        cached = self.__dict__.get("_ckks")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_ckks"] = (key, CKKSParams.from_options(*key))
        return cached[1]

    def backend_options(self) -> dict:
        return {"refresh_kind": self.emulate_refresh, "bootstrap_bits": self.bootstrap_bits,
                "bootstrap_bound": self.bootstrap_bound, "on_overflow": self.on_overflow,
                "on_exhausted": self.on_exhausted, "pinned_scale": self.pinned_scale, "seed": self.seed,
                "device": self.device}


# ---------------------------------------------------------------------------------------------------------------
# per-batch evaluation (in-process or in a worker)
# ---------------------------------------------------------------------------------------------------------------
class BatchRunner:
    """Holds the plain and backend interpreters for one process."""

    def __init__(self, onnx_path: str, cfg: SimConfig, secret_context: bytes | None = None):
        self.cfg = cfg
        self.model = load(onnx_path)
        self.params = cfg.ckks_params()
        self.plain_backend = make_backend("plain", None, device=cfg.device)
        from .. import fhe_ops

        self.analysis = fhe_ops.analyze(self.model)
        self.layer_values = layer_outputs(self.model, self.analysis)
        self.polys = [p for p in poly_inputs(self.model, self.analysis) if p["value"] and p["interval"]]
        trace = set()
        if cfg.trace_layers:
            trace = set(self.layer_values.values()) | {p["value"] for p in self.polys}
            trace |= set(self.analysis.encrypted_inputs)
        self.plain = Interpreter(self.model, self.plain_backend, trace=trace, record_maxabs=True,
                                 analysis=self.analysis)
        self.backend = None
        self.interp = None
        if cfg.backend != "plain":
            opts = cfg.backend_options()
            if cfg.backend == "tenseal":
                from .backends.tenseal import TenSEALClient

                client = TenSEALClient(self.params, secret_context=secret_context)
                opts = {"client": client}
            self.backend = make_backend(cfg.backend, self.params, **opts)
            self.interp = Interpreter(self.model, self.backend, refresh=cfg.refresh, trace=trace,
                                      analysis=self.analysis)

    def run(self, index: int, feeds: dict, labels: np.ndarray, progress=False) -> dict:
        mask = feeds[MASK]
        t0 = time.perf_counter()
        pr = self.plain.run(feeds)
        plain_s = time.perf_counter() - t0
        out = {"index": index, "n": int(len(labels)), "labels": labels, "seq_len": int(mask.shape[1]),
               "plain_logits": pr.outputs[LOGITS], "plain_seconds": plain_s}
        if self.interp is None:
            out.update(logits=pr.outputs[LOGITS], seconds=plain_s, refreshes=0, layers={}, poly={},
                       poly_plain=self.poly_counts(pr.trace, mask), level_mismatches=[], predicted=None)
            return out
        predicted = None
        if self.cfg.backend == "tenseal":
            self.memory = self._check_memory(feeds)
            predicted = self._predict_overflow(pr)
        if self.cfg.backend == "emulate":
            self.backend.reseed(int(self.cfg.seed) * 1_000_003 + index)
        n_ref0 = self.backend.n_refresh
        c0, s0 = dict(self.backend.counts), dict(self.backend.seconds)
        d0 = self.backend.diagnostics() if hasattr(self.backend, "diagnostics") else None
        if d0 is not None:
            self.backend.min_headroom_bits = math.inf  # per batch
        t0 = time.perf_counter()
        br = self.interp.run(feeds, progress=progress)
        be = self.backend
        out.update(op_counts={k: be.counts[k] - c0.get(k, 0) for k in be.counts},
                   op_seconds={k: be.seconds[k] - s0.get(k, 0.0) for k in be.seconds},
                   diagnostics=_diag_delta(d0, be.diagnostics()) if d0 is not None else None)
        out.update(logits=br.outputs[LOGITS], seconds=time.perf_counter() - t0,
                   refreshes=self.backend.n_refresh - n_ref0, refreshed=list(br.refreshed),
                   layers=self.layer_errors(pr.trace, br.trace, mask), poly=self.poly_counts(br.trace, mask),
                   poly_plain=self.poly_counts(pr.trace, mask), level_mismatches=br.level_mismatches,
                   predicted=predicted, memory=getattr(self, "memory", None))
        return out

    # A SEAL ciphertext is 2 polynomials x N coefficients x (data primes) x 8 bytes; TenSEAL's tensor objects and
    # the allocator add to that (measured here: a 2-layer hidden-64 student at 16 tokens, estimated 18 GiB of
    # ciphertexts, was OOM-killed at 23.6 GiB resident)
    MEMORY_OVERHEAD = 1.3

    def _check_memory(self, feeds: dict) -> dict:
        """Refuse a TenSEAL batch whose live ciphertexts cannot fit in this machine's available memory."""
        import psutil

        from .. import fhe_ops

        dims = {}
        for inp in self.model.graph.input:
            if inp.name in feeds:
                shape = np.asarray(feeds[inp.name]).shape
                dims[inp.name] = (1,) + tuple(shape[1:])  # examples are in the slots
        peak, node = fhe_ops.peak_live_elements(self.model, self.analysis, dims)
        ct_bytes = 2 * self.params.poly_modulus * (len(self.params.coeff_bits) - 1) * 8
        need = peak * ct_bytes * self.MEMORY_OVERHEAD
        avail = psutil.virtual_memory().available
        info = {"peak_ciphertexts": int(peak), "peak_node": node, "ciphertext_bytes": int(ct_bytes),
                "estimated_peak_bytes": int(need), "available_bytes": int(avail)}
        if need > avail:
            seq = np.asarray(feeds[MASK]).shape[1]
            raise SimulationError(
                f"not enough memory for real TenSEAL: up to {peak:,} ciphertexts are alive at once (at node {node}, "
                f"{seq} tokens), about {need / 2**30:.1f} GiB at N={self.params.poly_modulus} with "
                f"{len(self.params.coeff_bits) - 1} data primes, but {avail / 2**30:.1f} GiB is available. Lower "
                "--max-length (memory grows with the sequence length; --limit does not matter, examples share the "
                "slots), use a narrower student, or fewer levels (--coeff-bits)")
        return info

    def _predict_overflow(self, pr) -> dict:
        """TenSEAL cannot see its values: predict modulus overflow from the plain run's magnitudes and the levels
        each value will have under the refresh plan (a value at level l must stay below Q_l / (2 scale))."""
        plan = self.interp.plan
        produced_at: dict[str, int] = {}  # levels a value has when produced (before any refresh of it)
        if plan is not None:
            outs = {r.name: [o for o in n.output if o] for n, r in zip(self.model.graph.node, self.analysis.nodes)}
            for name, npl in plan.nodes.items():
                for o in outs.get(name, ()):
                    produced_at[o] = npl.levels_out
        worst, worst_v = math.inf, None
        for v, m in pr.maxabs.items():
            lv = produced_at.get(v, self.params.level_budget)
            if m <= 0:
                continue
            head = math.log2(self.params.value_bound(max(lv, 0)) / m)
            if head < worst:
                worst, worst_v = head, v
        res = {"min_headroom_bits": None if worst == math.inf else worst, "value": worst_v}
        if worst < 0 and self.cfg.on_overflow == "raise":
            raise ModulusOverflowError(
                f"value {worst_v!r} reaches |v| = {pr.maxabs[worst_v]:.4g} in the plain run, beyond what its "
                f"ciphertext level can hold ({2.0 ** -worst:.3g}x the bound Q_l/(2*scale)): TenSEAL would decrypt "
                "garbage. Use --on-overflow garbage to run anyway")
        return res

    def layer_errors(self, ptrace, btrace, mask) -> dict:
        out = {}
        names = {EMB: "input"} if EMB in btrace else {}
        for lay, v in self.layer_values.items():
            names[v] = int(lay)
        for v, lay in names.items():
            if v not in ptrace or v not in btrace:
                continue
            d = np.abs(btrace[v] - ptrace[v])
            if d.ndim >= 2 and d.shape[:2] == mask.shape:
                keep = mask.astype(bool).reshape(mask.shape + (1,) * (d.ndim - 2))
                d = d[np.broadcast_to(keep, d.shape)]
            out[str(lay)] = {"value": v, "max": float(d.max()) if d.size else 0.0, "sum": float(d.sum()),
                             "n": int(d.size)}
        return out

    def poly_counts(self, trace, mask) -> dict:
        out = {}
        for p in self.polys:
            v = p["value"]
            if v not in trace:
                continue
            x = trace[v] / p["scale"]
            lo, hi = p["interval"]
            valid = _valid_positions(x.shape, mask, p["op"])
            bad = ((x < lo) | (x > hi)) & valid
            out[p["name"]] = {"op": p["op"], "layer": p["layer"], "interval": [lo, hi], "n_out": int(bad.sum()),
                              "n_seen": int(valid.sum()), "min": float(x[valid].min()) if valid.any() else None,
                              "max": float(x[valid].max()) if valid.any() else None}
        return out


def _diag_delta(before: dict, after: dict) -> dict:
    return {"min_headroom_bits": after.get("min_headroom_bits"),
            "overflows": after["overflows"] - before["overflows"],
            "bootstrap_out_of_range": after["bootstrap_out_of_range"] - before["bootstrap_out_of_range"]}


def _valid_positions(shape, mask, op) -> np.ndarray:
    """Positions that matter: valid tokens on axis 1 ([B,S,...]); for attention-shaped [B,h,S,S] inputs (exp)
    valid query and key."""
    m = mask.astype(bool)
    B, S = m.shape
    if len(shape) == 4 and shape[0] == B and shape[2] == S and shape[3] == S:
        v = m[:, None, :, None] & m[:, None, None, :]
        return np.broadcast_to(v, shape)
    if len(shape) >= 2 and shape[0] == B and shape[1] == S:
        return np.broadcast_to(m.reshape((B, S) + (1,) * (len(shape) - 2)), shape)
    return np.ones(shape, dtype=bool)


# ---------------------------------------------------------------------------------------------------------------
# client part and the dataset loop
# ---------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(onnx_model, checkpoint: str | None) -> str:
    from ..models import CheckpointError

    meta = read_metadata(onnx_model)
    ckpt = checkpoint or meta.get("checkpoint")
    if not ckpt:
        raise CheckpointError("the ONNX file names no checkpoint (metadata cgf_fhe.checkpoint): pass --checkpoint "
                              "DIR (the client part -- tokenizer and embeddings -- lives there)")
    if not Path(ckpt).is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt} (from {'--checkpoint' if checkpoint else 'ONNX metadata'}"
                              ") does not exist: pass --checkpoint DIR")
    return str(ckpt)


def client_batches(onnx_model, cfg: SimConfig):
    """Tokenize + embed (client part, plaintext) the first ``cfg.limit`` MRPC dev examples, in batches of feeds."""
    import torch

    from ..data import load_mrpc, make_loader, tokenize_split
    from ..models import load_checkpoint
    from ..split import client_embed

    ckpt = resolve_checkpoint(onnx_model, cfg.checkpoint)
    model, tok, settings = load_checkpoint(ckpt)
    model = model.float().eval()
    meta = read_metadata(onnx_model)
    max_length = layout.max_length(settings, cfg.max_length, meta)
    dev = tokenize_split(load_mrpc(cfg.data_dir)["validation"], tok, max_length=int(max_length),
                         max_samples=cfg.limit)
    if len(dev) == 0:
        raise UserError("no examples selected (--limit 0?)")
    bs = cfg.batch_size or default_batch_size(cfg, len(dev))
    loader = make_loader(dev, tok, batch_size=bs, shuffle=False)
    batches = []
    with torch.no_grad():
        for b in loader:
            emb = client_embed(model, b["input_ids"], b.get("token_type_ids")).double().numpy()
            feeds = {EMB: emb, MASK: b["attention_mask"].float().numpy()}
            batches.append((feeds, b["labels"].numpy()))
    return batches, {"checkpoint": ckpt, "max_length": int(max_length), "batch_size": bs}


def default_batch_size(cfg: SimConfig, n: int) -> int:
    if cfg.backend == "tenseal":  # cost is per ciphertext, not per example: fill the slots, one batch per worker
        slots = cfg.ckks_params().slots
        return max(1, min(slots, math.ceil(n / max(cfg.workers, 1))))
    return 32




def op_stats(results: list[dict]) -> dict:
    counts, secs = {}, {}
    for r in results:
        for k, v in (r.get("op_counts") or {}).items():
            counts[k] = counts.get(k, 0) + v
        for k, v in (r.get("op_seconds") or {}).items():
            secs[k] = secs.get(k, 0.0) + v
    return {k: {"count": int(counts[k]), "seconds": float(secs.get(k, 0.0)),
                "ms_per_op": 1e3 * secs.get(k, 0.0) / counts[k] if counts[k] else None} for k in sorted(counts)}


# ---------------------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------------------
def _f1(pred, labels) -> float:
    tp = int(((pred == 1) & (labels == 1)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def summarize(results: list[dict], cfg: SimConfig, info: dict, seconds: float, extra: dict | None = None) -> dict:
    params = cfg.ckks_params()
    labels = np.concatenate([r["labels"] for r in results])
    logits = np.concatenate([r["logits"] for r in results])
    plain = np.concatenate([r["plain_logits"] for r in results])
    pred, ppred = logits.argmax(-1), plain.argmax(-1)
    err = np.abs(logits - plain)
    n = len(labels)
    label = {"tenseal": "client-aided refresh", "emulate": ("bootstrap" if cfg.emulate_refresh == "bootstrap"
                                                            else "client-aided refresh")}.get(cfg.backend, "none")
    refresh_points = len(info.get("refresh_plan") or [])
    layers: dict[str, dict] = {}
    for r in results:
        for k, v in r["layers"].items():
            a = layers.setdefault(k, {"value": v["value"], "max_abs_error": 0.0, "sum": 0.0, "n": 0})
            a["max_abs_error"] = max(a["max_abs_error"], v["max"])
            a["sum"] += v["sum"]
            a["n"] += v["n"]
    layer_list = []
    for k, a in layers.items():
        layer_list.append({"layer": k if k == "input" else int(k), "value": a["value"],
                           "max_abs_error": a["max_abs_error"], "mean_abs_error": a["sum"] / max(a["n"], 1)})
    layer_list.sort(key=lambda d: -1 if d["layer"] == "input" else d["layer"])
    poly = _merge_poly([r["poly"] for r in results])
    poly_plain = _merge_poly([r["poly_plain"] for r in results])
    mism = [m for r in results for m in r.get("level_mismatches") or []]
    headroom = [r["predicted"]["min_headroom_bits"] for r in results if r.get("predicted")
                and r["predicted"]["min_headroom_bits"] is not None]
    backend_s = sum(r["seconds"] for r in results)
    plain_s = sum(r["plain_seconds"] for r in results)
    out = {
        "backend": cfg.backend,
        "n_examples": int(n),
        "accuracy": float((pred == labels).mean()),
        "f1": _f1(pred, labels),
        "plain_accuracy": float((ppred == labels).mean()),
        "plain_f1": _f1(ppred, labels),
        "agreement": float((pred == ppred).mean()),
        "max_logit_error": float(err.max()),
        "mean_logit_error": float(err.mean()),
        "refreshes": int(refresh_points),
        "refresh_label": label,
        "refresh_operations": int(sum(r.get("refreshes", 0) for r in results)),
        "seconds": float(seconds),
        "backend_seconds": float(backend_s),
        "plain_seconds": float(plain_s),
        "seconds_per_example": float(backend_s / max(n, 1)),
        "ratio_to_plain": float(backend_s / plain_s) if plain_s > 0 else None,
        "batches": len(results),
        "seq_lens": sorted({r["seq_len"] for r in results}),
        "workers": cfg.workers,
        "params": params.describe() if cfg.backend != "plain" else None,
        "level_budget": info.get("level_budget"),
        "total_depth": info.get("total_depth"),
        "refresh_plan": info.get("refresh_plan"),
        "error_per_layer": layer_list,
        "poly_out_of_interval": poly,
        "poly_out_of_interval_plain": poly_plain,
        "level_mismatches": mism[:20],
        "n_level_mismatches": len(mism),
        "predicted_min_headroom_bits": min(headroom) if headroom else None,
        "memory": max((r["memory"] for r in results if r.get("memory")), key=lambda m: m["estimated_peak_bytes"],
                      default=None),
        "backend_info": info.get("backend"),
        "op_stats": info.get("op_stats"),
        "diagnostics": info.get("diagnostics"),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
                   if k not in ("progress",)},
        # per example, in dev-set order: what another run (e.g. tenseal vs emulate) is compared against
        "labels": labels.astype(int).tolist(),
        "predictions": pred.astype(int).tolist(),
        "plain_predictions": ppred.astype(int).tolist(),
        "logits": logits.astype(float).tolist(),
        "plain_logits": plain.astype(float).tolist(),
    }
    if params.warnings:
        out["warnings"] = list(params.warnings)
    out.update(extra or {})
    return out


def _merge_poly(dicts: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for d in dicts:
        for k, v in d.items():
            a = out.setdefault(k, {"op": v["op"], "layer": v["layer"], "interval": v["interval"], "n_out": 0,
                                   "n_seen": 0, "min": None, "max": None})
            a["n_out"] += v["n_out"]
            a["n_seen"] += v["n_seen"]
            if v["min"] is not None:
                a["min"] = v["min"] if a["min"] is None else min(a["min"], v["min"])
                a["max"] = v["max"] if a["max"] is None else max(a["max"], v["max"])
    return out


__all__ = ["EMB", "MASK", "LOGITS", "SimConfig", "BatchRunner", "resolve_checkpoint", "client_batches",
           "default_batch_size", "op_stats", "summarize"]
