"""A corpus bigger than memory for the prepare.py bench: copies of the shared wiki with changed ids.

    python bench/make_big_corpus.py --input ../shared/data/zhwiki --out /work/bigcorpus --copies 42

Writes `<out>/zst/copy-KK.jsonl.zst` (zstd, one file per copy) and `<out>/parquet/copy-KK.parquet`
(row groups of `--row_group` rows, as Fineweb-style shards are), each copy's ids prefixed `cKK-`, so
every article is a distinct document with its own train/val split. 42 copies of the 126 MB wiki
are about 5.3 GB of jsonl text.

Design: the wiki is read once (pyarrow's JSON reader) and each copy is a cheap rewrite: the jsonl
copies substitute the `"id": "` prefix of each line (the lines are written by download_wiki.py with
`id` first; a text value cannot hold that prefix unescaped), the parquet copies replace the id
column. Files are written to a temporary and renamed, and existing ones are kept, so a killed run
resumes where it stopped.
"""
import argparse
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq
import zstandard

LINE_ID = re.compile(rb'^\{"id": "', re.M)


def main():
    ap = argparse.ArgumentParser(description="Copies of a jsonl corpus with changed ids, as .jsonl.zst and parquet.")
    ap.add_argument("--input", default="../shared/data/zhwiki")
    ap.add_argument("--out", default="/work/bigcorpus")
    ap.add_argument("--copies", type=int, default=42)
    ap.add_argument("--row_group", type=int, default=4096)
    ap.add_argument("--formats", default="zst,parquet")
    args = ap.parse_args()
    files = sorted(Path(args.input).glob("*.jsonl"))
    raw = b"".join(p.read_bytes() for p in files)
    formats = args.formats.split(",")
    table = None
    if "parquet" in formats:
        table = pa.concat_tables(pj.read_json(p) for p in files).select(["id", "url", "title", "text"])
    for fmt in formats:
        (Path(args.out) / fmt).mkdir(parents=True, exist_ok=True)
    for k in range(args.copies):
        prefix = f"c{k:02d}-"
        if "zst" in formats:
            dest = Path(args.out) / "zst" / f"copy-{k:02d}.jsonl.zst"
            if not dest.exists():
                tmp = dest.with_suffix(".tmp")
                tmp.write_bytes(zstandard.ZstdCompressor(level=3).compress(
                    LINE_ID.sub(b'{"id": "' + prefix.encode(), raw)))
                os.replace(tmp, dest)
        if "parquet" in formats:
            dest = Path(args.out) / "parquet" / f"copy-{k:02d}.parquet"
            if not dest.exists():
                ids = pc.binary_join_element_wise(prefix, table["id"], "")
                tmp = dest.with_suffix(".tmp")
                pq.write_table(table.set_column(0, "id", ids), tmp, row_group_size=args.row_group, compression="zstd")
                os.replace(tmp, dest)
        print(f"copy {k + 1}/{args.copies}", flush=True)


if __name__ == "__main__":
    main()
