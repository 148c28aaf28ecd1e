#!/usr/bin/env python
"""Regenerate docs/results.md, docs/recipes.md and their plots from the committed run records in records/.

    python benchmarks/make_results.py            # rewrite the pages and docs/img/*.png
    python benchmarks/make_results.py --check    # exit 1 if a page differs from what the records give

No runs folder is read: a run enters the pages through its record (benchmarks/record_run.py) and an entry in
records/pages.json. The sections are rendered by the modules of benchmarks/pagegen/ (one per section kind).
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cgf_fhe.errors import CgfFheError  # noqa: E402
from pagegen.build import build  # noqa: E402
from pagegen.records import write_atomic  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=Path, default=HERE.parent / "records", help="records folder (default: records/)")
    ap.add_argument("--docs", type=Path, default=HERE.parent / "docs", help="where the pages go (default: docs/)")
    ap.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on any difference")
    ap.add_argument("--no-images", action="store_true", help="do not redraw docs/img/*.png")
    a = ap.parse_args(argv)
    try:
        texts, images, _, _ = build(a.records)
    except CgfFheError as e:
        print(f"make_results: {e}", file=sys.stderr)
        return 2
    bad = 0
    for name, text in texts.items():
        path = a.docs / name
        if a.check:
            old = path.read_text() if path.is_file() else ""
            if old != text:
                bad += 1
                sys.stdout.writelines(list(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                                str(path), "regenerated", n=1))[:40])
            missing = [i for i in images if not (a.docs / "img" / i).is_file()]
            bad += len(missing)
            for i in missing:
                print(f"missing image docs/img/{i}")
        else:
            write_atomic(path, text)
    if not a.check and not a.no_images:
        (a.docs / "img").mkdir(parents=True, exist_ok=True)
        for name, (draw, args) in images.items():
            draw(*args, a.docs / "img" / name)
    if a.check:
        print("pages match the records" if not bad else f"{bad} difference(s): run python benchmarks/make_results.py")
        return 1 if bad else 0
    print(f"wrote {', '.join(str(a.docs / n) for n in texts)} and {len(images)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
