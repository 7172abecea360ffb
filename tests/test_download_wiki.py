"""Tests for data/download_wiki.py against a real HTTP file server on 127.0.0.1.

The server (`FileServer`) serves one file with HTTP Range support and can misbehave on purpose:
drop the connection halfway through the first transfer, ignore Range, state a sha256 in the
hub's X-Linked-Etag header. Every request's Range header is recorded, so the tests see that a
resumed download asks only for the missing bytes.
"""
import hashlib
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ROOT

from data_utils import clean_article

sys.path.insert(0, str(ROOT / "data"))
import download_wiki as dw  # noqa: E402


class FileServer:
    def __init__(self, body, drop_first=False, ranges=True, linked_etag=None, status=200):
        self.body, self.drop_first, self.ranges = body, drop_first, ranges
        self.linked_etag, self.status = linked_etag, status
        self.requests = []  # the Range header of each request (None when absent)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append(rng)
                if server.status != 200:
                    self.send_error(server.status)
                    return
                start = int(rng[len("bytes="):].rstrip("-")) if rng and server.ranges else 0
                if start >= len(server.body) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(server.body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                part = server.body[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.body) - 1}/{len(server.body)}")
                if server.linked_etag:
                    self.send_header("X-Linked-Etag", f'"{server.linked_etag}"')
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if server.drop_first and len(server.requests) == 1:
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/wikipedia-cn-test.json"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(body, **kw):
        servers.append(FileServer(body, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


BODY = bytes(range(256)) * 400  # 100 KiB
SHA = hashlib.sha256(BODY).hexdigest()


def test_resumes_after_the_connection_drops_halfway(serve, tmp_path):
    server = serve(BODY, drop_first=True)
    dest = tmp_path / "f.download"
    assert dw.download(server.url, dest, SHA, retry_wait=0) == SHA
    assert dest.read_bytes() == BODY and not (tmp_path / "f.download.part").exists()
    assert server.requests[0] is None
    # the retry asked only for what was missing after the first half
    assert server.requests[1] == f"bytes={len(BODY) // 2}-"


def test_a_later_run_continues_an_existing_part_file(serve, tmp_path):
    server = serve(BODY)
    dest = tmp_path / "f.download"
    (tmp_path / "f.download.part").write_bytes(BODY[:1000])
    dw.download(server.url, dest, SHA, retry_wait=0)
    assert server.requests == ["bytes=1000-"]
    assert dest.read_bytes() == BODY


def test_a_complete_part_file_gets_416_and_is_kept(serve, tmp_path):
    server = serve(BODY)
    (tmp_path / "f.download.part").write_bytes(BODY)
    dw.download(server.url, tmp_path / "f.download", SHA, retry_wait=0)
    assert server.requests == [f"bytes={len(BODY)}-"]
    assert (tmp_path / "f.download").read_bytes() == BODY


def test_a_server_ignoring_range_restarts_the_file(serve, tmp_path):
    server = serve(BODY, ranges=False)
    (tmp_path / "f.download.part").write_bytes(b"stale bytes")
    dw.download(server.url, tmp_path / "f.download", SHA, retry_wait=0)
    assert (tmp_path / "f.download").read_bytes() == BODY


def test_checksum_mismatch_deletes_the_file_and_says_both_digests(serve, tmp_path):
    server = serve(BODY)
    dest = tmp_path / "f.download"
    with pytest.raises(dw.DownloadError, match=f"sha256 mismatch.*expected {'0' * 64}, got {SHA}"):
        dw.download(server.url, dest, "0" * 64, retry_wait=0)
    assert not dest.exists() and not (tmp_path / "f.download.part").exists()


def test_the_hub_stated_sha256_is_checked_when_none_is_given(serve, tmp_path):
    assert dw.download(serve(BODY, linked_etag=SHA).url, tmp_path / "a", retry_wait=0) == SHA
    with pytest.raises(dw.DownloadError, match="sha256 mismatch"):
        dw.download(serve(BODY, linked_etag="f" * 64).url, tmp_path / "b", retry_wait=0)


def test_http_errors_fail_at_once_and_drops_give_up_after_the_retries(serve, tmp_path):
    server = serve(BODY, status=404)
    with pytest.raises(dw.DownloadError, match="HTTP 404"):
        dw.download(server.url, tmp_path / "f", retry_wait=0)
    assert len(server.requests) == 1
    dropping = serve(BODY, drop_first=True)
    with pytest.raises(dw.DownloadError, match="gave up after 0 retries.*resume"):
        dw.download(dropping.url, tmp_path / "g", retries=0, retry_wait=0)
    assert (tmp_path / "g.part").stat().st_size == len(BODY) // 2  # kept for the next run


def test_json_array_is_parsed_across_chunk_boundaries():
    items = [{"completion": "北京是中国的首都。" * k, "n": k} for k in range(1, 30)]
    text = " [\n" + ",\n ".join(json.dumps(i, ensure_ascii=False) for i in items) + "\n]\n"
    assert list(dw.iter_json_array(io.StringIO(text), chunk_size=7)) == items
    with pytest.raises(ValueError, match="malformed"):
        list(dw.iter_json_array(io.StringIO('[{"a": 1}, {"b": '), chunk_size=4))


def test_main_downloads_converts_and_shards(serve, tmp_path, capsys):
    records = [
        {"completion": "北京是中华人民共和国的首都。\n北京位于华北平原。", "source": "wikipedia.zh2307"},
        {"completion": "昭通机场（ICAO：ZPZT）是位于云南的机场。", "source": "wikipedia.zh2307"},
        {"completion": "   ", "source": "wikipedia.zh2307"},  # no text: counted, skipped
        {"completion": "1991年，Python发布。", "source": "wikipedia.zh2307"},
    ]
    body = json.dumps(records, ensure_ascii=False).encode()
    server = serve(body, drop_first=True)
    out = tmp_path / "wiki"
    (out).mkdir()
    (out / "wiki-07.jsonl").write_text("{}\n")  # a stale shard from an earlier conversion
    dw.main(["--url", server.url, "--out", str(out), "--shard_size", "2", "--retry_wait", "0",
             "--sha256", hashlib.sha256(body).hexdigest()])
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["wiki-00.jsonl", "wiki-01.jsonl"]
    assert (out / "raw" / "wikipedia-cn-test.json.download").read_bytes() == body
    articles = [json.loads(line) for p in sorted(out.glob("wiki-*.jsonl")) for line in p.open(encoding="utf-8")]
    assert [a["title"] for a in articles] == ["北京", "昭通机场", "1991年"]
    assert [a["id"] for a in articles] == ["1", "2", "4"]
    assert clean_article(articles[0]["text"]) == "北京是中华人民共和国的首都。\n北京位于华北平原。"
    assert "3 articles in 2 shards" in capsys.readouterr().out


def test_jsonl_sources_keep_their_titles_and_ids(tmp_path):
    src = tmp_path / "src.download"
    src.write_text(json.dumps({"id": 7, "title": "长江", "text": "长江\n\n长江是中国第一长河。"}, ensure_ascii=False)
                   + "\nnot json\n"
                   + json.dumps({"title": "黄河", "text": "黄河是中国第二长河。"}, ensure_ascii=False) + "\n")
    counts = dw.convert(src, tmp_path / "out")
    assert counts == {"articles": 2, "shards": 1, "skipped": 1}
    articles = [json.loads(line) for line in (tmp_path / "out" / "wiki-00.jsonl").open(encoding="utf-8")]
    assert articles[0] == {"id": "7", "title": "长江", "text": "长江\n\n长江是中国第一长河。"}
    assert articles[1]["text"] == "黄河\n\n黄河是中国第二长河。" and articles[1]["id"] == "3"
