"""Run records (schema version 1): load, check, write. The schema is described in records/README.md."""
from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path

from cgf_fhe.errors import DataError
from cgf_fhe.io import read_json

SCHEMA = 1
KINDS = ("teacher", "search", "student", "export", "report", "simulate", "calibration", "table", "structure", "screen")
SOURCES = ("run", "recovered-from-page")
PACKAGES = ("cgf-fhe", "torch", "transformers", "datasets", "onnx", "onnxruntime", "tenseal", "numpy", "scipy",
            "matplotlib")
REQUIRED = {"schema": int, "name": str, "kind": str, "title": str, "source": str, "command": str}


def check_record(rec: dict, where: str = "record") -> dict:
    """Raise DataError naming the first problem of a record, else return it."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record is a JSON object")
    for key, typ in REQUIRED.items():
        if not isinstance(rec.get(key), typ):
            raise DataError(f"{where}: field '{key}' missing or not a {typ.__name__}")
    if rec["schema"] != SCHEMA:
        raise DataError(f"{where}: schema version {rec['schema']}, this code reads {SCHEMA}")
    if rec["kind"] not in KINDS:
        raise DataError(f"{where}: kind '{rec['kind']}' is not one of {', '.join(KINDS)}")
    if rec["source"] not in SOURCES:
        raise DataError(f"{where}: source '{rec['source']}' is not one of {', '.join(SOURCES)}")
    if rec["source"] == "recovered-from-page" and not isinstance(rec.get("recovered_from"), dict):
        raise DataError(f"{where}: a recovered record needs 'recovered_from' (page, commit, section)")
    if rec["kind"] in ("teacher", "search", "student"):
        runs = rec.get("runs")
        if not isinstance(runs, list):
            raise DataError(f"{where}: a {rec['kind']} record needs a 'runs' list (one entry per seed)")
        for r in runs:
            if not isinstance(r, dict) or not isinstance(r.get("seed"), int) or "chosen" not in r:
                raise DataError(f"{where}: every run needs an integer 'seed' and a 'chosen' point (null if none)")
    elif not isinstance(rec.get("metrics"), dict) and not isinstance(rec.get("tables"), list):
        raise DataError(f"{where}: a {rec['kind']} record needs 'metrics' or 'tables'")
    for t in rec.get("tables") or []:
        if not isinstance(t, dict) or not isinstance(t.get("columns"), list) or not isinstance(t.get("rows"), list):
            raise DataError(f"{where}: every table needs 'columns' and 'rows' lists")
    return rec


def load_records(folder: Path) -> dict[str, dict]:
    """Every records/*.json by name; the file name must be the record's name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"records folder {folder} does not exist")
    out = {}
    for p in sorted(folder.glob("*.json")):
        if p.name == "pages.json":
            continue
        rec = read_json(p, DataError)
        check_record(rec, str(p))
        if rec["name"] != p.stem:
            raise DataError(f"{p}: record name '{rec['name']}' differs from the file name")
        out[rec["name"]] = rec
    return out


def dumps(rec: dict) -> str:
    return json.dumps(rec, indent=1, ensure_ascii=False) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_record(path: Path, rec: dict) -> None:
    check_record(rec, str(path))
    write_atomic(path, dumps(rec))


def package_versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30)
    except (ValueError, OSError, AttributeError):
        pass
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "ram_gib": mem,
            "python": platform.python_version()}
