"""``simulate --backend seal``: graph-driven packed execution of the exported ONNX on real CKKS (SEAL).

The exported graph and its metadata drive everything (:class:`PackedInterpreter` is the one interpreter with a
:class:`~cgf_fhe.simulate.backends.seal_packed.PackedBackend`): there is no second model definition. Per example:

1. **dry run** (before anything is encrypted): the same schedule on float64 slot vectors
   (:class:`NumpyEngine`). A node that cannot be packed is refused here, naming it; the run also yields the
   operation counts per layer, the rotation steps (Galois keys are made for exactly these), the peak memory of
   live ciphertexts + cached plaintexts + keys, and a time estimate. A run that cannot fit the available memory is
   refused.
2. **encrypted run** on SEAL: the client (secret key) encrypts the embeddings; the server (public context:
   public, relinearisation and Galois keys) evaluates; where a ciphertext runs out of levels the server sends it
   back for a **client-aided refresh** (decrypt + re-encrypt, counted and labelled). A progress bar per layer.
3. optionally (``--compare-emulator``) the emulator's matching mode (the numpy engine with CKKS's rounding
   errors) on the same example; per layer the error mean and std of both against plain.

Results are appended per example (``DIR/examples/NNNNN.json``, written atomically, each with the sha256 of the ONNX
file and the CKKS parameters); a rerun with the same model bytes and parameters skips the examples already done
(resumable multi-example runs, also across sessions by copying the files); a file of another model or other
parameters stops the run naming it (:func:`check_resumed_example`).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from .backends.base import SimulationError
from .batch import EMB, LOGITS, MASK, BatchRunner, client_batches, op_stats, summarize
from .backends.seal_noise import calibrate_rotations
from .backends.seal_packed import NumpyEngine, PackedBackend, SealClient, SealEngine, calibrate_rotation_noise
from .interpreter import Interpreter, node_layers
from .packed_fusion import find_token_split_linears, run_fused
from .packing import PackedTensor, axis_groups, ciphertext_bytes, concat_axis, galois_key_bytes, take_axis

# the dry run evaluates the packed schedule in float64: it must give plain's logits to rounding (measured ~1e-14 on
# MiniLM); anything beyond this relative tolerance is a packing error and the example is refused before encrypting
SCHEDULE_TOL = 1e-6

# SEAL's memory pools keep freed buffers per size (one size per level), so the ciphertexts cost the sum over levels
# of each level's peak (memory_estimate); on top of that and the keys + cached plaintexts, measured peak RSS needs
# x1.39 (tiny 2-layer hidden-64 student, 32 tokens: 5.4 GiB for 0.82 + 1.18 keys + 1.45 cache + base) and x1.55
# (full-width 6-layer MiniLM, 44 tokens, 4-level chain: 9.48 GiB for per-level peaks 5.12 + keys 0.62 + base)
MEMORY_OVERHEAD = 1.6
BASE_BYTES = 600 << 20  # the process itself (torch, onnx, numpy)
# plaintext weights are encoded once and reused across examples when all of them fit this budget; otherwise
# (full-width MiniLM: ~300k diagonals) none is kept and each is encoded when used (a partial cache costs memory
# and saves little: every diagonal is used once per example)
PT_CACHE_BUDGET = 3 << 30
# ops a chunked region may hold (element-wise, or reductions over axes other than the heads: checked when run)
CHUNK_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "ReduceSum", "ReduceMean"})
COUNT_KINDS = ("mul_pt", "mul_ct", "rotate", "level_match", "refresh", "encode", "add", "rescale")


class PackedInterpreter(Interpreter):
    """The interpreter with levels left to the packed backend (it refreshes lazily, client-aided, when a
    multiplication finds no level left), per-layer statistics and a progress bar per layer."""

    def __init__(self, model, backend: PackedBackend, *, trace=(), analysis=None, chunked: bool = True):
        super().__init__(model, backend, refresh="none", trace=trace, analysis=analysis)
        self.node_layer = node_layers(self.model)
        self.layer_stats: dict = {}
        self._bar = None
        self._cur = None
        self.fused = find_token_split_linears(self.model, self.analysis)  # node groups run as one operation
        # memory by node (engines with start_window: the dry run): (index, bytes live before, peak during, after)
        self.node_mem: list[tuple] = []
        self.value_cts: dict = {}  # encrypted value -> {id(ciphertext): bytes} (for the live set at the peak)
        self.chunked = chunked
        self.regions = self._plan_regions() if chunked else {}
        self.region_of = {i: reg for reg in self.regions.values() for i in reg["nodes"]}
        self._pending: list = []
        self._placeholders: dict = {}
        self._obj_names: dict = {}
        self._res = None
        self.chunk_log: list[dict] = []

    def _check_levels(self, r, node, args):  # the backend refreshes where levels run out
        return

    def run(self, feeds, progress=False):
        self.layer_stats = {}
        self.node_mem = []
        self.value_cts = {}
        self._pending, self._placeholders, self._obj_names, self.chunk_log = [], {}, {}, []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            layers = []
            for i, r in enumerate(self.analysis.nodes):
                key = self._key(i)
                if r.encrypted and key not in layers:
                    layers.append(key)
            bar = tqdm(total=len(layers), desc=progress if isinstance(progress, str) else "seal layers",
                       unit="layer", leave=False)
        self._bar, self._cur = bar, None
        try:
            return super().run(feeds)
        finally:
            if bar is not None:
                bar.update(bar.total - bar.n)
                bar.close()
            self._bar = None

    def _key(self, i):
        lay = self.node_layer[i]
        return "head" if lay is None else int(lay)

    def _exec(self, i, node, r, args):
        B = self.backend
        e = B.engine
        key = self._key(i)
        if key != self._cur:
            if self._bar is not None and self._cur is not None:
                self._bar.update(1)
            if self._bar is not None:
                self._bar.set_postfix_str(f"layer {key}", refresh=True)
            self._cur = key
        c0 = Counter(e.counts)
        est0 = Counter(getattr(e, "est_ms", {}))
        n0 = B.n_refresh
        live0 = e.start_window() if hasattr(e, "start_window") else None
        t0, cpu0 = time.perf_counter(), time.process_time()
        role = self.fused.get(i)
        out = run_fused(B, role, node, args, lambda a: super(PackedInterpreter, self)._exec(i, node, r, a)) \
            if role else None
        if out is None:
            out = self._exec_region(i, node, r, args) if i in self.region_of else super()._exec(i, node, r, args)
        if live0 is not None:
            self.node_mem.append((i, live0, e.window_peak, e.live_bytes + e.cache_bytes))
        st = self.layer_stats.setdefault(key, {"seconds": 0.0, "counts": Counter(), "est_ms": Counter(),
                                               "refreshes": 0, "nodes": 0, "cpu_seconds": 0.0})
        st["seconds"] += time.perf_counter() - t0
        st["cpu_seconds"] += time.process_time() - cpu0  # what one core spent: comparable with the estimate
        st["counts"].update(Counter(e.counts) - c0)
        if hasattr(e, "est_ms"):
            st["est_ms"].update(Counter(e.est_ms) - est0)
        st["refreshes"] += B.n_refresh - n0
        st["nodes"] += 1
        return out

    def _after_value(self, name, val, res, r):
        self._res = res
        if isinstance(val, PackedTensor) and val.meta.get("deferred"):
            return None  # a chunked region's value: recorded when the region has run
        if self.backend.is_ct(val):
            self._obj_names.setdefault(id(val), set()).add(name)
        e = self.backend.engine
        if hasattr(e, "start_window") and self.backend.is_ct(val):
            self.value_cts[name] = {id(c): ciphertext_bytes(e.N, e.level(c)) for c in val.cts}
        return super()._after_value(name, val, res, r)

    def memory_by_node(self, top: int = 10) -> dict:
        """Where the live-ciphertext memory goes (after a dry run): the ``top`` nodes by the peak of live
        ciphertexts (+ cached plaintexts) while they run, and the encrypted values live at the highest one (a
        ciphertext shared by several values, e.g. a Reshape's output, is counted once, for the first)."""
        if not self.node_mem:
            return {}
        G = 2 ** 30
        rows = sorted(self.node_mem, key=lambda t: -t[2])[:top]
        layer = lambda i: self._key(i)  # noqa: E731
        nodes = [{"node": self.analysis.nodes[i].name, "op_type": self.nodes[i].op_type, "layer": layer(i),
                  "peak_bytes": int(pk), "peak_gib": round(pk / G, 3), "live_before_gib": round(b / G, 3), "live_after_gib": round(a / G, 3)}
                 for i, b, pk, a in rows]
        i_pk = rows[0][0]
        produced, freed = {}, {}
        for j, n in enumerate(self.nodes):
            for x in n.output:
                produced.setdefault(x, j)
        for j, xs in self.last_use.items():
            for x in xs:
                freed[x] = j
        live, seen = [], set()
        for x in sorted(self.value_cts, key=lambda v: produced.get(v, -1)):
            if produced.get(x, -1) <= i_pk and freed.get(x, len(self.nodes)) >= i_pk:
                cts = self.value_cts[x]
                own = {k: b for k, b in cts.items() if k not in seen}
                seen |= set(cts)
                if own:
                    live.append({"value": x, "ciphertexts": len(own), "bytes": int(sum(own.values())),
                                 "gib": round(sum(own.values()) / G, 3)})
        live.sort(key=lambda d: -d["gib"])
        by_layer: dict = {}
        for i, _b, pk, _a in self.node_mem:
            k = str(self._key(i))
            by_layer[k] = max(by_layer.get(k, 0), int(pk))
        return {"top_nodes": nodes, "peak_node": nodes[0]["node"], "peak_bytes_by_layer": by_layer,
                "live_at_peak": live[:top],
                "live_at_peak_values": len(live)}


    # ---- chunked regions -----------------------------------------------------------------------------------------
    # A run of consecutive encrypted element-wise nodes (and reductions over other axes) on [1, heads, ., .]
    # tensors -- the attention's CGF statistics and exp polynomial on the diagonal scores -- is evaluated one group
    # of heads at a time (heads whose ciphertexts are shared stay together): every ciphertext meets exactly the
    # operations it meets in the whole-tensor schedule, in the same order, so the numbers and the operation counts
    # are the same, but only one group's intermediate powers are alive at a time and a region input that dies in
    # the region is released group by group.
    def _plan_regions(self) -> dict:
        shapes = self.analysis.shapes
        outputs = {o.name for o in self.graph.output}

        def heads(i):
            n = self.nodes[i]
            if n.op_type not in CHUNK_OPS or not n.output:
                return 0
            sh = [shapes.get(o) for o in n.output]
            if any(x is None or len(x) != 4 or not isinstance(x[1], int) or x[1] < 2 for x in sh):
                return 0
            return sh[0][1] if len({x[1] for x in sh}) == 1 else 0

        runs, cur, cur_key = [], [], None
        for i, n in enumerate(self.nodes):
            if not self.analysis.nodes[i].encrypted:
                continue
            h = heads(i)
            key = (self._key(i), h)
            if h and cur and key == cur_key:
                cur.append(i)
                continue
            runs.append(cur)
            cur, cur_key = ([i] if h else []), key
        runs.append(cur)
        consumers: dict = {}
        for j, n in enumerate(self.nodes):
            for x in n.input:
                if x:
                    consumers.setdefault(x, set()).add(j)
        regions = {}
        for run in runs:
            if len(run) < 2:
                continue
            inside = set(run)
            produced = [o for i in run for o in self.nodes[i].output if o]
            out = [x for x in produced if consumers.get(x, set()) - inside or x in outputs or x in self.trace_names
                   or x in self.nodes[run[-1]].output]
            # drop[k]: values produced in the region whose last consumer inside it is run[k] (not its outputs)
            last = {}
            for k, i in enumerate(run):
                for x in self.nodes[i].input:
                    if x in produced:
                        last[x] = k
            drop = [[] for _ in run]
            for x, k in last.items():
                if x not in out:
                    drop[k].append(x)
            regions[run[-1]] = {"nodes": run, "heads": heads(run[0]), "outputs": out, "drop": drop,
                                "end": run[-1]}
        return regions

    def _live_after(self, name: str, end: int) -> bool:
        """Is the value ``name`` read after node ``end`` (or kept: a graph output, a traced value)?"""
        if name in self.trace_names or name in {o.name for o in self.graph.output}:
            return True
        return any(name in self.nodes[j].input for j in range(end + 1, len(self.nodes)))

    def _exec_region(self, i, node, r, args):
        reg = self.region_of[i]
        self._pending.append((i, node, r, list(args)))
        if i != reg["end"]:  # deferred: placeholders now, filled in place when the region has run
            outs = []
            for name in node.output:
                ph = PackedTensor([], np.zeros((0,), dtype=np.int64), np.zeros((0, self.backend.slots), dtype=bool),
                                  meta={"deferred": True})
                self._placeholders[name] = (ph, r)
                outs.append(ph)
            return outs
        pend, self._pending = self._pending, []
        try:
            vals = self._run_region(reg, pend)
        finally:
            pend.clear()
        for name, (ph, r_k) in list(self._placeholders.items()):
            if name in vals:
                v = vals[name]
                ph.cts, ph.smap, ph.support, ph.alias, ph.period = v.cts, v.smap, v.support, v.alias, v.period
                ph.meta = dict(v.meta)
                self._after_value(name, ph, self._res, r_k)
        self._placeholders.clear()
        return [vals[name] for name in node.output]

    def _run_region(self, reg: dict, pend: list) -> dict:
        B = self.backend
        produced = {o for (_, n, _, _) in pend for o in n.output}
        inputs = {}
        for _, n, _, a in pend:
            for x, v in zip(n.input, a):
                if x and x not in produced:
                    inputs[x] = v
        cts_in = {x: v for x, v in inputs.items() if B.is_ct(v)}
        H = reg["heads"]
        groups = None
        if cts_in and all(len(v.shape) == 4 and v.shape[1] == H for v in cts_in.values()) and all(
                len({B.engine.level(c) for c in v.cts}) == 1 for v in cts_in.values()):
            groups = axis_groups(list(cts_in.values()), 1, B.slots)
        plain_ok = all(B.is_ct(v) or v is None or np.ndim(v) < 3 or
                       np.shape(v)[np.ndim(v) - 3] in (1, H) for v in inputs.values())
        if groups is None or len(groups) < 2 or not plain_ok or not all(self._keeps_axis1(n, a)
                                                                         for _, n, _, a in pend):
            groups = None
        self.chunk_log.append({"first": pend[0][2].name, "last": pend[-1][2].name, "nodes": len(pend),
                               "chunks": 1 if groups is None else len(groups)})
        if groups is None:  # the whole tensors, node by node (the unchunked schedule)
            return self._region_pass(reg, pend, dict(inputs))
        end = reg["end"]
        freeable = {x for x, v in cts_in.items()
                    if not any(self._live_after(nm, end) for nm in self._obj_names.get(id(v), {x}) | {x})}
        parts = {x: [] for x in reg["outputs"]}
        n0 = B.n_refresh
        refresh_by_node: Counter = Counter()
        for g in groups:
            env, sliced = {}, {}
            for x, v in inputs.items():
                if B.is_ct(v):
                    env[x], used = take_axis(v, g, 1, B.slots)
                    sliced[x] = (env[x], used)
                elif v is not None and np.ndim(v) >= 3 and np.shape(v)[np.ndim(v) - 3] == H:
                    env[x] = np.take(v, g, axis=np.ndim(v) - 3)
                else:
                    env[x] = v
            out = self._region_pass(reg, pend, env, refresh_by_node)
            for x in parts:
                parts[x].append(out[x])
            del out
            env.clear()
            for x, (t, used) in sliced.items():  # release a dying input's ciphertexts, else write back any refresh
                v = cts_in[x]
                if x in freeable:
                    for j in used:
                        v.cts[j] = None
                elif any(t.cts[k] is not v.cts[j] for k, j in enumerate(used)):
                    v.support = v.support.copy()
                    for k, j in enumerate(used):
                        v.cts[j] = t.cts[k]
                        v.support[j] = t.support[k]
            sliced.clear()
        # a refresh of a whole value counts once (each group refreshed its share of the ciphertexts)
        B.n_refresh = n0 + sum(refresh_by_node.values())
        return {x: concat_axis(ps, groups, 1, B.slots) for x, ps in parts.items()}

    @staticmethod
    def _keeps_axis1(node, args) -> bool:
        """A reduction of the region leaves axis 1 (the heads) alone."""
        if node.op_type not in ("ReduceSum", "ReduceMean"):
            return True
        from ..fhe_ops import graph_attr

        axes = args[1] if len(args) > 1 and args[1] is not None else graph_attr(node, "axes")
        axes = [] if axes is None else [int(a) % 4 for a in np.asarray(axes).reshape(-1)]
        return bool(axes) and 1 not in axes and 0 not in axes and bool(graph_attr(node, "keepdims", 1))

    def _region_pass(self, reg: dict, pend: list, env: dict, refresh_by_node: Counter | None = None) -> dict:
        B = self.backend
        for k, (i, n, r, _) in enumerate(pend):
            a = [env[x] if x else None for x in n.input]
            n0 = B.n_refresh
            try:
                outs = Interpreter._exec(self, i, n, r, a)
            except SimulationError as exc:
                raise type(exc)(f"node {r.name} ({n.op_type}; evaluated by head groups up to this node): {exc}") \
                    from exc
            del a
            if refresh_by_node is not None:
                refresh_by_node[i] = max(refresh_by_node[i], B.n_refresh - n0)
            env.update((o, v) for o, v in zip(n.output, outs) if o)
            for x in reg["drop"][k]:
                env.pop(x, None)
        return {x: env[x] for x in reg["outputs"]}


class KeySet:
    """The client (secret, relinearisation and Galois keys) and the server engine of one run, with the key policy
    both the CLI runner and the Python API use: keep the set while it covers the rotation steps an example needs,
    else replace it by one made for exactly that example's steps (examples of other lengths rotate by other steps;
    one union set for every length held 668 keys, 5.3 GiB at N=16384, 16.2 GB peak RSS, where each example needs
    ~200). The old client, its keys and engine are dropped before the new keygen."""

    def __init__(self, params, client: SealClient | None = None, engine: SealEngine | None = None):
        self.params, self.client, self.engine = params, client, engine

    def covers(self, steps) -> bool:
        return self.client is not None and set(steps) <= set(self.client.steps)

    def ensure(self, steps, pt_cache_bytes: int | None = None) -> float:
        """Keys for ``steps``; returns the keygen seconds (0.0 when the held set is reused). ``pt_cache_bytes``:
        the engine's plaintext-cache cap (None: SealEngine's default), only ever raised on a kept engine."""
        if self.engine is not None and pt_cache_bytes is not None:
            self.engine.cache_cap = max(self.engine.cache_cap, int(pt_cache_bytes))
        if self.covers(steps):
            return 0.0
        self.client = self.engine = None
        import gc

        gc.collect()
        self.client = SealClient(self.params, sorted(set(steps)))
        cache = {} if pt_cache_bytes is None else {"pt_cache_bytes": int(pt_cache_bytes)}
        self.engine = SealEngine(self.params, self.client, self.client.hand_over_public(), **cache)
        return self.client.keygen_seconds


def memory_estimate(eng: NumpyEngine, params, cache_bytes: int = 0) -> dict:
    """Peak memory of the encrypted run from its dry run: SEAL's memory pool keeps every freed ciphertext buffer
    for reuse by one of the same size (the same level), so the ciphertexts cost the sum over levels of each level's
    peak, not the peak of their total; plus cached plaintexts and the keys, times MEMORY_OVERHEAD, plus the
    process."""
    data_primes = len(params.coeff_bits) - 1
    keys = galois_key_bytes(params.poly_modulus, data_primes) * (len(eng.steps) + 1)
    pool = int(sum(eng.peak_by_level.values()))
    return {"estimated_peak_bytes": int((pool + cache_bytes + keys) * MEMORY_OVERHEAD + BASE_BYTES),
            "ciphertext_pool_bytes": pool, "galois_key_bytes": int(keys)}


def _layers_table(stats: dict) -> list[dict]:
    rows = []
    for key, st in stats.items():
        c = st["counts"]
        row = {"layer": key, "seconds": round(st["seconds"], 3), "cpu_seconds": round(st["cpu_seconds"], 3),
               "nodes": st["nodes"],
               "refreshes": st["refreshes"], **{k: int(c.get(k, 0)) for k in COUNT_KINDS}}
        if st["est_ms"]:
            row["estimated_seconds"] = round(sum(st["est_ms"].values()) / 1e3, 3)
        rows.append(row)
    return rows


class PackedRunner:
    """Plain baseline (reuses the dataset runner's tracing and error bookkeeping), dry run, SEAL run."""

    def __init__(self, onnx_path: str, cfg, *, pt_cache_budget: int = PT_CACHE_BUDGET):
        self.cfg = cfg
        self.base = BatchRunner(onnx_path, replace(cfg, backend="plain"))
        self.model, self.analysis = self.base.model, self.base.analysis
        self.params = cfg.ckks_params()
        self.trace = set(self.base.layer_values.values()) | {EMB}
        self.pt_cache_budget = pt_cache_budget
        self.pt_cache_bytes = 0  # decided by the dry run (plan_cache)
        self.keys = KeySet(self.params)  # the client and server engine, under the shared key policy

    # ---- dry run -----------------------------------------------------------------------------------------------
    def dry_run(self, feeds: dict, *, noise: bool = False, seed: int = 0, rotation_std: dict | None = None) -> dict:
        """The packed schedule on float64 slot vectors (no encryption). Raises SimulationError naming the node
        that cannot be packed. ``noise``: the emulator's matching mode (rotation errors from ``rotation_std``,
        else measured per level on a throwaway key)."""
        rot = (rotation_std or calibrate_rotation_noise(self.params)) if noise else None
        eng = NumpyEngine(self.params, noise=noise, seed=seed, pt_cache_bytes=0, rotation_std=rot)
        be = PackedBackend(self.params, eng)
        it = PackedInterpreter(self.model, be, trace=self.trace, analysis=self.analysis)
        t0 = time.perf_counter()
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported as negative headroom
            res = it.run(feeds)
        L = be.layout
        cache = eng.pt_bytes_total if eng.pt_bytes_total <= self.pt_cache_budget else 0
        mem = memory_estimate(eng, self.params, cache)
        keys, peak = mem["galois_key_bytes"], mem["estimated_peak_bytes"]
        return {"outputs": res.outputs, "trace": res.trace, "seconds": time.perf_counter() - t0,
                "counts": {k: int(v) for k, v in eng.counts.items()}, "steps": sorted(eng.steps),
                "layers": _layers_table(it.layer_stats), "refreshes": be.n_refresh,
                "refreshed_ciphertexts": be.refreshed_ciphertexts,
                "layout": None if L is None else {"slots": L.slots, "tokens": L.S, "hidden": L.H,
                                                  "block": L.S_blk, "hidden_per_ct": L.hp},
                "estimated_seconds": sum(eng.est_ms.values()) / 1e3,
                "estimated_ms_by_kind": {k: round(v, 3) for k, v in eng.est_ms.items()},
                "estimated_peak_bytes": peak, "ciphertext_peak_bytes": int(eng.peak_bytes),
                "ciphertext_pool_bytes": mem["ciphertext_pool_bytes"],
                "plaintext_bytes": int(eng.pt_bytes_total), "plaintext_cache_bytes": int(cache),
                "galois_key_bytes": int(keys), "galois_keys": len(eng.steps),
                "rotations_used": sorted(eng.rot_used),
                "min_headroom_bits": None if eng.min_headroom_bits == float("inf") else eng.min_headroom_bits,
                "min_headroom_level": eng.min_headroom_level, "memory_by_node": it.memory_by_node(),
                "ciphertext_peak_bytes_by_level": {int(k): int(v) for k, v in sorted(eng.peak_by_level.items())},
                "chunked_regions": it.chunk_log}

    def check_schedule(self, dry: dict, feeds: dict, index: int) -> float:
        """Refuse an example whose dry run (the packed schedule on float64 slots, no encryption) does not give
        plain's logits: a packing bug would otherwise cost a whole encrypted run and look like CKKS noise.
        Returns the max |logit difference|."""
        plain = self.base.plain.run(feeds).outputs[LOGITS]
        got = dry["outputs"][LOGITS]
        diff = float(np.abs(got - plain).max()) if np.all(np.isfinite(got)) else float("inf")
        if not diff <= SCHEDULE_TOL * max(1.0, float(np.abs(plain).max())):
            raise SimulationError(
                f"example {index}: the packed schedule's dry run gives logits {np.round(got, 4).tolist()} where "
                f"plain gives {np.round(plain, 4).tolist()} (max |diff| {diff:.3g}): a packing error, not CKKS "
                "noise; nothing was encrypted. Run `--dry-run` to see it per example; exporting with "
                "--no-fold-stats avoids the statistics-fold packing")
        return diff

    def check_memory(self, dry: dict) -> None:
        """Refuse what cannot fit memory, or would overflow the modulus (a slot, garbage included, beyond
        Q_l / (2 s_l) wraps the whole ciphertext)."""
        import psutil

        head = dry.get("min_headroom_bits")
        if head is not None and head < 0:
            raise SimulationError(f"a slot of the packed schedule exceeds the modulus at level "
                                  f"{dry['min_headroom_level']} by {-head:.1f} bits (inf: not finite): the encrypted "
                                  "run would "
                                  "decrypt garbage; use a longer first prime or smaller activations")

        avail = psutil.virtual_memory().available
        if dry["estimated_peak_bytes"] > avail:
            raise SimulationError(
                f"not enough memory for the seal backend: the dry run needs about "
                f"{dry['estimated_peak_bytes'] / 2**30:.1f} GiB (live ciphertexts "
                f"{dry['ciphertext_peak_bytes'] / 2**30:.1f} GiB, their per-level peaks "
                f"{dry['ciphertext_pool_bytes'] / 2**30:.1f} GiB, cached plaintexts "
                f"{dry['plaintext_cache_bytes'] / 2**30:.1f} GiB, {dry['galois_keys']} Galois keys "
                f"{dry['galois_key_bytes'] / 2**30:.1f} GiB, x{MEMORY_OVERHEAD}) but {avail / 2**30:.1f} GiB is "
                "available: lower --max-length or use a narrower student")

    # ---- keys and the encrypted run ------------------------------------------------------------------------------
    def ensure_keys(self, steps, cache_bytes: int = 0) -> float:
        self.pt_cache_bytes = max(self.pt_cache_bytes, int(cache_bytes))
        return self.keys.ensure(steps, self.pt_cache_bytes)

    @property
    def client(self) -> SealClient | None:
        return self.keys.client

    @property
    def engine(self) -> SealEngine | None:
        return self.keys.engine

    def run_seal(self, feeds: dict, progress=False) -> dict:
        be = PackedBackend(self.params, self.engine)
        it = PackedInterpreter(self.model, be, trace=self.trace, analysis=self.analysis)
        c0 = Counter(self.engine.counts)
        t0 = time.perf_counter()
        res = it.run(feeds, progress=progress)
        return {"outputs": res.outputs, "trace": res.trace, "seconds": time.perf_counter() - t0,
                "counts": {k: int(v) for k, v in (Counter(self.engine.counts) - c0).items()},
                "layers": _layers_table(it.layer_stats), "refreshes": be.n_refresh,
                "refreshed_ciphertexts": be.refreshed_ciphertexts, "backend": be.describe()}

    # ---- one example -------------------------------------------------------------------------------------------
    def run_example(self, index: int, feeds: dict, labels: np.ndarray, *, progress=False,
                    compare_emulator: bool = False, dry: dict | None = None) -> dict:
        out = self.base.run(index, feeds, labels)  # plain baseline: logits + traces
        mask = feeds[MASK]
        plain_tr = self.base.plain.run(feeds).trace
        dry = dry or self.dry_run(feeds)
        self.check_memory(dry)
        keygen = self.ensure_keys(dry["steps"], dry["plaintext_cache_bytes"])
        import resource

        sr = self.run_seal(feeds, progress=progress)
        out.update(logits=sr["outputs"][LOGITS], seconds=sr["seconds"], refreshes=sr["refreshes"],
                   layers=self.base.layer_errors(plain_tr, sr["trace"], mask),
                   poly=self.base.poly_counts(sr["trace"], mask), level_mismatches=[], predicted=None,
                   op_counts=sr["counts"], op_seconds={k: float(v) for k, v in self.engine.seconds.items()})
        seal_info = {"layers": _merge_layer_rows(sr["layers"], dry["layers"]), "keygen_seconds": keygen,
                     "galois_keys": len(self.client.steps), "dry_run": {k: v for k, v in dry.items()
                                                                          if k not in ("outputs", "trace")},
                     "refreshed_ciphertexts": sr["refreshed_ciphertexts"], "backend": sr["backend"],
                     "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                     "dry_run_max_logit_diff": float(np.abs(dry["outputs"][LOGITS]
                                                            - out["plain_logits"]).max())}
        if compare_emulator:  # the emulator's rotation errors measured with this run's own keys and levels
            t_cal = time.perf_counter()
            rot = calibrate_rotations(self.engine, [tuple(p) for p in dry["rotations_used"]])
            seal_info["rotation_calibration_seconds"] = time.perf_counter() - t_cal
            emu = self.dry_run(feeds, noise=True, seed=index, rotation_std=rot)
            seal_info["compare_emulator"] = layer_error_stats(plain_tr, {"emulator": emu["trace"],
                                                                         "seal": sr["trace"]},
                                                              self.base.layer_values, mask)
        out["seal"] = seal_info
        return out


def _merge_layer_rows(measured: list[dict], estimated: list[dict]) -> list[dict]:
    est = {r["layer"]: r for r in estimated}
    rows = []
    for r in measured:
        e = est.get(r["layer"], {})
        rows.append({**r, "estimated_seconds": e.get("estimated_seconds")})
    return rows


def layer_error_stats(plain: dict, runs: dict, layer_values: dict, mask) -> list[dict]:
    """Per encoder layer: mean and std of (run - plain) over the valid tokens, for each run, and the std ratio."""
    rows = []
    names = [("input", EMB)] + [(int(k), v) for k, v in sorted(layer_values.items())]
    m = np.asarray(mask).astype(bool)
    for lay, v in names:
        if v not in plain:
            continue
        row = {"layer": lay, "value": v}
        for name, tr in runs.items():
            if v not in tr:
                continue
            d = tr[v] - plain[v]
            if d.ndim >= 2 and d.shape[:2] == m.shape:
                d = d[np.broadcast_to(m.reshape(m.shape + (1,) * (d.ndim - 2)), d.shape)]
            row[f"{name}_mean"] = float(np.mean(d))
            row[f"{name}_std"] = float(np.std(d))
        if row.get("seal_std") and "emulator_std" in row:
            row["std_ratio"] = row["emulator_std"] / row["seal_std"] if row["seal_std"] > 0 else None
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# the dataset loop: resumable, one atomic file per example
# ---------------------------------------------------------------------------------------------------------------
def run_fingerprint(onnx_path, cfg) -> str:
    return run_identity(onnx_path, cfg)["fingerprint"]


def run_identity(onnx_path, cfg) -> dict:
    """What an example's result depends on, recorded in each ``DIR/examples/NNNNN.json``: the sha256 of the ONNX
    file's bytes, the CKKS parameters that define the ciphertexts (N, coefficient bits, scale) and the token cap.
    ``fingerprint`` (16 hex digits over all of it) is the older single check, kept in the summary."""
    model = hashlib.sha256()
    fp = hashlib.sha256()
    with open(onnx_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            model.update(chunk)
            fp.update(chunk)
    p = cfg.ckks_params()
    fp.update(json.dumps({"params": p.describe(), "max_length": cfg.max_length}, sort_keys=True, default=str).encode())
    return {"model_sha256": model.hexdigest(),
            "ckks": {"poly_modulus": int(p.poly_modulus), "coeff_bits": [int(b) for b in p.coeff_bits],
                     "scale_bits": int(p.scale_bits)},
            "max_length": cfg.max_length, "fingerprint": fp.hexdigest()[:16]}


def _ckks_str(c: dict) -> str:
    return f"N={c.get('poly_modulus')} coeff bits {c.get('coeff_bits')} scale 2^{c.get('scale_bits')}"


def check_resumed_example(path: Path, prev: dict, ident: dict, onnx_path) -> str:
    """An example file found in the run folder may be reused only if it came from the same ONNX bytes and CKKS
    parameters. A mismatch raises a one-line :class:`SimulationError` naming the file and both values (the file is
    left as it is: never overwritten, never deleted). Returns ``"sha256"`` when checked; for a file written before
    model hashes were recorded (no ``model_sha256``) ``"fingerprint"`` when its older 16-digit run fingerprint
    matches (a different one is refused), ``"unchecked"`` when it has none: both accepted, the caller warns."""
    have = prev.get("model_sha256")
    if have is None:
        old = prev.get("fingerprint")
        if old is not None and old != ident["fingerprint"]:
            raise SimulationError(
                f"{path}: example from another model or CKKS parameters (run fingerprint {old}, this run "
                f"{ident['fingerprint']} for {onnx_path}); refusing to mix them: move the file away or use another -o")
        return "unchecked" if old is None else "fingerprint"
    if have != ident["model_sha256"]:
        raise SimulationError(
            f"{path}: example computed with model sha256 {have}, but {onnx_path} has sha256 "
            f"{ident['model_sha256']}; refusing to mix models: move the file away or use another -o")
    ck = prev.get("ckks") or {}
    if ck != ident["ckks"]:
        raise SimulationError(
            f"{path}: example computed with CKKS params {_ckks_str(ck)}, this run uses {_ckks_str(ident['ckks'])} "
            f"(model sha256 {have}); refusing to mix them: move the file away or use another -o")
    if prev.get("max_length", ident["max_length"]) != ident["max_length"]:
        raise SimulationError(
            f"{path}: example computed with --max-length {prev.get('max_length')}, this run uses "
            f"{ident['max_length']} (model sha256 {have}); refusing to mix them: move the file away or use another -o")
    return "sha256"


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, default=_np_default))
    os.replace(tmp, path)


def _np_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Counter):
        return dict(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def _from_json(d: dict) -> dict:
    for k in ("labels", "logits", "plain_logits"):
        d[k] = np.asarray(d[k])
    return d


def simulate_packed(onnx_path, cfg, out_dir=None) -> dict:
    """``simulate --backend seal``: examples one by one (batch size 1), resumable when ``out_dir`` is given."""
    from .interpreter import load
    t0 = time.perf_counter()
    cfg = replace(cfg, batch_size=1)
    if cfg.examples is not None:
        if not cfg.examples:
            raise SimulationError("--examples selects no example")
        if cfg.limit is not None and max(cfg.examples) >= cfg.limit:
            raise SimulationError(f"--examples {max(cfg.examples)} is outside --limit {cfg.limit} (indices are 0-based)")
        if cfg.limit is None:
            cfg = replace(cfg, limit=max(cfg.examples) + 1)
    model = load(onnx_path)
    batches, client_info = client_batches(model, cfg)
    if cfg.examples is not None and max(cfg.examples) >= len(batches):
        raise SimulationError(f"--examples {max(cfg.examples)}: the dev set has {len(batches)} examples (0-based)")
    wanted = set(range(len(batches))) if cfg.examples is None else set(cfg.examples)
    runner = PackedRunner(str(onnx_path), cfg)
    done_dir = None
    ident = run_identity(onnx_path, cfg)
    fp = ident["fingerprint"]
    done = set()
    if out_dir is not None:
        done_dir = Path(out_dir) / "examples"
        done_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.dry_run:
            done = _resumable(done_dir, len(batches), ident, onnx_path)
    # dry runs first: refuse before anything is encrypted; each example then gets the key set of its own steps
    dries = {}
    todo = []
    if cfg.dry_run:
        return _dry_run_only(runner, batches, out_dir, time.perf_counter() - t0, wanted)
    for i, (feeds, labels) in enumerate(batches):
        if i in done or i not in wanted:
            continue
        dries[i] = runner.dry_run(feeds)
        runner.check_schedule(dries[i], feeds, i)
        runner.check_memory(dries[i])
        todo.append(i)
    from tqdm.auto import tqdm

    shown = sorted(wanted | done)  # the summary covers the selection and every example already in DIR
    bar = tqdm(total=len(shown), desc="simulate [seal]", unit="ex", disable=not cfg.progress,
               initial=len(shown) - len(todo))
    try:
        for i in todo:
            feeds, labels = batches[i]
            r = runner.run_example(i, feeds, labels, progress=cfg.progress, dry=dries[i],
                                   compare_emulator=cfg.compare_emulator)
            r.update(ident)
            if done_dir is not None:
                _atomic_json(done_dir / f"{i:05d}.json", r)
            else:
                dries[i] = r
            bar.update(1)
    finally:
        bar.close()
    results = []
    for i in shown:
        if done_dir is not None:
            results.append(_from_json(json.loads((done_dir / f"{i:05d}.json").read_text())))
        else:
            results.append(dries[i])
    info = {"layer_values": {str(k): v for k, v in runner.base.layer_values.items()},
            "total_depth": runner.analysis.total_depth, "refresh_plan": [],
            "level_budget": runner.params.level_budget, "op_stats": op_stats(results),
            "backend": results[-1]["seal"]["backend"] if results else None}
    per = [r["refreshes"] for r in results]
    extra = {"onnx": str(Path(onnx_path).resolve()), **client_info, "refresh_label": "client-aided refresh",
             "refreshes": int(max(per)) if per else 0, "seal": seal_summary(results), "fingerprint": fp,
             "model_sha256": ident["model_sha256"]}
    summary = summarize(results, cfg, info, time.perf_counter() - t0, extra)
    if out_dir is not None:
        from .report import write_report

        write_report(summary, out_dir)
        (Path(out_dir) / "seal_packed.md").write_text(seal_markdown(summary))
    return summary


def _resumable(done_dir: Path, n: int, ident: dict, onnx_path) -> set[int]:
    """The examples of this run already in ``done_dir`` (all checked before anything is computed: one file of
    another model refuses the whole run). Files without a model hash (older runs) are accepted with a warning."""
    done, unchecked = set(), []
    for i in range(n):
        f = done_dir / f"{i:05d}.json"
        if not f.is_file():
            continue
        try:
            prev = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise SimulationError(f"{f}: unreadable example file ({exc}); move it away or use another -o") from None
        if check_resumed_example(f, prev, ident, onnx_path) != "sha256":
            unchecked.append(f.name)
        done.add(i)
    if unchecked:
        print(f"warning: {len(unchecked)} example file(s) in {done_dir} record no model hash (written before "
              f"hashes were recorded; checked only by the older run fingerprint where they have one): reused: "
              f"{', '.join(unchecked)}", file=sys.stderr)
    return done


def _dry_run_only(runner: PackedRunner, batches, out_dir, seconds, wanted=None) -> dict:
    rows = []
    for i, (feeds, _labels) in enumerate(batches):
        if wanted is not None and i not in wanted:
            continue
        t0 = time.perf_counter()
        d = runner.dry_run(feeds)
        plain = runner.base.plain.run(feeds).outputs[LOGITS]
        diff = float(np.abs(d["outputs"][LOGITS] - plain).max())
        rows.append({"index": i, "tokens": int(feeds["embeddings"].shape[1]), "wall_seconds": time.perf_counter() - t0,
                     "max_logit_diff_vs_plain": diff,
                     "matches_plain": bool(diff <= SCHEDULE_TOL * max(1.0, float(np.abs(plain).max()))),
                     **{k: v for k, v in d.items() if k not in ("outputs", "trace", "seconds")}})
    out = {"dry_run_only": True, "examples": rows, "params": runner.params.describe(),
           "memory_overhead": MEMORY_OVERHEAD, "base_bytes": BASE_BYTES, "seconds": seconds}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        _atomic_json(Path(out_dir) / "seal_dry_run.json", out)
    return out


def seal_summary(results: list[dict]) -> dict:
    if not results:
        return {}
    last = results[-1]["seal"]
    per_ex = [{"index": r["index"], "seq_len": r["seq_len"], "seconds": r["seconds"], "refreshes": r["refreshes"],
               "max_logit_error": float(np.abs(np.asarray(r["logits"]) - np.asarray(r["plain_logits"])).max()),
               "peak_rss_bytes": r["seal"]["peak_rss_bytes"],
               "estimated_seconds": r["seal"]["dry_run"]["estimated_seconds"],
               "estimated_peak_bytes": r["seal"]["dry_run"]["estimated_peak_bytes"]} for r in results]
    out = {"examples": per_ex, "layers_last_example": last["layers"], "keygen_seconds": last["keygen_seconds"],
           "galois_keys": last["galois_keys"], "layout_last_example": last["dry_run"]["layout"]}
    cmp = [r["seal"]["compare_emulator"] for r in results if r["seal"].get("compare_emulator")]
    if cmp:
        out["compare_emulator"] = cmp
    return out


def seal_markdown(s: dict) -> str:
    se = s.get("seal") or {}
    lines = ["# seal backend (packed real CKKS)", "",
             f"{s['n_examples']} examples, agreement {100 * s['agreement']:.1f}%, max |logit err| "
             f"{s['max_logit_error']:.3g}, {s['refreshes']} client-aided refreshes per inference (most), "
             f"keygen {se.get('keygen_seconds', 0):.1f} s for {se.get('galois_keys')} Galois keys", "",
             "| example | tokens | seconds | estimated s | refreshes | max logit err | peak RSS GiB | est. peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for e in se.get("examples", []):
        lines.append(f"| {e['index']} | {e['seq_len']} | {e['seconds']:.1f} | {e['estimated_seconds']:.1f} | "
                     f"{e['refreshes']} | {e['max_logit_error']:.2g} | {e['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{e['estimated_peak_bytes'] / 2**30:.2f} |")
    lines += ["", "Per layer (last example):", "",
              "| layer | seconds | estimated s | ct x pt | ct x ct | rotations | level matches | refreshes |",
              "|---|---|---|---|---|---|---|---|"]
    for r in se.get("layers_last_example", []):
        est = r.get("estimated_seconds")
        lines.append(f"| {r['layer']} | {r['seconds']:.1f} | {'' if est is None else f'{est:.1f}'} | "
                     f"{r['mul_pt']} | {r['mul_ct']} | {r['rotate']} | {r['level_match']} | {r['refreshes']} |")
    for k, rows in enumerate(se.get("compare_emulator", [])):
        lines += ["", f"Emulator (matching mode) vs seal, example {k}: error vs plain per layer", "",
                  "| layer | emulator mean | emulator std | seal mean | seal std | std ratio |", "|---|---|---|---|---|---|"]
        for r in rows:
            ratio = r.get("std_ratio")
            lines.append(f"| {r['layer']} | {r.get('emulator_mean', 0):.3g} | {r.get('emulator_std', 0):.3g} | "
                         f"{r.get('seal_mean', 0):.3g} | {r.get('seal_std', 0):.3g} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines) + "\n"


__all__ = ["PackedInterpreter", "PackedRunner", "simulate_packed", "layer_error_stats", "seal_markdown"]


# ---------------------------------------------------------------------------------------------------------------
# report side: this packing's operation counts and latency, without data
# ---------------------------------------------------------------------------------------------------------------
def _hidden_size(model) -> int:
    from .interpreter import read_metadata

    cfg = read_metadata(model).get("model_config") or {}
    if isinstance(cfg, dict) and cfg.get("hidden_size"):
        return int(cfg["hidden_size"])
    for inp in model.graph.input:
        if inp.name == "embeddings":
            d = inp.type.tensor_type.shape.dim[-1]
            if d.dim_value:
                return int(d.dim_value)
    raise SimulationError("cannot tell the hidden size: no cgf_fhe.model_config metadata and a symbolic "
                          "embeddings width")


def packed_cost_estimate(model, params, tokens: int, seed: int = 0, blocks: str = "auto") -> dict:
    """Rotation / ct x pt / ct x ct / refresh counts per encoder layer of the packed (``seal``) schedule for one
    example of ``tokens`` tokens, with the estimated latency (packing.op_ms at each operation's level) and peak
    memory: the dry run on random embeddings (the counts do not depend on the values). For ``report``, next to
    the element packing's estimates. ``blocks``: :meth:`packing.Layout.choose`'s block choice."""
    from .interpreter import load

    model = load(model)
    H = _hidden_size(model)
    rng = np.random.default_rng(seed)
    feeds = {"embeddings": rng.normal(size=(1, int(tokens), H)),
             "attention_mask": np.ones((1, int(tokens)), np.float32)}
    eng = NumpyEngine(params, pt_cache_bytes=0)
    be = PackedBackend(params, eng, blocks=blocks)
    it = PackedInterpreter(model, be)
    it.run(feeds)
    cache = eng.pt_bytes_total if eng.pt_bytes_total <= PT_CACHE_BUDGET else 0
    return {"packing": "seal (tokens x hidden per ciphertext, one example per pass)", "tokens": int(tokens),
            "params": params.describe(), "layers": _layers_table(it.layer_stats),
            "totals": {k: int(eng.counts.get(k, 0)) for k in COUNT_KINDS},
            "client_aided_refreshes": be.n_refresh, "galois_keys": len(eng.steps),
            "estimated_seconds": sum(eng.est_ms.values()) / 1e3,
            "estimated_ms_by_kind": {k: round(v, 3) for k, v in eng.est_ms.items()},
            "estimated_peak_bytes": memory_estimate(eng, params, cache)["estimated_peak_bytes"],
            "block_slots": be.layout.S_blk}


def cost_markdown(est: dict) -> str:
    lines = [f"Packed (seal) schedule at {est['tokens']} tokens: ~{est['estimated_seconds'] / 60:.1f} min and "
             f"~{est['estimated_peak_bytes'] / 2**30:.1f} GiB per example, {est['galois_keys']} Galois keys, "
             f"{est['client_aided_refreshes']} client-aided refreshes", "",
             "| layer | ct x pt | ct x ct | rotations | level matches | refreshes | estimated s |",
             "|---|---|---|---|---|---|---|"]
    for r in est["layers"]:
        lines.append(f"| {r['layer']} | {r['mul_pt']} | {r['mul_ct']} | {r['rotate']} | {r['level_match']} | "
                     f"{r['refreshes']} | {r.get('estimated_seconds', 0):.1f} |")
    return "\n".join(lines) + "\n"


__all__ += ["packed_cost_estimate", "cost_markdown"]


def run_packed(model, params, feeds: dict, *, runner_state: dict | None = None, progress=False):
    """One example through the seal backend (for the Python API): dry run (refusals, memory), keys for its
    rotation steps, encrypted run. ``runner_state`` keeps the client/server between calls (keys reused)."""
    import psutil

    from .interpreter import load

    model = load(model)
    state = runner_state if runner_state is not None else {}
    eng = NumpyEngine(params, pt_cache_bytes=0)
    PackedInterpreter(model, PackedBackend(params, eng)).run(feeds)
    need = memory_estimate(eng, params)["estimated_peak_bytes"]
    if need > psutil.virtual_memory().available:
        raise SimulationError(f"not enough memory for the seal backend: about {need / 2**30:.1f} GiB needed")
    keys = state.setdefault("keys", KeySet(params))
    keys.ensure(eng.steps)
    be = PackedBackend(params, keys.engine)
    return PackedInterpreter(model, be).run(feeds, progress=progress)


__all__ += ["run_packed"]
