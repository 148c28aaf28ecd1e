"""Dataset-level simulation: client part in plaintext, server part under a backend, plain baseline alongside.

For every batch of MRPC dev examples: the client tokenizes, embeds and applies the embedding LayerNorm
(:func:`cgf_fhe.split.client_embed`, checkpoint named by the ONNX metadata ``cgf_fhe.checkpoint`` or
``--checkpoint``); the server graph runs under the ``plain`` backend (the baseline) and under the chosen backend
on the same inputs. Collected: logits of both, errors of the hidden state after every encoder layer (valid tokens
only), polynomial inputs outside their intervals, refreshes, levels, timings.

The pieces shared with the packed ``seal`` backend live in :mod:`cgf_fhe.simulate.batch`; :func:`simulate`
hands ``--backend seal`` to :mod:`cgf_fhe.simulate.packed_runner` by name and uses nothing else of it.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from .backends.base import SimulationError
from .batch import (EMB, LOGITS, MASK, BatchRunner, SimConfig, client_batches, default_batch_size, op_stats,
                    resolve_checkpoint, summarize)
from .interpreter import load


_WORKER: BatchRunner | None = None


def _worker_init(onnx_path, cfg_dict, secret_context):
    import torch

    global _WORKER
    torch.set_num_threads(1)
    _WORKER = BatchRunner(onnx_path, SimConfig(**cfg_dict), secret_context)


def _worker_run(args):
    index, feeds, labels = args
    return _WORKER.run(index, feeds, labels)


def run_batches(onnx_path: str, batches: list, cfg: SimConfig) -> tuple[list[dict], dict]:
    """Evaluate the batches (in-process or with ``cfg.workers`` processes); returns per-batch results + info."""
    from tqdm.auto import tqdm

    secret = None
    info = {}
    if cfg.backend == "tenseal":
        from .backends.tenseal import TenSEALClient

        client = TenSEALClient(cfg.ckks_params())
        secret = client.secret_context()
    n_total = sum(len(lab) for _, lab in batches)
    results = []
    bar = tqdm(total=n_total, desc=f"simulate [{cfg.backend}]", unit="ex", disable=not cfg.progress)
    try:
        if cfg.workers <= 1 or len(batches) == 1:
            runner = BatchRunner(onnx_path, cfg, secret)
            info = _runner_info(runner)
            for i, (feeds, labels) in enumerate(batches):
                r = runner.run(i, feeds, labels, progress=cfg.progress and cfg.backend == "tenseal")
                results.append(r)
                bar.update(r["n"])
            info["backend"] = runner.backend.describe() if runner.backend else runner.plain_backend.describe()
        else:
            import multiprocessing as mp

            runner = BatchRunner(onnx_path, SimConfig(**{**asdict(cfg), "backend": "plain"}))
            info = _runner_info(runner)
            if cfg.backend != "plain":
                params = cfg.ckks_params()
                info["level_budget"] = params.level_budget
                if isinstance(cfg.refresh, str) and cfg.refresh == "plan":
                    from ..bootstrap import plan_bootstraps

                    info["refresh_plan"] = list(plan_bootstraps(runner.model, runner.analysis,
                                                                params.level_budget).refresh)
                elif cfg.refresh not in (None, "none"):
                    info["refresh_plan"] = list(cfg.refresh)
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(onnx_path, asdict(cfg), secret)) as ex:
                jobs = [(i, feeds, labels) for i, (feeds, labels) in enumerate(batches)]
                for r in ex.map(_worker_run, jobs):
                    results.append(r)
                    bar.update(r["n"])
            info["backend"] = {"backend": cfg.backend, "workers": cfg.workers,
                               "params": cfg.ckks_params().describe() if cfg.backend != "plain" else None}
    finally:
        bar.close()
    results.sort(key=lambda r: r["index"])
    info["op_stats"] = op_stats(results)
    diags = [r["diagnostics"] for r in results if r.get("diagnostics")]
    if diags:
        heads = [d["min_headroom_bits"] for d in diags if d.get("min_headroom_bits") is not None]
        info["diagnostics"] = {"min_headroom_bits": min(heads) if heads else None,
                               "overflows": sum(d["overflows"] for d in diags),
                               "bootstrap_out_of_range": sum(d["bootstrap_out_of_range"] for d in diags)}
    return results, info


def _runner_info(runner: BatchRunner) -> dict:
    it = runner.interp
    return {"layer_values": {str(k): v for k, v in runner.layer_values.items()},
            "poly_groups": runner.polys, "total_depth": runner.analysis.total_depth,
            "refresh_plan": list(it.refresh_set) if it is not None else [],
            "level_budget": it.budget if it is not None else None}


def simulate(onnx_path: str | os.PathLike, cfg: SimConfig, out_dir: str | os.PathLike | None = None) -> dict:
    """Full simulation of an exported model on MRPC dev; writes DIR/simulation.{json,md} and error_per_layer.png
    when ``out_dir`` is given. Returns the summary dict."""
    t0 = time.perf_counter()
    if cfg.backend not in ("plain", "emulate", "tenseal", "seal"):
        raise SimulationError(f"unknown backend {cfg.backend!r}: choose plain, emulate, tenseal or seal")
    params = cfg.ckks_params()  # validate (security) before any work
    if cfg.examples is not None and cfg.backend != "seal":
        raise SimulationError(f"--examples selects examples of the seal backend's one-by-one runs; backend "
                              f"{cfg.backend!r} runs batches: use --limit N")
    if cfg.backend == "seal":  # packed real CKKS, one example per pass: a runner of its own
        from .packed_runner import simulate_packed

        return simulate_packed(onnx_path, cfg, out_dir)
    model = load(onnx_path)
    from .preflight import preflight

    preflight(model, cfg, params, onnx_path)  # what the graph and parameters decide: before encrypting (#26)
    batches, client_info = client_batches(model, cfg)
    results, info = run_batches(str(onnx_path), batches, cfg)
    summary = summarize(results, cfg, info, time.perf_counter() - t0,
                        {"onnx": str(Path(onnx_path).resolve()), **client_info})
    if out_dir is not None:
        from .report import write_report

        write_report(summary, out_dir)
    return summary


__all__ = ["SimConfig", "BatchRunner", "simulate", "summarize", "run_batches", "client_batches",
           "resolve_checkpoint", "default_batch_size", "EMB", "MASK", "LOGITS"]
