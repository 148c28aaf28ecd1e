"""benchmarks/approx_screen.py on a tiny random-weight CGF model: baseline, one kind at a time, levels, errors."""
import copy
import json

import pytest
import torch

from benchlib import load_benchmark

SCREEN = load_benchmark("approx_screen")


@pytest.fixture(scope="module")
def tiny(mrpc_dir, tiny_tokenizer):
    """(exact CGF model with 2 encoder layers, calibration batches, dev batches)."""
    from transformers import BertConfig, BertForSequenceClassification

    from cgf_fhe.data import load_mrpc, tokenize_split
    from cgf_fhe.softmax import set_softmax

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tiny_tokenizer.vocab_size, num_labels=2, hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, initializer_range=0.5)
    model = BertForSequenceClassification(cfg).eval()
    set_softmax(model, "cgf", 0.5)
    ds = load_mrpc(mrpc_dir)
    cal = SCREEN.batches_of(tokenize_split(ds["train"], tiny_tokenizer, 24, 48), tiny_tokenizer, 16)
    dev = SCREEN.batches_of(tokenize_split(ds["validation"], tiny_tokenizer, 24, 32), tiny_tokenizer, 16)
    return model, cal, dev


CONFIGS = ["tanh:tanh_degree=63", "tanh:tanh_degree=7", "exp", "exp:exp_degree=1,exp_squarings=0", "exp:exp_degree=7,exp_squarings=2",
           "ln", "ln:ln_band=None,newton_steps=1", "all:ln_band=None,newton_steps=1"]


@pytest.fixture(scope="module")
def rows(tiny):
    model, cal, dev = tiny
    m = copy.deepcopy(model)
    out = SCREEN.screen(m, cal, dev, CONFIGS, profile="lean", log=lambda s: None)
    return {r["config"]: r for r in out}, m


def test_baseline_is_exact_and_a_precise_replacement_stays_close(rows):
    by, _ = rows
    assert list(by)[0] == "baseline"
    for g in ("guard_on", "guard_off"):
        assert by["baseline"][g]["logit_mse"] == 0.0 and by["baseline"][g]["agreement"] == 1.0
        t = by["tanh:tanh_degree=63"][g]
        assert t["logit_mse"] < 1e-6 and t["nonfinite"] == 0 and t["agreement"] == 1.0
        assert t["logit_mse"] < by["tanh:tanh_degree=7"][g]["logit_mse"] / 100
    t = by["tanh:tanh_degree=63"]
    assert t["max_abs_error"]["tanh"] < by["tanh:tanh_degree=7"]["max_abs_error"]["tanh"] / 100
    assert t["kinds"] == ["tanh"] and t["levels"] == {"tanh": [6]}  # degree 63, folded: log2(64)


def test_a_bad_exp_is_worse_than_a_good_one(rows):
    by, _ = rows
    bad, good = by["exp:exp_degree=1,exp_squarings=0"], by["exp"]
    assert bad["max_rel_error"]["exp"] > 100 * good["max_rel_error"]["exp"]
    assert bad["guard_off"]["logit_mse"] > 100 * good["guard_off"]["logit_mse"]
    assert bad["levels"]["exp"] == [1, 1]  # degree 1, folded normalisation: one product


def test_levels_are_the_modules_depths(rows, tiny):
    from cgf_fhe import poly as P
    from cgf_fhe import surgery

    by, model = rows  # the model the screen ran on: CGF with calibrated head coefficients
    _, cal, _ = tiny
    ranges = surgery.calibrate(model, cal, progress=False)
    for config in ("exp:exp_degree=7,exp_squarings=2", "ln:ln_band=None,newton_steps=1",
                   "all:ln_band=None,newton_steps=1"):
        kinds, over = SCREEN.parse_config(config)
        m = copy.deepcopy(model)
        surgery.polynomialize(m, SCREEN.options_for("lean", kinds, over), ranges)
        mods = dict(surgery.named_approx_modules(m))
        ops = {e["key"]: e for e in by[config]["ops"]}
        assert set(ops) == set(mods)
        for key, mod in mods.items():
            want = mod.approx.depth(prescaled=True) if isinstance(mod, P.PolyModule) else mod.depth
            assert ops[key]["levels"] == want and ops[key]["depth_module"] == mod.depth
    assert by["exp:exp_degree=7,exp_squarings=2"]["levels"] == {"exp": [5, 5]}  # 3 (degree 7) + 2 squarings
    # invsqrt degree 15 folded (4) + centring, square, output (3) + one Newton step (2), less the output product
    # the last Newton step absorbs (poly.newton_ln_depth)
    assert by["ln:ln_band=None,newton_steps=1"]["levels"] == {"ln_attn": [8, 8], "ln_ffn": [8, 8]}
    assert by["all:ln_band=None,newton_steps=1"]["layer_levels_exported"] == [
        9 + 5 + 4 + 8 + 8 - 5, 9 + 5 + 4 + 8 + 8 - 6]  # 34 per layer less the folds of cgf_fhe.fold (surgery.model_depth)


def test_a_none_override_reaches_the_options(rows):
    by, _ = rows
    band = {e["key"]: e for e in by["ln"]["ops"]}
    nob = {e["key"]: e for e in by["ln:ln_band=None,newton_steps=1"]["ops"]}
    assert by["ln"]["levels"]["ln_attn"] == [7, 7]  # the lean profile: no Newton step
    # no band: the interval's top is the calibrated maximum (widened), above the 99.9% quantile's
    assert all(nob[k]["interval"][1] > band[k]["interval"][1] for k in band)
    assert all(nob[k]["newton_steps"] == 1 and band[k]["newton_steps"] == 0 for k in band)
    assert SCREEN.options_for("lean", ("ln",), {"ln_band": None}).ln_band is None


@pytest.mark.parametrize("config, token", [("exp:exp_degree7", "'exp_degree7' is not key=value"),
                                           ("gelu:gelu_degre=31", "'gelu_degre' is not an FheOptions field"),
                                           ("exp:exp_degree=3,exp_degree=5", "sets 'exp_degree' twice"),
                                           ("softmax", "unknown kind 'softmax'"),
                                           ("gelu:gelu_degree=0", "gelu_degree must be >= 1")])
def test_bad_config_is_one_line_naming_the_token(config, token, capsys, tmp_path):
    out = tmp_path / "x.json"
    assert SCREEN.main(["--teacher", "tiny", "--configs", "exp", config, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and token in err and config in err
    assert not out.exists()


def test_rows_are_replaced_by_label_and_config(tmp_path):
    out = tmp_path / "screen.json"
    SCREEN.write_rows(out, [{"label": "a", "config": "exp", "v": 1}, {"label": "a", "config": "gelu", "v": 1}], "c1")
    SCREEN.write_rows(out, [{"label": "a", "config": "exp", "v": 2}, {"label": "b", "config": "exp", "v": 3}], "c2")
    doc = json.loads(out.read_text())
    assert [(r["label"], r["config"], r["v"]) for r in doc["rows"]] == [("a", "gelu", 1), ("a", "exp", 2),
                                                                       ("b", "exp", 3)]
    assert doc["commands"] == ["c1", "c2"] and doc["command"] == "c2"
    assert [p.name for p in tmp_path.iterdir()] == ["screen.json"]  # no temporary file left


def test_screen_record_reaches_the_results_page(rows, tmp_path, capsys):
    import shutil
    import sys

    from benchlib import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from pagegen.build import build
    from pagegen.records import check_record

    by, _ = rows
    src = tmp_path / "approx_screen.json"
    common = {"teacher": "tiny", "profile": "lean", "n_calib": 48, "n_dev": 32, "head_coeffs": True}
    SCREEN.write_rows(src, [{**common, "label": "s", **r} for r in by.values()], "python benchmarks/approx_screen.py")
    SCREEN.write_rows(src, [{**common, "label": "other", **by["baseline"]}], "c2")
    recs = tmp_path / "records"
    shutil.copytree(REPO / "records", recs)
    rr = load_benchmark("record_run")
    out = recs / "approx-screen.json"
    args = ["screen", str(src), "--name", "approx-screen", "--command", "python benchmarks/approx_screen.py ...",
            "--title", "approximation screen", "-o", str(out)]
    assert rr.main(args) == 2  # two labels in the file: which one?
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--label" in err and "other, s" in err
    assert rr.main([*args, "--label", "s"]) == 0
    rec = check_record(json.loads(out.read_text()))
    m = rec["metrics"]
    assert rec["kind"] == "screen" and m["label"] == "s" and m["n_dev"] == 32 and m["teacher"] == "tiny"
    assert [r["config"] for r in m["rows"]] == ["baseline", *CONFIGS] and all("ops" not in r for r in m["rows"])
    good = next(r for r in m["rows"] if r["config"] == "exp:exp_degree=7,exp_squarings=2")
    assert good["levels"] == {"exp": [5, 5]}
    ops = by["all:ln_band=None,newton_steps=1"]["ops"]  # the page names the op where each kind's fit is worst
    at = next(r for r in m["rows"] if r["config"] == "all:ln_band=None,newton_steps=1")["max_rel_error_at"]
    for kind in ("exp", "gelu", "ln"):
        mine = [e for e in ops if e["kind"].startswith(kind)]
        assert at[kind] == max(mine, key=lambda e: e["max_rel_error"])["key"]
    pages = json.loads((recs / "pages.json").read_text())
    if not any(it.get("record") == "approx-screen" for pg in pages["pages"] for s in pg["sections"]
               for it in s["items"]):
        pages["pages"][0]["sections"][-1]["items"].append({"type": "screen", "record": "approx-screen"})
        (recs / "pages.json").write_text(json.dumps(pages))
    texts, _, used, _ = build(recs)
    assert "approx-screen" in used
    page = texts["results.md"]
    assert "**Untrained screen, not the accuracy of trained students**" in page
    row = next(ln for ln in page.splitlines() if ln.startswith("| exp (exp_degree 7, exp_squarings 2) |"))
    assert row.startswith("| exp (exp_degree 7, exp_squarings 2) | exp 5 | - |")
    base = next(ln for ln in page.splitlines() if ln.startswith("| baseline: CGF, exact functions |"))
    acc = by["baseline"]["guard_on"]["accuracy"]
    assert f"| {acc:.4f} (+0.0 pp) / 0 / 0 |" in base
    all_row = next(ln for ln in page.splitlines() if ln.startswith("| all (ln_band None, newton_steps 1) |"))
    assert "ln_attn 8; ln_ffn 8" in all_row and "| 29 28 |" in all_row  # 31 30 before the merged Newton step
