"""bench/gpu_check.py --smoke: the GPU check's whole code path on the CPU with tiny shapes, so a
broken check is found here and not in the few minutes a GPU is lent."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["correctness"]["passed"] and "passed" in report["correctness"]["summary"]
    assert [r["arch"] for r in report["train"]] == ["gpt2", "qwen3"]
    assert all(r["losses_agree"] and r["ours"]["tokens_per_s"] > 0 for r in report["train"])
    assert all(row["ours"]["tokens_per_s"] > 0 for g in report["generate"] for row in g["rows"])
    server = report["server"]
    assert server["n_errors"] == 0 and server["tokens"] == server["streams"] * report["shape"]["stream_tokens"]
    assert "| gpt2 |" in (tmp_path / "gpu_check.md").read_text()
