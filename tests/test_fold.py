"""Export folds of issue #22 (cgf_fhe.fold, softmax's weights-on-V): same logits, fewer levels, each fold measured."""
import warnings

import pytest
import torch

from cgf_fhe import softmax, surgery
from cgf_fhe.data import load_mrpc, make_loader, tokenize_split
from cgf_fhe.models import build_model
from cgf_fhe.split import ServerModel, client_embed, fold_for_export
from conftest import server_export_depth


@pytest.fixture(scope="module")
def student(mrpc_dir):
    model, tok = build_model("tiny", "cgf", 0.5, seed=0)
    model.eval()
    ds = tokenize_split(load_mrpc(mrpc_dir)["train"], tok, max_length=32, max_samples=16)
    loader = make_loader(ds, tok, 8, False)
    ranges = surgery.calibrate(model, loader, progress=False)
    surgery.polynomialize(model, surgery.FheOptions.from_profile("lean", newton_steps=1), ranges)
    batch = next(iter(loader))
    emb = client_embed(model, batch["input_ids"], batch["token_type_ids"]).detach()
    return model, emb, batch["attention_mask"].float()


def test_folds_keep_logits_and_save_five_levels_per_layer(student, monkeypatch):
    model, emb, mask = student
    with torch.no_grad():
        ref = ServerModel(model.eval())(emb, mask)  # the trained form, unfolded
        folded = fold_for_export(model)
        plain = fold_for_export(model, fold_layernorms=False)
        got = ServerModel(folded)(emb, mask)
    assert folded.cgf_folded_layernorms and not getattr(plain, "cgf_folded_layernorms", False)
    assert float((got - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
    n_layers = model.config.num_hidden_layers
    d_all = server_export_depth(ServerModel(folded), emb, mask)
    d_no_ln = server_export_depth(ServerModel(plain), emb, mask)
    monkeypatch.setattr(softmax, "_weights_ride_on_v", lambda *a, **k: False)
    d_none = server_export_depth(ServerModel(fold_for_export(model, fold_layernorms=False)), emb, mask)
    # two LayerNorms a layer, centring and output product each; the CGF statistics on Q/K after the first layer
    assert d_no_ln - d_all == 4 * n_layers + (n_layers - 1)
    assert d_none - d_no_ln == n_layers  # keep/n on V instead of on the exponentials
    assert d_all == surgery.model_depth(model)["total"]


def test_fold_refuses_frozen_layernorms(student):
    from cgf_fhe.fold import fold_layernorms
    from cgf_fhe.poly import FrozenLayerNorm
    from cgf_fhe.split import encoder_layers

    model, _, _ = student
    m = fold_for_export(model, fold_layernorms=False)
    layer = encoder_layers(m)[0]
    layer.output.LayerNorm = FrozenLayerNorm(1.0, hidden=layer.output.dense.out_features)
    assert fold_layernorms(encoder_layers(m)) is False
    assert type(layer.attention.self.query) is torch.nn.Linear  # nothing changed


def test_cgf_statistics_ride_on_query_and_key(student, monkeypatch):
    """The CGF statistics' plaintext factors (c, keep/n) ride on the query/key projections (cgf_fhe.fold.
    cgf_stats_core): same logits, also with padded keys, and one level less in every layer after the first."""
    from cgf_fhe import fold

    model, emb, mask = student
    padded = mask.clone()
    padded[::2, -9:] = 0.0  # every other example: the last 9 keys are padding
    with torch.no_grad():
        folded = fold_for_export(model)
        assert all(getattr(layer.attention.self, "cgf_stats_folded", False) for layer in folded.bert.encoder.layer)
        for m in (mask, padded):
            ref = ServerModel(model.eval())(emb, m)
            got = ServerModel(folded)(emb, m)
            assert float((got - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
    d_stats = server_export_depth(ServerModel(folded), emb, mask)
    monkeypatch.setattr(fold, "fold_cgf_statistics", lambda layers: 0)
    unfolded = fold_for_export(model)
    assert not getattr(unfolded.bert.encoder.layer[1].attention.self, "cgf_stats_folded", False)
    d_plain = server_export_depth(ServerModel(unfolded), emb, mask)
    assert d_plain - d_stats == model.config.num_hidden_layers - 1  # the first layer's input is not a folded LN
    assert d_stats == surgery.model_depth(model)["total"]


def test_statistics_fold_runs_in_the_interpreter_with_the_refresh_plan(student):
    """The folded graph (padded keys) runs in the plain interpreter as in torch, and in the CKKS emulator with the
    refresh plan of cgf_fhe.bootstrap at 14 levels, with no level mismatch."""
    import json

    import numpy as np
    import onnx

    from cgf_fhe.simulate import CKKSParams, Interpreter, make_backend

    model, emb, mask = student
    emb, mask = emb[:4, :12].contiguous(), mask[:4, :12].clone()
    mask[0, -3:] = 0.0
    with torch.no_grad():
        folded = fold_for_export(model)
        ref = ServerModel(model.eval())(emb, mask).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.onnx.export(ServerModel(folded), (emb, mask), dynamo=True, opset_version=18, verbose=False,
                              input_names=["embeddings", "attention_mask"], output_names=["logits"]).model_proto
    onnx.helper.set_model_props(m, {"cgf_fhe.encrypted_inputs": json.dumps(["embeddings"])})
    feeds = {"embeddings": emb.numpy(), "attention_mask": mask.numpy()}
    plain = Interpreter(m, make_backend("plain")).run(feeds).outputs["logits"]
    assert np.abs(plain - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    params = CKKSParams.from_options(None, None, 40, 14, insecure=True)
    it = Interpreter(m, make_backend("emulate", params, refresh_kind="client"))
    res = it.run(feeds)
    assert it.plan.point_count >= 1 and len(res.refreshed) == it.plan.count
    assert res.level_mismatches == []
    assert np.abs(res.outputs["logits"] - plain).max() < 1e-3
