"""docs/FORMATS.md's command-line table is a contract: every flag it lists for a script must be one
that script's `--help` offers (a renamed or dropped flag breaks users' scripts)."""
import re
import subprocess
import sys

import pytest
from conftest import ROOT

TABLE = (ROOT / "docs" / "FORMATS.md").read_text(encoding="utf-8")
# `python SCRIPT [subcommand] [PLACEHOLDERS]` | flags |
ROWS = {script + (f" {sub}" if sub else ""): flags
        for script, sub, flags in re.findall(r"^\| `python ([\w/]+\.py) ?([a-z]*)[^`]*` \| (.+) \|$", TABLE, re.M)}
SCRIPTS = {command: sorted(set(re.findall(r"`(--\w+)", flags))) for command, flags in ROWS.items()
           if command != "train.py"}
# train.py takes config keys as --key=value; the table lists the keys, its --help lists `key = default`
TRAIN_KEYS = sorted(set(re.findall(r"`([a-z_0-9]+)`", ROWS["train.py"])) - {"random", "sequential", "scratch",
                                                                           "resume"})


def test_the_table_was_read():
    expected = {"data/prepare_sft.py", "sample.py", "server.py", "pipeline.py", "retrieval.py", "lora.py merge"}
    assert expected <= set(SCRIPTS)
    assert "--extractive" in SCRIPTS["sample.py"] and "--human_qa" in SCRIPTS["pipeline.py"]
    assert {"out_dir", "init_from", "lora_rank", "dpo_beta"} <= set(TRAIN_KEYS)


@pytest.mark.slow
def test_every_listed_config_key_is_a_setting_of_train_py():
    shown = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    offered = set(re.findall(r"^  (\w+) = ", shown.stdout, re.M))
    assert not set(TRAIN_KEYS) - offered, f"train.py --help lacks {set(TRAIN_KEYS) - offered}"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_listed_flag_is_offered(script):
    path, *sub = script.split()
    shown = subprocess.run([sys.executable, str(ROOT / path), *sub, "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    offered = set(re.findall(r"(--\w+)", shown.stdout))
    assert not set(SCRIPTS[script]) - offered, f"{script} --help lacks {set(SCRIPTS[script]) - offered}"
