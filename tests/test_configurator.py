"""configurator.configure: types, unknown keys, config files then flags, and train.py's presets."""
import pytest
from conftest import ROOT

from configurator import ConfigError, configure

DEFAULTS = {"batch_size": 16, "learning_rate": 6e-4, "compile": "auto", "wandb_log": False,
            "out_dir": "out/pretrain", "max_epochs": None}


def test_defaults_are_returned_untouched_without_arguments():
    assert configure(DEFAULTS, []) == DEFAULTS


def test_flags_are_typed_by_their_defaults():
    config = configure(DEFAULTS, ["--batch_size=32", "--learning_rate=1", "--wandb_log=True",
                                  "--out_dir=2024", "--max_epochs=1.5"])
    assert config["batch_size"] == 32
    assert config["learning_rate"] == 1.0 and isinstance(config["learning_rate"], float)
    assert config["wandb_log"] is True
    assert config["out_dir"] == "2024"  # a name, even when it looks like a number
    assert config["max_epochs"] == 1.5
    assert configure(DEFAULTS, ["--batch_size=1e3"])["batch_size"] == 1000
    assert configure(DEFAULTS, ["--max_epochs=None"])["max_epochs"] is None
    assert configure(DEFAULTS, ["--out_dir=out/sft"])["out_dir"] == "out/sft"


def test_booleans_and_switches():
    assert configure(DEFAULTS, ["--wandb_log=False"])["wandb_log"] is False
    assert configure(DEFAULTS, ["--compile=False"])["compile"] is False  # 'auto' may be switched off
    assert configure(DEFAULTS, ["--compile=auto"])["compile"] == "auto"
    for bad in ("--wandb_log=1", "--wandb_log=yes"):
        with pytest.raises(ConfigError, match="'wandb_log' expects bool"):
            configure(DEFAULTS, [bad])


def test_wrong_types_are_errors():
    for bad in ("--batch_size=2.5", "--batch_size=many", "--learning_rate=fast", "--batch_size=True"):
        with pytest.raises(ConfigError, match="expects"):
            configure(DEFAULTS, [bad])


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as error:
        configure(DEFAULTS, ["--batch_szie=8"])
    message = str(error.value)
    assert "unknown config key 'batch_szie'" in message
    assert "valid keys: batch_size, compile, learning_rate, max_epochs, out_dir, wandb_log" in message


def test_malformed_flags_and_missing_files():
    with pytest.raises(ConfigError, match="--key=value"):
        configure(DEFAULTS, ["--batch_size", "8"])
    with pytest.raises(ConfigError, match="not found"):
        configure(DEFAULTS, ["no/such/config.py"])


def test_config_file_then_flags_in_order(tmp_path):
    config_file = tmp_path / "small.py"
    config_file.write_text("import math\n_scale = 2\nbatch_size = 4 * _scale\nlearning_rate = 3e-4\n"
                           "out_dir = 'out/small'\n")
    config = configure(DEFAULTS, [str(config_file), "--learning_rate=1e-3"])
    assert config == {**DEFAULTS, "batch_size": 8, "learning_rate": 1e-3, "out_dir": "out/small"}
    # a flag before the file is overridden by the file: the order on the command line decides
    assert configure(DEFAULTS, ["--batch_size=2", str(config_file)])["batch_size"] == 8


def test_config_file_sees_earlier_settings_and_is_checked(tmp_path):
    derived = tmp_path / "derived.py"
    derived.write_text("batch_size = batch_size * 2\n")
    assert configure(DEFAULTS, ["--batch_size=3", str(derived)])["batch_size"] == 6
    typo = tmp_path / "typo.py"
    typo.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'"):
        configure(DEFAULTS, [str(typo)])
    wrong = tmp_path / "wrong.py"
    wrong.write_text("batch_size = '8'\n")
    with pytest.raises(ConfigError, match="'batch_size' expects int"):
        configure(DEFAULTS, [str(wrong)])


def test_a_config_extends_its_base_and_overrides_it(tmp_path):
    (tmp_path / "base.py").write_text("batch_size = 32\nlearning_rate = 1e-3\nout_dir = 'out/base'\n")
    (tmp_path / "card.py").write_text("_extends = 'base.py'\nbatch_size = 128\nmax_epochs = batch_size // 64\n")
    config = configure(DEFAULTS, [str(tmp_path / "card.py"), "--out_dir=out/x"])
    # the base's values, the variant's over them (computed from the base's settings), flags last
    assert (config["batch_size"], config["learning_rate"], config["max_epochs"], config["out_dir"]) == \
        (128, 1e-3, 2, "out/x")
    (tmp_path / "loop.py").write_text("_extends = 'loop.py'\n")
    with pytest.raises(ConfigError, match="extends itself"):
        configure(DEFAULTS, [str(tmp_path / "loop.py")])
    (tmp_path / "orphan.py").write_text("_extends = 'missing.py'\n")
    with pytest.raises(ConfigError, match="not found"):
        configure(DEFAULTS, [str(tmp_path / "orphan.py")])
    (tmp_path / "typo.py").write_text("_extends = 'base.py'\nbatch_szie = 8\n")
    with pytest.raises(ConfigError, match="unknown config key 'batch_szie'"):
        configure(DEFAULTS, [str(tmp_path / "typo.py")])


@pytest.mark.parametrize("name", ["train_config.py", "train_config_sft.py", "train_config_cpu.py",
                                  "train_config_sft_cpu.py", "train_config_8gb.py", "train_config_24gb.py",
                                  "train_config_80gb.py"])
def test_train_presets_are_valid(name):
    import train

    config = configure(train.DEFAULTS, [str(ROOT / "config" / name)])
    if "sft" in name:  # fine-tuning starts from the matching pretraining preset's run
        pretrain = configure(train.DEFAULTS, [str(ROOT / "config" / name.replace("_sft", ""))])
        assert config["data_dir"] == "data/sft" and config["init_from"] == pretrain["out_dir"]
        assert config["out_dir"] != pretrain["out_dir"]


def test_errors_are_typed_and_train_py_turns_them_into_an_exit_status(capsys):
    """The library raises ConfigError (not SystemExit); only train.main exits, with the message."""
    import train

    assert not issubclass(ConfigError, SystemExit)
    with pytest.raises(SystemExit, match="unknown config key 'batch_szie'"):
        train.main(["--batch_szie=8"])
    train.main(["--help"])  # prints the settings and returns: no run starts
    assert "learning_rate = 0.0006" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["train_config_8gb.py", "train_config_24gb.py", "train_config_80gb.py"])
def test_card_presets_state_the_model_they_build(name):
    """The header of each GPU-card preset states its parameter count: it must be the model's."""
    import re

    import torch

    import train
    from model import GPT, GPTConfig

    config = configure(train.DEFAULTS, [str(ROOT / "config" / name)])
    stated = float(re.search(r"([0-9.]+)M parameters", (ROOT / "config" / name).read_text()).group(1))
    keys = ("n_layer", "n_head", "n_embd", "arch", "tie_embeddings")
    with torch.device("meta"):
        model = GPT(GPTConfig(block_size=512, vocab_size=32000, bias=False, **{k: config[k] for k in keys}))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == stated
    tokens_per_step = config["batch_size"] * config["gradient_accumulation_steps"] * 511
    assert tokens_per_step == 65408  # every card trains the same 65k-token steps
