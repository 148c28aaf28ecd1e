"""benchmarks/pooling_probe.py: the mean-pooling head reads the mean over valid tokens, so padding changes nothing."""
import torch
import json

from benchlib import REPO, load_benchmark


def test_mean_pooling_head_ignores_padding_and_pools_the_mean():
    probe = load_benchmark("pooling_probe")
    net, tok, _ = probe.with_mean_pooling("tiny", seed=3)
    net.eval()
    enc = tok(["a short one"], ["and its pair here"], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    padded = tok(["a short one"], ["and its pair here"], return_tensors="pt", padding="max_length", max_length=n + 7)
    assert int(padded["attention_mask"].sum()) == n
    with torch.no_grad():
        a = net(**enc).logits
        b = net(**padded).logits
        hidden = net.base_model(**enc).last_hidden_state
        pooler = net.base_model.pooler
        want = pooler.activation(pooler.dense(hidden.mean(1)))
        cls = pooler.activation(pooler.dense(hidden[:, 0]))
        got = net.base_model(**padded).pooler_output
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - cls).abs().max() > 1e-3  # not the [CLS] pooler
    # parameter names unchanged: the probe head saves under the checkpoint's usual keys
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= set(net.state_dict())


def test_search_page_prints_the_probe_command_and_head():
    rec = json.loads((REPO / "records" / "search-meanpool-lr1e-4-unfrz-wu.json").read_text())
    cmd = "python benchmarks/pooling_probe.py --seed 42 --resume -o runs/minilm/search/meanpool-lr1e-4-unfrz-wu"
    assert rec["command"] == cmd and "mean pooling head" in rec["title"]
    assert cmd in (REPO / "docs" / "recipes.md").read_text()
