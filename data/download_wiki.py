"""Download a public simplified-Chinese Wikipedia dump and convert it to `data/wiki/*.jsonl`.

    python data/download_wiki.py [--url URL] [--sha256 HEX] [--out data/wiki] [--shard_size 20000]
    python data/prepare.py --input data/wiki

The default source is `pleisto/wikipedia-cn-20230720-filtered` on the Hugging Face hub: about 250k
simplified-Chinese articles as one JSON array of `{"completion", "source"}` (~0.5 GB). Any JSON
array or JSON-lines file of objects with `text` (or `completion`) and optionally `title` / `id`
works through `--url`.

Design choices:
- Resumable: bytes go to `NAME.download.part`; a later run (or a retry after a dropped connection,
  up to `--retries` with exponential backoff) asks for the rest with an HTTP Range request and
  appends. A server that ignores Range (200 instead of 206) restarts the file from zero.
- Checksummed: sha256 of the whole file at the end, against `--sha256` or else the sha256 the
  Hugging Face hub sends for LFS files (`X-Linked-Etag`). A mismatch deletes the file and fails with
  both digests. With neither, the digest is printed so it can be pinned next time.
- The raw file is kept as `OUT/raw/NAME.download` (re-converting needs no new download); the
  suffix keeps it out of `*.jsonl` globs, which walk OUT recursively.
- Converted records use our shape `{"id", "title", "text"}` with text = title + blank line + body,
  as `data_utils.clean_article` expects. The default source has no titles: the title is guessed as
  the subject that opens the article ("北京是…" -> "北京", "昭通机场（…" -> "昭通机场"), or left empty.
- Shards of `--shard_size` articles, each written to a temporary file and renamed; records without
  text are counted, not fatal. A JSON array is parsed incrementally, so memory stays small.
"""
import argparse
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
from tqdm import tqdm

if not __package__:  # run as a script (python data/download_wiki.py): the modules live in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import BadLines, atomic_write, iter_jsonl  # noqa: E402
from tokenizer import file_sha256  # noqa: E402

DEFAULT_URL = ("https://huggingface.co/datasets/pleisto/wikipedia-cn-20230720-filtered/resolve/main/"
               "wikipedia-cn-20230720-filtered.json")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# the subject before the first bracket, comma or 是 of the opening sentence
_SUBJECT = re.compile(r"^([^（(，,。是\s]{1,30})[（(，,是]")


class DownloadError(Exception):
    pass


class _Incomplete(Exception):
    pass


def _hub_sha256(response):
    """The sha256 a server states for the file (the hub's X-Linked-Etag on LFS files), if any."""
    for r in [*response.history, response]:
        tag = r.headers.get("x-linked-etag", "").strip('"').lower()
        if _SHA256.match(tag):
            return tag
    return None


def _fetch_rest(client, url, part):
    """One GET for what `part` lacks, appended to it; returns the sha256 the server stated."""
    have = part.stat().st_size if part.exists() else 0
    # identity encoding: byte offsets of a compressed response would not be offsets in the file
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    with client.stream("GET", url, headers=headers) as r:
        if r.status_code == 416:  # nothing left after `have`: the file is complete
            return _hub_sha256(r)
        if r.status_code >= 500:
            raise _Incomplete(f"server error {r.status_code}")
        if r.status_code >= 400:
            raise DownloadError(f"{url}: HTTP {r.status_code}")
        if have and r.status_code != 206:
            have = 0  # the server ignored the Range header: start again
        length = r.headers.get("content-length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name) as bar:
            for chunk in r.iter_raw():  # as it arrives, so a dropped connection keeps what came
                f.write(chunk)
                bar.update(len(chunk))
        if total is not None and part.stat().st_size < total:
            raise _Incomplete(f"got {part.stat().st_size} of {total} bytes")
        return _hub_sha256(r)


def download(url, dest, sha256=None, retries=5, retry_wait=1.0, timeout=60.0):
    """Fetch `url` to `dest` (resuming `dest.part`), verify its sha256, return the digest."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if not dest.exists():
        stated = None
        with httpx.Client(follow_redirects=True, timeout=timeout) as client:
            for attempt in range(retries + 1):
                try:
                    stated = _fetch_rest(client, url, part)
                    break
                except (httpx.TransportError, _Incomplete) as e:
                    if attempt == retries:
                        raise DownloadError(f"{url}: {e}; gave up after {retries} retries "
                                            f"(run again to resume from {part})") from e
                    wait = retry_wait * 2 ** attempt
                    print(f"download interrupted ({e}); resuming in {wait:.0f}s")
                    time.sleep(wait)
        sha256 = sha256 or stated
        os.replace(part, dest)
    digest = file_sha256(dest)
    if sha256 and digest != sha256.lower():
        dest.unlink()
        raise DownloadError(f"sha256 mismatch for {url}: expected {sha256}, got {digest}; deleted {dest}")
    print(f"{dest}: sha256 {digest}" + (" (verified)" if sha256 else " (not verified: pass --sha256 to pin it)"))
    return digest


def iter_json_array(f, chunk_size=1 << 20):
    """Yield the elements of a JSON array read from text file `f`, a chunk at a time."""
    decoder = json.JSONDecoder()
    buf, pos, eof = f.read(chunk_size).lstrip(), 1, False
    if not buf.startswith("["):
        raise ValueError("not a JSON array")
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(buf, pos)
            yield obj
        except json.JSONDecodeError:
            if eof:
                raise ValueError(f"malformed JSON array near: {buf[pos:pos + 80]!r}") from None
            more = f.read(chunk_size)
            buf, pos, eof = buf[pos:] + more, 0, not more


def iter_records(path, bad):
    with open(path, encoding="utf-8") as f:
        is_array = f.read(1 << 10).lstrip().startswith("[")
    if is_array:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(iter_json_array(f), 1)
    else:
        yield from iter_jsonl(path, bad, required=())


def to_article(obj, index):
    """Our `{"id", "title", "text"}` record, or None when there is no text."""
    if not isinstance(obj, dict):
        return None
    text = obj.get("text", obj.get("completion"))
    if not isinstance(text, str) or not text.strip():
        return None
    title = obj.get("title")
    if not isinstance(title, str):
        match = _SUBJECT.match(text.strip())
        title = match.group(1) if match else ""
    body = text[len(title) + 2:] if title and text.startswith(title + "\n\n") else text.strip()
    return {"id": str(obj.get("id", index)), "title": title, "text": f"{title}\n\n{body}"}


def iter_articles(src, bad):
    for index, obj in iter_records(src, bad):
        article = to_article(obj, index)
        if article is None:
            bad.add(f"{src}:{index}", "no text")
            continue
        yield article


def convert(src, out_dir, shard_size=20000):
    """Write `out_dir/wiki-NN.jsonl` shards from `src`; stale shards of an earlier run are removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bad, written, kept = BadLines(), [], 0
    articles = iter_articles(src, bad)
    while shard := list(itertools.islice(articles, shard_size)):
        path = out_dir / f"wiki-{len(written):02d}.jsonl"
        with atomic_write(path, "w") as f:
            f.writelines(json.dumps(a, ensure_ascii=False) + "\n" for a in shard)
        written.append(path)
        kept += len(shard)
    for stale in set(out_dir.glob("wiki-*.jsonl")) - set(written):
        stale.unlink()
    bad.report("records without text")
    return {"articles": kept, "shards": len(written), "skipped": bad.count}


def main(argv=None):
    p = argparse.ArgumentParser(description="Download a zh Wikipedia dump and convert it to data/wiki/*.jsonl.")
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--sha256", default=None, help="expected sha256 of the downloaded file")
    p.add_argument("--out", default="data/wiki")
    p.add_argument("--shard_size", type=int, default=20000, help="articles per jsonl file")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--retry_wait", type=float, default=1.0, help="first wait in seconds, doubled per retry")
    args = p.parse_args(argv)

    name = Path(urlparse(args.url).path).name or "wiki"
    raw = Path(args.out) / "raw" / f"{name}.download"
    try:
        download(args.url, raw, args.sha256, args.retries, args.retry_wait)
    except DownloadError as e:
        sys.exit(f"error: {e}")
    counts = convert(raw, args.out, args.shard_size)
    print(f"wrote {counts['articles']} articles in {counts['shards']} shards to {args.out} "
          f"({counts['skipped']} records skipped)")


if __name__ == "__main__":
    main()
