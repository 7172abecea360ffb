"""Shared test fixtures: the repository root on sys.path, the shared data folder, tiny models.

Tests that need `../shared/data` skip with a clear reason when it is absent (a user's clone without
the course data), and everything else runs on CPU in seconds with tiny models.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


def need_shared(*parts):
    """Return the path under ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (tests read the course data from ../shared/data)")
    return path


@pytest.fixture
def zhwiki_dir():
    return need_shared("zhwiki")


@pytest.fixture
def qa_dir():
    return need_shared("qa")


# ----------------------------------------------------------------------------- tiny runs

TINY_TEXT = (
    "北京是中华人民共和国的首都，位于华北平原北部。上海是中国最大的城市之一，位于长江入海口。"
    "长江是中国第一长河，全长约6300公里。黄河是中国第二长河，被称为中华民族的母亲河。"
    "故宫位于北京市中心，是明清两代的皇家宫殿。Python是一种编程语言，由Guido van Rossum创建于1991年。"
)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A small byte-level BPE trained in about a second on a few sentences."""
    from tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer([TINY_TEXT] * 20, folder, vocab_size=400)


# ----------------------------------------------------------------------------- tiny data directories
# in the format data/prepare.py and data/prepare_sft.py produce; shared by test_train.py, test_recipe.py,
# test_recipe_ddp.py and others

BLOCK = 48


def write_data(data_dir, tok, rows, kind, n_val=6, block_size=BLOCK):
    """train.bin / val.bin / meta.json from token rows (each ends with EOT), padded to block_size."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    blocks = np.full((len(rows), block_size), tok.pad, dtype=np.uint16)
    for i, row in enumerate(rows):
        assert len(row) <= block_size
        blocks[i, :len(row)] = row
    blocks[n_val:].tofile(data_dir / "train.bin")
    blocks[:n_val].tofile(data_dir / "val.bin")
    meta = {"block_size": block_size, "dtype": "uint16", "vocab_size": tok.n_vocab, "tokenizer": tok.identity.to_json(),
            "special": tok.special, "kind": kind,
            "counts": {"blocks_train": len(rows) - n_val, "blocks_val": n_val}}
    (data_dir / "meta.json").write_text(json.dumps(meta))
    return data_dir


def pretrain_rows(tok, n=30, block_size=BLOCK, seed=0):
    ids = tok.encode(TINY_TEXT * 3)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        start, length = rng.integers(0, 150), rng.integers(block_size // 2, block_size)
        rows.append(ids[start:start + length] + [tok.eot])
    return rows


def sft_rows(tok, n=30):
    from data_utils import split_sentences

    sentences = split_sentences(TINY_TEXT)
    return [tok.encode_qa(f"第{i}句是什么？", sentences[i % len(sentences)]) for i in range(n)]


@pytest.fixture
def pretrain_dir(tmp_path, tiny_tokenizer):
    return write_data(tmp_path / "pretrain_data", tiny_tokenizer, pretrain_rows(tiny_tokenizer), "pretrain")


@pytest.fixture
def sft_dir(tmp_path, tiny_tokenizer):
    return write_data(tmp_path / "sft_data", tiny_tokenizer, sft_rows(tiny_tokenizer), "sft")


def make_run(out_dir, tok, block_size=64, n_layer=2, n_head=2, n_embd=32, seed=0, kind="sft"):
    """A run directory holding a randomly initialised tiny model, as train.py would write it."""
    import torch

    from checkpoint import save_checkpoint
    from model import GPT, GPTConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    args = dict(block_size=block_size, vocab_size=tok.n_vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                dropout=0.0, bias=True)
    model = GPT(GPTConfig(**args))
    tok.save(out_dir / "tokenizer")
    ckpt = {"model": model.state_dict(), "model_args": args, "iter_num": 0, "best_val_loss": 9.9,
            "tokenizer": tok.identity.to_json(), "kind": kind, "config": {}}
    save_checkpoint(ckpt, out_dir / "best.pt")
    save_checkpoint(ckpt, out_dir / "last.pt")
    return out_dir


WIKI_ARTICLES = [
    {"id": "1", "title": "长江",
     "text": "长江\n\n长江是中国第一长河，全长约6300公里。长江发源于青藏高原的唐古拉山脉。"},
    {"id": "2", "title": "黄河", "text": "黄河\n\n黄河是中国第二长河，被称为中华民族的母亲河。黄河流经九个省区。"},
    {"id": "3", "title": "故宫", "text": "故宫\n\n故宫位于北京市中心，是明清两代的皇家宫殿。故宫又称紫禁城。"},
    {"id": "4", "title": "Python", "text": "Python\n\nPython是一种编程语言，由Guido van Rossum创建于1991年。"},
]


@pytest.fixture
def tiny_index(tmp_path):
    """A retrieval.py index folder over WIKI_ARTICLES (one passage per article)."""
    import json

    from retrieval import build_index

    wiki = tmp_path / "tiny_wiki"
    wiki.mkdir()
    (wiki / "a.jsonl").write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in WIKI_ARTICLES),
                                  encoding="utf-8")
    build_index([wiki], tmp_path / "tiny_index", quiet=True)
    return tmp_path / "tiny_index"


@pytest.fixture
def tiny_run(tmp_path, tiny_tokenizer):
    """A run directory with a tiny random model (loadable with inference.load_run)."""
    return make_run(tmp_path / "run", tiny_tokenizer)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared 2-core machine every op of a
    2-thread pool waits for a descheduled peer (measured: 15 s instead of 0.2 s for 96 steps)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny run directory shared by a module's tests (the server tests start servers on it)."""
    return make_run(tmp_path_factory.mktemp("server") / "tiny-sft", tiny_tokenizer)


@pytest.fixture(scope="module")
def reference(run_dir):
    """A second copy of the model for expected outputs (a server's worker owns its own copy)."""
    from inference import load_run

    return load_run(run_dir)
