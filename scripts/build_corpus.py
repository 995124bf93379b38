"""Build the tiny-MoE corpus from this Python's standard library (recipe: moetier/eval/corpus.py).

Writes <out>/train.txt.xz, <out>/heldout.txt.xz and <out>/corpus.json (files, characters, bytes,
sha256 of each split's UTF-8 text). The corpus text is never committed: keep <out> ignored
(`echo /.corpus/ >> .git/info/exclude`).

    python scripts/build_corpus.py --out .corpus
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_corpus_module():
    """moetier/eval/corpus.py by path, so this script runs without the package's dependencies."""
    path = REPO / "moetier" / "eval" / "corpus.py"
    spec = importlib.util.spec_from_file_location("moetier_eval_corpus", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".corpus")
    args = parser.parse_args()
    corpus = load_corpus_module()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "python": platform.python_version(),
        "stdlib_root": str(corpus.stdlib_root()),
        "separator": corpus.SEPARATOR,
        "heldout_byte_threshold": corpus.HELDOUT_BYTE_THRESHOLD,
        "splits": {},
    }
    for split in corpus.SPLITS:
        docs = corpus.corpus_documents(split)
        text = corpus.SEPARATOR.join(doc.text for doc in docs)
        data = text.encode("utf-8")
        with lzma.open(args.out / f"{split}.txt.xz", "wb", preset=9) as f:
            f.write(data)
        summary["splits"][split] = {
            "files": len(docs),
            "chars": len(text),
            "bytes": len(data),
            "sha256": corpus.text_sha256(text),
            "relpaths": [doc.relpath for doc in docs],
        }
        print(f"{split}: {len(docs)} files, {len(data):,} bytes, sha256 {corpus.text_sha256(text)}")
    (args.out / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
