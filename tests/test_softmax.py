"""CGF / exact softmax: known answers, masking, padding invariance inside a BERT."""
import math

import pytest
import torch

from cgf_fhe.models import build_model
from cgf_fhe.softmax import cgf_probs, exact_probs, set_softmax


def test_equal_scores_give_uniform_weights_for_both():
    scores = torch.full((2, 1, 3, 5), 1.7)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0]], dtype=torch.float32).view(2, 1, 1, 5)
    for probs in (cgf_probs(scores, keep, 0.5), exact_probs(scores, keep)):
        assert torch.allclose(probs[0], torch.full((1, 3, 5), 1 / 5), atol=1e-7)
        row = probs[1, 0, 0]
        assert torch.allclose(row[[0, 1, 3]], torch.full((3,), 1 / 3), atol=1e-7)
        assert row[2].item() == 0.0 and row[4].item() == 0.0


@pytest.mark.parametrize("c", [0.5, 0.65])
def test_cgf_three_keys_hand_computed(c):
    # scores 0, 1, 2: mean 1, population variance 2/3 -> p_i = exp(s_i - 1 - c*2/3) / 3
    s = [0.0, 1.0, 2.0]
    want_cgf = [math.exp(x - 1 - c * 2 / 3) / 3 for x in s]
    z = sum(math.exp(x) for x in s)
    want_exact = [math.exp(x) / z for x in s]
    scores = torch.tensor([[0.0, 1.0, 2.0, 50.0]])  # 4th key is masked: its huge score must not matter
    keep = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    got = cgf_probs(scores, keep, c)[0]
    assert got[:3].tolist() == pytest.approx(want_cgf, rel=1e-6)
    assert got[3].item() == 0.0
    assert exact_probs(scores, keep)[0, :3].tolist() == pytest.approx(want_exact, rel=1e-6)
    assert exact_probs(scores, keep)[0, 3].item() == 0.0
    # c = 0.5: 0.0879, 0.2388, 0.6492 vs the exact 0.0900, 0.2447, 0.6652 -- CGF is not normalised
    assert sum(want_cgf) < 1.0


def _sharpen(model, factor=20.0):
    """Random init gives near-zero attention scores (every softmax ~ uniform); scale the queries up."""
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(factor)
    return model


def _pairs(tok):
    a = ["the cat sat on the mat .", "a much longer first sentence that keeps going for a while ."]
    b = ["a cat was sitting .", "short ."]
    return a, b


@pytest.mark.parametrize("softmax", ["cgf", "exact"])
def test_padding_changes_nothing(softmax):
    model, tok = build_model("tiny", softmax, coeff=0.5, seed=0)
    _sharpen(model).eval()
    a, b = _pairs(tok)
    batch = tok(a, b, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # the batch really has padding

    def run(inputs):
        out = model(**inputs, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]

    with torch.no_grad():
        logits, hidden = run(batch)
        # sanity: attending to the padding would change the valid tokens' states far beyond the tolerance
        _, ignored = run({**batch, "attention_mask": torch.ones_like(mask)})
        assert (ignored - hidden)[mask.bool()].abs().max() > 1e-3
        for i in range(len(a)):
            single_logits, single_hidden = run(tok(a[i], b[i], return_tensors="pt"))
            n = int(mask[i].sum())
            assert torch.allclose(logits[i], single_logits[0], atol=1e-5)
            assert torch.allclose(hidden[i, :n], single_hidden[0], atol=1e-5)
        # extra right padding (longer than the batch needs) changes nothing either
        wide_logits, wide_hidden = run(tok(a, b, padding="max_length", max_length=48, return_tensors="pt"))
        assert torch.allclose(wide_logits, logits, atol=1e-5)
        assert torch.allclose(wide_hidden[:, : mask.shape[1]][mask.bool()], hidden[mask.bool()], atol=1e-5)


def test_masked_keys_get_exactly_zero_weight_in_model():
    model, tok = build_model("tiny", "cgf", coeff=0.5, seed=0)
    model.eval()
    a, b = _pairs(tok)
    batch = tok(a, b, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    pad = batch["attention_mask"] == 0  # [B, K]
    for att in out.attentions:  # [B, heads, Q, K]
        assert att.shape[-1] == pad.shape[1]
        key_pad = pad[:, None, None, :].expand_as(att)
        assert key_pad.any() and (att[key_pad] == 0).all()  # exactly zero, not just small
        assert (att[~key_pad] > 0).all()


def test_same_weights_scored_with_each_softmax_differ_and_switch_back():
    model, tok = build_model("tiny", "exact", seed=1)
    model.eval()
    _sharpen(model)
    batch = tok(*_pairs(tok), padding=True, return_tensors="pt")
    with torch.no_grad():
        exact = model(**batch).logits
        set_softmax(model, "cgf", 0.5)
        cgf = model(**batch).logits
        set_softmax(model, "cgf", 0.8)
        cgf8 = model(**batch).logits
        set_softmax(model, "exact")
        back = model(**batch).logits
    assert not torch.allclose(exact, cgf, atol=1e-6)
    assert not torch.allclose(cgf, cgf8, atol=1e-6)
    assert torch.equal(exact, back)
    with pytest.raises(ValueError, match="unknown softmax"):
        set_softmax(model, "relu")


PLANT = 5  # token id whose embedding carries the outlier feature


def _peaked_head_model():
    """Tiny CGF model whose layer-0 head 0 is peaked the way MiniLM heads are: every query puts one key (the
    planted token) far above the rest. Query = a constant, key = one embedding feature, large on the token."""
    model, _ = build_model("tiny", "cgf", 0.5, seed=3)
    model.eval()
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        sa = model.bert.encoder.layer[0].attention.self
        sa.query.weight[:d].zero_()
        sa.query.bias[:d].zero_()
        sa.query.bias[0] = 4.0
        sa.key.weight[:d].zero_()
        sa.key.bias[:d].zero_()
        sa.key.weight[0, 7] = 1.0
        model.bert.embeddings.word_embeddings.weight[PLANT, 7] = 1.0
    return model


def _peaked_batch(model):
    """8 sequences of 24 random tokens with the planted token at position 1; the last 4 padded after 18."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (8, 24), generator=gen)
    ids[:, 1] = PLANT
    mask = torch.ones(8, 24, dtype=torch.long)
    mask[4:, 18:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_per_head_coefficients_are_calibrated_toward_softmax_and_used_per_head():
    from cgf_fhe.softmax import calibrate_head_coeffs, set_head_coeffs

    model = _peaked_head_model()
    batch = _peaked_batch(model)
    mask = batch["attention_mask"]

    def l1_to_softmax(m):  # independent of the calibration code: the model's own attention outputs
        with torch.no_grad():
            set_softmax(m, "exact")
            ref = m(**batch, output_attentions=True).attentions
            set_softmax(m, "cgf")
            got = m(**batch, output_attentions=True).attentions
        keep = mask.float()
        return [((g - r).abs() * keep[:, None, None, :]).sum(-1).mul(keep[:, None, :]).sum((0, 2)) / keep.sum()
                for g, r in zip(got, ref)]

    before = l1_to_softmax(model)
    assert before[0][0] > 1.0  # the planted head: CGF at c = 0.5 is far off (weights explode on the outlier)
    res = calibrate_head_coeffs(model, [batch])
    assert model.config._attn_implementation == "cgf"  # restored after calibrating
    after = l1_to_softmax(model)
    assert res["coeffs"][0][0] > 0.5  # the peaked head needs a larger c: mean + c*var underestimates its LSE
    assert after[0][0] < 0.1 * before[0][0], (before[0], after[0])  # measured 3.65 -> 0.18
    assert res["l1"][0][0] == pytest.approx(float(after[0][0]), rel=1e-4)  # the reported L1 is the real one
    assert res["l1_at_single"][0][0] == pytest.approx(float(before[0][0]), rel=1e-4)
    assert all(torch.all(a <= b + 1e-6) for a, b in zip(after[1:], before[1:]))  # no other head gets worse
    # the attention function uses each head's own coefficient
    layers = model.config.num_hidden_layers
    set_head_coeffs(model, [[1.25, 0.5]] * layers)
    mixed = l1_to_softmax(model)
    set_head_coeffs(model, None)
    model.config.cgf_coeff = 1.25
    single = l1_to_softmax(model)
    model.config.cgf_coeff = 0.5
    assert float(mixed[0][0]) == pytest.approx(float(single[0][0]))  # head 0 at 1.25 either way
    assert float(mixed[0][1]) == pytest.approx(float(before[0][1]))  # head 1 still at 0.5
    assert float(single[0][1]) != pytest.approx(float(before[0][1]))
    with pytest.raises(ValueError, match="2 encoder layers of 2 heads"):
        set_head_coeffs(model, [[0.5, 0.5, 0.5]] * 2)
    with pytest.raises(ValueError, match="must be > 0"):
        set_head_coeffs(model, [[0.5, 0.0]] * 2)


def test_trainable_head_coefficients_learn_the_peaked_head_and_fix_to_constants():
    from cgf_fhe.softmax import COEFF_PARAM, calibrate_head_coeffs, fix_head_coeffs, train_head_coeffs

    model = _peaked_head_model()
    batch = _peaked_batch(model)
    mask = batch["attention_mask"]
    keep = mask.float()
    with torch.no_grad():
        set_softmax(model, "exact")
        ref = model(**batch, output_attentions=True).attentions
        set_softmax(model, "cgf")
        logits0 = model(**batch).logits

    def l1(m):  # per layer and head: mean L1 of the CGF rows to the softmax rows over valid queries
        att = m(**batch, output_attentions=True).attentions
        return [((g - r).abs() * keep[:, None, None, :]).sum(-1).mul(keep[:, None, :]).sum((0, 2)) / keep.sum()
                for g, r in zip(att, ref)]

    assert train_head_coeffs(model) == [[0.5, 0.5]] * 2  # from the single c
    coeffs = [p for n, p in model.named_parameters() if n.endswith(COEFF_PARAM)]
    assert len(coeffs) == 2 and all(p.shape == (2,) for p in coeffs)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits0)  # same function at the start
    for p in model.parameters():
        p.requires_grad_(False)
    for p in coeffs:
        p.requires_grad_(True)
    opt = torch.optim.Adam(coeffs, lr=0.1)
    before = None
    for _ in range(60):  # gradient descent on the coefficients alone
        loss = l1(model)
        before = before or [x.detach() for x in loss]
        opt.zero_grad()
        sum(x.sum() for x in loss).backward()
        opt.step()
    with torch.no_grad():
        after = l1(model)
        logits = model(**batch).logits
    trained = fix_head_coeffs(model)
    assert trained[0][0] > 1.0 and abs(trained[0][1] - 0.5) < 0.05  # measured 1.277; the flat head stays near 0.5
    assert after[0][0] < 0.1 * before[0][0], (before[0], after[0])  # measured 3.65 -> 0.175
    grid = calibrate_head_coeffs(_peaked_head_model(), [batch])  # the best grid point (1.25): L1 0.198
    assert float(after[0][0]) <= grid["l1"][0][0]  # the continuous optimum is at least as good
    # back to plaintext constants: no parameter left, the config holds them, the model computes the same
    assert not any(COEFF_PARAM in k for k in model.state_dict())
    assert model.config.cgf_coeff_heads == trained
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, logits, atol=1e-6)
    assert fix_head_coeffs(model) is None
