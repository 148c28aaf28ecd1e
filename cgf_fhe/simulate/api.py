"""Python API, one object in the style of Concrete-ML's ``model.predict(x, fhe=...)``::

    from cgf_fhe.simulate import FHEModel, CKKSParams

    m = FHEModel("student.onnx", params=CKKSParams(8192, (60, 40, 40, 60)))
    emb, mask = m.embed(["The cat sat."], ["A cat was sitting."])      # client part, plaintext
    m.predict(emb, mask, fhe="plain")      # float64 reference
    m.predict(emb, mask, fhe="emulate")    # CKKS emulation (noise, levels, bootstraps)
    m.predict(emb, mask, fhe="tenseal")    # real CKKS; client-aided refreshes where the plan needs them
    m.predict(emb, mask, fhe="seal")       # real CKKS packed (one example per pass, rotations)
    m.simulate(fhe="emulate", limit=100, out_dir="sim/")               # MRPC dev, report files
"""
from __future__ import annotations

import numpy as np

from .. import layout
from .backends import BACKENDS, make_backend
from .backends.base import SimulationError
from .interpreter import Interpreter, RunResult, load, read_metadata
from .params import CKKSParams


class FHEModel:
    def __init__(self, onnx_model, *, checkpoint: str | None = None, params: CKKSParams | None = None,
                 refresh="plan", **backend_options):
        self.model = load(onnx_model)
        self.path = None if hasattr(onnx_model, "graph") else str(onnx_model)
        self.checkpoint = checkpoint
        self.params = params or CKKSParams()
        self.refresh = refresh
        self.backend_options = backend_options
        self._interp: dict[str, Interpreter] = {}
        self._client = None

    # ---- evaluation --------------------------------------------------------------------------------------------
    def interpreter(self, fhe: str = "plain") -> Interpreter:
        if fhe not in BACKENDS:
            raise SimulationError(f"fhe={fhe!r}: choose one of {', '.join(BACKENDS)}")
        if fhe not in self._interp:
            backend = make_backend(fhe, None if fhe == "plain" else self.params, **self.backend_options)
            self._interp[fhe] = Interpreter(self.model, backend, refresh=self.refresh)
        return self._interp[fhe]

    def run(self, embeddings: np.ndarray, attention_mask: np.ndarray | None = None, fhe: str = "plain",
            progress: bool = False) -> RunResult:
        emb = np.asarray(embeddings, dtype=np.float64)
        if attention_mask is None:
            attention_mask = np.ones(emb.shape[:2], dtype=np.float32)
        feeds = {"embeddings": emb, "attention_mask": np.asarray(attention_mask, dtype=np.float32)}
        if fhe == "seal":  # packed real CKKS, one example per pass (cgf_fhe.simulate.packed_runner)
            from .packed_runner import run_packed

            state = self.__dict__.setdefault("_seal_state", {})
            outs = [run_packed(self.model, self.params, {k: v[i:i + 1] for k, v in feeds.items()},
                               runner_state=state, progress=progress) for i in range(len(emb))]
            return RunResult(outputs={k: np.concatenate([o.outputs[k] for o in outs]) for k in outs[0].outputs},
                             seconds=sum(o.seconds for o in outs))
        return self.interpreter(fhe).run(feeds, progress=progress)

    def predict(self, embeddings, attention_mask=None, fhe: str = "plain") -> np.ndarray:
        """Logits ``[batch, num_labels]`` (decrypted by the client)."""
        return self.run(embeddings, attention_mask, fhe).outputs["logits"]

    def refreshes(self, fhe: str) -> int:
        """Refreshes per inference the plan places for this backend's level budget."""
        return self.interpreter(fhe).n_refresh_planned

    # ---- client part -------------------------------------------------------------------------------------------
    def _client_model(self):
        if self._client is None:
            from ..models import load_checkpoint
            from .runner import resolve_checkpoint

            model, tok, settings = load_checkpoint(resolve_checkpoint(self.model, self.checkpoint))
            self._client = (model.float().eval(), tok, settings)
        return self._client

    def embed(self, sentences1, sentences2=None, max_length: int | None = None):
        """Client part in plaintext: tokenize, embed, embedding LayerNorm -> (embeddings float64, mask)."""
        import torch

        from ..split import client_embed

        model, tok, settings = self._client_model()
        max_length = layout.max_length(settings, max_length, read_metadata(self.model))
        enc = tok(list(sentences1), list(sentences2) if sentences2 is not None else None, truncation=True,
                  max_length=int(max_length), padding=True, return_tensors="pt")
        with torch.no_grad():
            emb = client_embed(model, enc["input_ids"], enc.get("token_type_ids")).double().numpy()
        return emb, enc["attention_mask"].float().numpy()

    def predict_text(self, sentences1, sentences2=None, fhe: str = "plain") -> np.ndarray:
        emb, mask = self.embed(sentences1, sentences2)
        return self.predict(emb, mask, fhe)

    # ---- dataset -----------------------------------------------------------------------------------------------
    def simulate(self, fhe: str = "emulate", out_dir=None, **config) -> dict:
        """MRPC dev simulation (see :func:`cgf_fhe.simulate.runner.simulate`); ``config``: SimConfig fields."""
        from .runner import SimConfig, simulate

        if self.path is None:
            raise SimulationError("simulate() needs the model as a file path (worker processes reload it)")
        p = self.params
        cfg = SimConfig(backend=fhe, poly_modulus=p.poly_modulus, coeff_bits=p.coeff_bits, scale_bits=p.scale_bits,
                        insecure=p.insecure, checkpoint=self.checkpoint, refresh=self.refresh, **config)
        return simulate(self.path, cfg, out_dir)


def packed_seal_estimate(onnx_model, tokens: int, params: CKKSParams | None = None) -> dict:
    """Per-layer operation counts, estimated latency and peak memory of one ``tokens``-token example on the packed
    SEAL backend (``simulate --backend seal``): its dry run on random embeddings (no data, no keys)."""
    from .packed_runner import packed_cost_estimate

    return packed_cost_estimate(onnx_model, params or CKKSParams(), int(tokens))


__all__ = ["FHEModel", "packed_seal_estimate"]
