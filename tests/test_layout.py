"""The run-folder layout (cgf_fhe.layout): seed folders, teacher folders, the max-length fallback."""
import json

from cgf_fhe import layout, models


def _ckpt(path):
    path.mkdir(parents=True)
    (path / layout.SETTINGS_FILE).write_text(json.dumps({"status": "done"}))
    return path


def test_seed_folders_and_seed_checkpoints(tmp_path):
    assert layout.SETTINGS_FILE == models.SETTINGS_FILE
    assert layout.seed_dirs(tmp_path, [7, 42], 1) == [(7, tmp_path / "seed7"), (42, tmp_path / "seed42")]
    assert layout.seed_dirs(tmp_path, None, 3) == [(3, tmp_path)]
    s7, s42 = _ckpt(tmp_path / "set" / "seed7"), _ckpt(tmp_path / "set" / "seed42")
    (tmp_path / "set" / "seed9").mkdir()  # not a checkpoint
    assert layout.seed_folders(tmp_path / "set") == [s42, s7]  # sorted by name
    assert layout.seed_checkpoint(tmp_path / "set", 7) == s7
    assert layout.seed_checkpoint(tmp_path / "set", 9) is None
    one = _ckpt(tmp_path / "one")
    assert layout.seed_checkpoint(one, 7) == one and layout.seed_folders(one) == []
    assert layout.teacher_dir(tmp_path, 7, multi=True) == tmp_path / "teacher" / "seed7"
    assert layout.teacher_dir(tmp_path, 7, multi=False) == tmp_path / "teacher"


def test_max_length_fallback_order():
    s = {"max_length": 96, "data": {"max_length": 64}, "recipe": {"max_length": 128}}
    assert layout.max_length(s, override=32) == 32
    assert layout.max_length(s, metadata={"max_length": 48}) == 48
    assert layout.max_length(s) == 96
    assert layout.max_length({"data": {"max_length": 64}, "recipe": {"max_length": 100}}) == 64
    assert layout.max_length({"data": {"max_length": None}, "recipe": {"max_length": 100}}) == 100
    assert layout.max_length({}) == layout.DEFAULT_MAX_LENGTH == 128
