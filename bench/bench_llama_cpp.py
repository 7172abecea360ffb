"""Does llama.cpp read our GGUF export as we do? Token ids on wiki lines, and greedy tokens on chat prompts.

    python bench/bench_llama_cpp.py --tokenizer data/tokenizer --lines 5000
    python bench/bench_llama_cpp.py --tokenizer data/tokenizer --llama_cpp_src DIR   # no llama-cpp-python

With llama-cpp-python installed (`pip install llama-cpp-python` builds llama.cpp from source), a GGUF
of a random tiny model on `--tokenizer` is written by export.py and llama.cpp itself is compared with
us: `Llama.tokenize` against our `encode` on `--lines` wiki lines, and greedy `Llama.generate`
against our engine on five chat prompts (sample.py's greedy output, as tokens).

Without it, `--llama_cpp_src` (a llama.cpp source tree, e.g. the one inside llama-cpp-python's sdist,
vendor/llama.cpp) compiles only llama.cpp's pre-tokenizer, src/unicode.cpp + src/unicode-data.cpp,
with a 20-line driver, and checks the two halves of llama.cpp's tokenizer apart:
- the split: llama.cpp's kimi-k2 pieces against our pattern's (Python `regex`);
- the ids: llama.cpp's pieces, each run through BPE the way llama.cpp runs it (pairs from the
  GGUF's merge list, the lowest-listed first, leftmost on ties; here the `tokenizers` BPE model with
  ignore_merges off, which is that algorithm), against tiktoken's ids for the whole line.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import regex

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from data_utils import iter_jsonl  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

DRIVER = r"""
#include "unicode.h"
#include <iostream>
#include <iterator>
#include <string>
// NUL-separated texts in; per text llama.cpp's kimi-k2 pieces (raw UTF-8), \x01-separated, NUL-ended
int main() {
    std::string all((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    for (size_t start = 0; start < all.size();) {
        size_t end = all.find('\0', start);
        if (end == std::string::npos) end = all.size();
        auto pieces = unicode_regex_split(all.substr(start, end - start), {"\\p{Han}+"}, false);
        for (size_t i = 0; i < pieces.size(); i++) std::cout << (i ? "\x01" : "") << pieces[i];
        std::cout << '\0';
        start = end + 1;
    }
}
"""
CHATS = ["北京是", "长江是中国第一长河吗？", "Python is a programming language", "故宫位于北京市中心", "黄河"]


def wiki_lines(n, folder=ROOT.parent / "shared" / "data" / "zhwiki"):
    """The first `n` non-empty lines of the last wiki file (the held-out one), plus awkward cases."""
    from test_export import SPLIT_CASES

    lines = list(SPLIT_CASES)
    for _, obj in iter_jsonl(sorted(Path(folder).glob("*.jsonl"))[-1]):
        lines += [line for line in obj["text"].split("\n") if line.strip()]
        if len(lines) >= n:
            break
    return lines[:n]


def llama_cpp_pieces(src, texts, workdir):
    """llama.cpp's own pre-tokenizer split of each text (compiled from `src`)."""
    driver = Path(workdir) / "split_driver"
    (Path(workdir) / "split_driver.cpp").write_text(DRIVER)
    s = Path(src) / "src"
    subprocess.run(["g++", "-std=c++17", "-O1", f"-I{s}", "-o", str(driver), str(Path(workdir) / "split_driver.cpp"),
                    str(s / "unicode.cpp"), str(s / "unicode-data.cpp")], check=True)
    out = subprocess.run([str(driver)], input="\0".join(texts).encode() + b"\0", capture_output=True, check=True)
    return [r.decode().split("\x01") if r else [] for r in out.stdout.split(b"\0")[:len(texts)]]


def llama_bpe(tok):
    """A `tokenizers` BPE with the GGUF's vocabulary and merge list, merges never skipped: llama.cpp's
    llm_tokenizer_bpe_session for the kimi-k2 pre-tokenizer (which does not set ignore_merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    import export

    spell_of = export.byte_spelling()
    spell = lambda b: "".join(spell_of[x] for x in b)  # noqa: E731
    ranks = tok.enc._mergeable_ranks
    merges = [tuple(m.split(" ")) for m in export.gguf_merges(ranks, spell)]
    bpe = Tokenizer(models.BPE(vocab={spell(t): r for t, r in ranks.items()}, merges=merges, ignore_merges=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return bpe


def compare_halves(tok, texts, src):
    with tempfile.TemporaryDirectory() as tmp:
        theirs = llama_cpp_pieces(src, texts, tmp)
    pattern = regex.compile(tok.enc._pat_str)
    split_diff = sum(pattern.findall(t) != pieces for t, pieces in zip(texts, theirs))
    bpe = llama_bpe(tok)
    ids_diff = 0
    for text, pieces in zip(texts, theirs):
        ids = [i for p in pieces for i in bpe.encode(p).ids]
        ids_diff += ids != tok.encode(text)
    print(f"llama.cpp pre-tokenizer (compiled from {src}) vs our pattern: {len(texts)} texts, "
          f"{sum(map(len, texts)):,} chars, {sum(map(len, theirs)):,} pieces; split differs on {split_diff}")
    print(f"ids (llama.cpp split + llama.cpp-style BPE on the GGUF merges) vs tiktoken: differ on {ids_diff}")


def compare_llama_cpp(tok, texts):
    import llama_cpp
    import torch
    from conftest import make_run

    import export
    from engine import generate
    from inference import load_run

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp) / "run", tok, block_size=128, n_layer=2, n_head=2, n_embd=64)
        export.export_gguf(run_dir, Path(tmp) / "m.gguf")
        llm = llama_cpp.Llama(model_path=str(Path(tmp) / "m.gguf"), n_ctx=128, n_batch=128, n_threads=1,
                              verbose=False)
        t0 = time.perf_counter()
        differ = [t for t in texts if llm.tokenize(t.encode(), add_bos=False, special=False) != tok.encode(t)]
        print(f"llama.cpp {llama_cpp.__version__} Llama.tokenize vs our encode: {len(texts)} texts, "
              f"{sum(map(len, texts)):,} chars: differ on {len(differ)} ({time.perf_counter() - t0:.1f} s)")
        for t in differ[:5]:
            print("   ", repr(t[:100]))
        run, stop, same = load_run(run_dir), tok.stop_ids("chat"), 0
        for prompt in CHATS:
            ids = tok.encode_chat([{"role": "user", "content": prompt}])
            ours = [s[0] for s in generate(run.model, [ids], 24, temperature=0.0, stop_ids=stop)]
            theirs = []
            for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                theirs.append(token)
                if token in stop or len(theirs) == 24:
                    break
            same += theirs == ours
        print(f"greedy chat tokens (24 new, random 2-layer model): equal on {same} of {len(CHATS)} prompts")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=str(ROOT / "data" / "tokenizer"))
    ap.add_argument("--lines", type=int, default=5000)
    ap.add_argument("--llama_cpp_src", help="llama.cpp source tree (when llama-cpp-python is not installed)")
    args = ap.parse_args()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))
    tok = load_tokenizer(args.tokenizer)
    texts = wiki_lines(args.lines)
    if args.llama_cpp_src:
        compare_halves(tok, texts, args.llama_cpp_src)
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python, or pass "
                         "--llama_cpp_src DIR to test the pre-tokenizer alone") from None
    compare_llama_cpp(tok, texts)


if __name__ == "__main__":
    main()
