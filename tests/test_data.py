"""MRPC loading: unquoted GLUE TSVs, source selection errors, pair tokenization."""
import datasets
import pytest

from cgf_fhe import data
from cgf_fhe.data import DataError, load_mrpc, make_loader, read_glue_tsv, tokenize_split


def _raw_rows(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines[1:]]


def test_validation_tsv_rows_with_quotes_parsed_intact(mrpc_dir):
    path = mrpc_dir / "validation.tsv"
    ds = read_glue_tsv(path)
    assert len(ds) == 408
    raw = _raw_rows(path)
    assert len(raw) == 408
    quoted = [i for i, r in enumerate(raw) if '"' in r[1] or '"' in r[2]]
    assert len(quoted) > 50  # the file really exercises the quoting problem
    for i in quoted:
        assert ds[i]["sentence1"] == raw[i][1]
        assert ds[i]["sentence2"] == raw[i][2]
        assert ds[i]["label"] == int(raw[i][0]) and ds[i]["idx"] == int(raw[i][3])
    # the first data row: sentence2 begins with a lone quote
    assert ds[0]["idx"] == 9 and ds[0]["label"] == 1
    assert ds[0]["sentence2"].startswith('" The foodservice pie business')


def test_quote_at_field_start_does_not_swallow_following_rows(tmp_path):
    p = tmp_path / "validation.tsv"
    p.write_text(
        "label\tsentence1\tsentence2\tidx\n"
        '1\t" opening quote only\tplain\t1\n'
        '0\tplain\tends with quote "\t2\n'
        '1\t"fully quoted"\t" two " quotes "\t3\n',
        encoding="utf-8",
    )
    ds = read_glue_tsv(p)
    assert len(ds) == 3
    assert ds["sentence1"] == ['" opening quote only', "plain", '"fully quoted"']
    assert ds["sentence2"] == ["plain", 'ends with quote "', '" two " quotes "']
    assert ds["idx"] == [1, 2, 3] and ds["label"] == [1, 0, 1]


def test_bad_row_names_file_and_line(tmp_path):
    p = tmp_path / "train.tsv"
    p.write_text("label\tsentence1\tsentence2\tidx\n1\tonly two\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.tsv:2"):
        read_glue_tsv(p)


def test_missing_data_folder_error_names_all_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(DataError) as exc:
        load_mrpc(tmp_path / "nope")
    msg = str(exc.value)
    assert "--data-dir" in msg and "CGF_FHE_DATA_DIR" in msg and "hub" in msg and "nope" in msg

    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "also-missing"))
    with pytest.raises(DataError) as exc:
        load_mrpc(None)
    msg = str(exc.value)
    assert "also-missing" in msg and "CGF_FHE_DATA_DIR" in msg and "--data-dir" in msg and "hub" in msg


def test_hub_failure_error_names_all_sources(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as exc:
        load_mrpc(None)
    msg = str(exc.value)
    assert "--data-dir" in msg and "CGF_FHE_DATA_DIR" in msg and "hub" in msg and "no network" in msg


def test_cli_missing_data_dir_is_one_line_exit_2(tmp_path, capsys):
    from cgf_fhe.cli import main

    rc = main(["finetune", "--model", "tiny", "--data-dir", str(tmp_path / "missing"), "--epochs", "1",
               "--no-progress", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "--data-dir" in err and "missing" in err


def test_pair_tokenization_truncation_and_dynamic_padding(mrpc_dir, tiny_tokenizer):
    raw = load_mrpc(mrpc_dir)
    assert len(raw["train"]) == 3668 and len(raw["validation"]) == 408
    ds = tokenize_split(raw["validation"], tiny_tokenizer, max_length=48, max_samples=20)
    assert len(ds) == 20
    lengths = [len(x) for x in ds["input_ids"]]
    assert max(lengths) == 48 and min(lengths) < 48  # truncated to max_length, not padded
    sep = tiny_tokenizer.sep_token_id
    assert all(list(x).count(sep) == 2 for x in ds["input_ids"])  # a sentence pair
    batch = next(iter(make_loader(ds, tiny_tokenizer, batch_size=8, shuffle=False)))
    assert batch["input_ids"].shape[1] == max(lengths[:8])  # padded to the longest in the batch
    assert batch["attention_mask"].sum(1).tolist() == lengths[:8]
    assert batch["labels"].tolist() == raw["validation"]["label"][:8]


def test_swap_pairs_appends_every_pair_reversed(mrpc_dir, tiny_tokenizer):
    ds = read_glue_tsv(mrpc_dir / "validation.tsv").select(range(5))
    sw = data.swap_pairs(ds)
    assert len(sw) == 10
    for i in range(5):
        assert sw[5 + i]["sentence1"] == ds[i]["sentence2"] and sw[5 + i]["sentence2"] == ds[i]["sentence1"]
        assert sw[5 + i]["label"] == ds[i]["label"] and sw[i] == ds[i]
    tok = tokenize_split(ds, tiny_tokenizer, 64, max_samples=3, swap=True)
    assert len(tok) == 6
    sep = tiny_tokenizer.sep_token_id
    first = tok[0]["input_ids"].tolist()
    swapped = tok[3]["input_ids"].tolist()
    a, b = first[1:first.index(sep)], first[first.index(sep) + 1:-1]
    assert swapped == [first[0]] + b + [sep] + a + [sep]
