"""sample.py on a tiny random run: text and qa output, prompts from a file, reproducible seeds, and
the interactive chat driven through a real subprocess's stdin (/reset, /quit, EOF)."""
import io
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import sample
from inference import load_run

FAST = ["--max_new_tokens=12", "--temperature=1.0", "--seed=5"]


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model gains nothing from threads; on a shared machine they only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_sample(*argv, stdin=None):
    out = io.StringIO()
    sample.main(list(argv), out=out, lines=None if stdin is None else io.StringIO(stdin))
    return out.getvalue()


def test_text_mode_prints_prompt_and_continuation(tiny_run):
    text = run_sample(f"--out_dir={tiny_run}", "--start=北京是", "--num_samples=2", *FAST)
    samples = text.split("\n---------------\n")
    assert samples[-1] == "" and len(samples) == 3
    assert all(s.startswith("北京是") for s in samples[:2])
    assert samples[0] != samples[1]  # sample i uses seed + i


def test_qa_mode_prints_only_the_answer_run_stream_gives(tiny_run):
    text = run_sample(f"--out_dir={tiny_run}", "--mode=qa", "--start=长江有多长？", *FAST)
    run = load_run(tiny_run)
    answer = run.complete("长江有多长？", "qa", max_new_tokens=12, temperature=1.0, top_k=200, seed=5)
    assert text == answer + "\n---------------\n"
    assert text == run_sample(f"--out_dir={tiny_run}", "--mode", "qa", "--start", "长江有多长？", *FAST)


def test_prompts_from_file_one_per_line(tiny_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("北京是\n\n上海是\n", encoding="utf-8")
    text = run_sample(f"--out_dir={tiny_run}", f"--start=FILE:{prompts}", "--which=last", "--top_k=none",
                      "--top_p=0.9", "--repetition_penalty=1.3", *FAST)
    samples = text.split("\n---------------\n")[:-1]
    assert [s[:3] for s in samples] == ["北京是", "上海是"]


def test_bad_flags_give_clear_errors(tiny_run, tmp_path):
    with pytest.raises(SystemExit, match="no such prompt file"):
        run_sample(f"--out_dir={tiny_run}", f"--start=FILE:{tmp_path / 'missing.txt'}")
    with pytest.raises(SystemExit):
        run_sample(f"--out_dir={tiny_run}", "--mode=poem")
    with pytest.raises(SystemExit, match="no checkpoint"):
        run_sample(f"--out_dir={tmp_path}")


class RunsCode:
    """Unpickling this calls os.getpid: harmless here, but a checkpoint that calls anything is refused."""

    def __reduce__(self):
        return os.getpid, ()


@pytest.mark.parametrize("command", ["sample", "train"])
def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tiny_run, tiny_tokenizer, tmp_path, command):
    """No traceback, no advice to switch the safety off (torch's message suggests weights_only=False)."""
    from test_train import sft_rows, write_data

    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    torch.save({**ckpt, "payload": RunsCode()}, tiny_run / "best.pt")
    if command == "sample":
        argv = [str(ROOT / "sample.py"), f"--out_dir={tiny_run}", "--device=cpu"]
    else:  # fine-tuning from the run
        data = write_data(tmp_path / "data", tiny_tokenizer, sft_rows(tiny_tokenizer), "sft", block_size=64)
        argv = [str(ROOT / "train.py"), f"--init_from={tiny_run}", f"--out_dir={tmp_path / 'out'}",
                f"--data_dir={data}", "--device=cpu", "--compile=False"]
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    message = done.stderr.strip()
    assert "refusing to load" in message and "could run code" in message, message
    assert "\n" not in message and "Traceback" not in message and "weights_only" not in message


def chat_subprocess(tiny_run, stdin, *flags):
    """sample.py as a user runs it, reading a real stdin."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--out_dir={tiny_run}", "--mode=chat",
                           "--system=你是一个助手。", *FAST, *flags],
                          input=stdin, capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def replies(out):
    return [part.split("\n你: ")[0] for part in out.split("助手: ")[1:]]


def test_chat_over_stdin_with_reset_and_quit(tiny_run):
    out = chat_subprocess(tiny_run, "你好\n/reset\n\n北京在哪里？\n/quit\n这一行不会被读到\n")
    assert "(history cleared)" in out
    assert len(replies(out)) == 2
    assert out.count("你: ") == 5  # five lines read up to /quit; the line after it is never read
    # after /reset the second turn (seed 5 + 1) sees no history: it equals a fresh chat's first turn
    fresh = run_sample(f"--out_dir={tiny_run}", "--mode=chat", "--system=你是一个助手。", *FAST, "--seed=6",
                       stdin="北京在哪里？\n")
    assert replies(out)[1] == replies(fresh)[0]


def test_chat_ends_at_end_of_input(tiny_run):
    out = run_sample(f"--out_dir={tiny_run}", "--mode=chat", *FAST, stdin="你好\n")
    assert out.count("助手: ") == 1 and out.endswith("你: \n")


def test_chat_history_is_trimmed_from_the_oldest_turn(tiny_run):
    run = load_run(tiny_run)
    history = []
    for i in range(20):
        history += [{"role": "user", "content": f"第{i}个问题是什么"},
                    {"role": "assistant", "content": "不知道"}]
    history.append({"role": "user", "content": "最后一个问题"})
    kept = sample.fit_history(run, history, "你是一个助手。", max_new_tokens=16)
    assert kept == history[-len(kept):] and kept[0]["role"] == "user"
    assert len(run.prompt_ids(kept, "chat", "你是一个助手。")) + 16 <= run.model.config.block_size
    longer = history[-len(kept) - 2:]
    assert len(run.prompt_ids(longer, "chat", "你是一个助手。")) + 16 > run.model.config.block_size


def test_rag_mode_answers_from_the_index_then_lists_its_sources(tiny_run, tiny_index):
    text = run_sample(f"--out_dir={tiny_run}", "--mode=rag", f"--rag={tiny_index}", "--rag_k=2",
                      "--start=紫禁城在哪里？", *FAST)
    run = load_run(tiny_run)
    from retrieval import Index

    ids, sources = run.rag_prompt_ids("紫禁城在哪里？", Index(tiny_index), 2, 12)
    assert sources and sources[0]["title"] == "故宫"  # the passage naming 紫禁城 ranks first
    assert ids[-1] == run.tok.answer and run.tok.decode(ids).startswith("故宫：故宫位于北京市中心")
    assert len(ids) <= 64 - 12  # the tiny run's window, less the answer's room
    answer = "".join(run.stream_ids(ids, "qa", max_new_tokens=12, temperature=1.0, top_k=200, seed=5))
    listed = "".join(f"  {i}. {s['title']}{' (cut)' if s['cut'] else ''}\n" for i, s in enumerate(sources, 1))
    assert text == answer + "\nsources:\n" + listed + "\n---------------\n"


def test_rag_mode_extractive_copies_from_the_sources(tiny_run, tiny_index):
    text = run_sample(f"--out_dir={tiny_run}", "--mode=rag", f"--rag={tiny_index}", "--rag_k=2",
                      "--start=紫禁城在哪里？", "--extractive", *FAST)
    from retrieval import Index, sources_text

    run = load_run(tiny_run)
    _, sources = run.rag_prompt_ids("紫禁城在哪里？", Index(tiny_index), 2, 12)
    answer = text.split("\nsources:")[0]
    assert answer and answer in sources_text(sources)
    with pytest.raises(SystemExit, match="needs --mode=rag"):
        run_sample(f"--out_dir={tiny_run}", "--mode=qa", "--extractive", "--start=长江？")


def test_rag_mode_flags(tiny_run, tiny_index, tmp_path):
    with pytest.raises(SystemExit, match="go together"):
        run_sample(f"--out_dir={tiny_run}", "--mode=rag", "--start=长江？")
    with pytest.raises(SystemExit, match="go together"):
        run_sample(f"--out_dir={tiny_run}", "--mode=qa", f"--rag={tiny_index}", "--start=长江？")
    with pytest.raises(SystemExit, match="no index at"):
        run_sample(f"--out_dir={tiny_run}", "--mode=rag", f"--rag={tmp_path / 'none'}", "--start=长江？")
    text = run_sample(f"--out_dir={tiny_run}", "--mode=rag", f"--rag={tiny_index}", "--start=量子色动力学？", *FAST)
    assert "sources: none" in text  # nothing shares a term: the question alone, and it says so
