"""Settings for scripts in nanoGPT's style: defaults, then config files, then `--key=value` flags.

A script declares its settings as a dict of defaults (train.py: its module-level assignments) and
calls `configure(defaults, argv)`, which returns the final settings as a new dict:

    python train.py config/train_config_cpu.py --batch_size=8 --compile=False

- A config file is plain Python executed in a namespace holding the current settings, so it may
  compute values; every name it leaves behind (except `_private` ones, modules, functions and
  classes) must be a known setting. `_extends = "other.py"` (a path beside the file) applies that
  config first, so a variant (the GPU-card presets) states only what differs from its base.
- A flag's value is read as a Python literal when it is one (`8`, `3e-4`, `True`, `None`) and as
  text otherwise (`--out_dir=out/sft`).
- Every value is checked against the type of its default: int, float (an int is accepted), bool
  (True/False only, so `--compile=0` cannot silently mean something else) and str (also a bool,
  for switches such as `compile='auto'` that may be turned on or off). A None default accepts
  anything. A wrong type or an unknown key raises `ConfigError` with a message listing the valid
  keys: a typo must never be silently ignored. The script's `main()` turns it into an exit status;
  `-h` / `--help` is for `main()` too (`settings_help` gives the text).
"""
import ast
import sys
import types
from pathlib import Path

_NOT_SETTINGS = (types.ModuleType, types.FunctionType, type)


class ConfigError(ValueError):
    """A setting that does not exist or has the wrong type, a missing config file, a malformed flag."""


def _fail(message, defaults):
    raise ConfigError(f"{message}\nvalid keys: {', '.join(sorted(defaults))}")


def _checked(key, value, defaults, text=None):
    """`value` in the type of the default of `key` (`text`: the flag's raw spelling, if any)."""
    if key not in defaults:
        _fail(f"unknown config key {key!r}", defaults)
    default = defaults[key]
    if default is None:
        return value
    kind = type(default)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # --max_iters=1e4
            return int(value)
    if kind is str:
        if isinstance(value, (str, bool)):
            return value
        if text is not None:  # --out_dir=2024 is a name, not a number
            return text
    _fail(f"config key {key!r} expects {kind.__name__} (default {default!r}), got {value!r}", defaults)


def _parse_literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def settings_help(defaults):
    """The text `--help` prints: every setting with its default."""
    return "\n".join(["settings (override in a config file or with --key=value):",
                      *(f"  {key} = {value!r}" for key, value in defaults.items())])


def _run_file(path, config):
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    namespace = dict(config)
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
    return namespace


def _apply_file(path, config, defaults, seen=()):
    """`config` after the config file at `path` (its `_extends` base first, then the file again
    over the base's settings, so values it computes see them)."""
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} extends itself (through {', '.join(map(str, seen))})")
    namespace = _run_file(path, config)
    base = namespace.get("_extends")
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: _extends must be a file name, not {base!r}")
        config = _apply_file(path.parent / base, config, defaults, (*seen, path.resolve()))
        namespace = _run_file(path, config)
    config = dict(config)
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, _NOT_SETTINGS):
            continue
        config[key] = _checked(key, value, defaults)
    return config


def configure(defaults, argv=None):
    """The settings after applying the config files and `--key=value` flags in `argv`, in order."""
    config = dict(defaults)
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("--"):
            config = _apply_file(Path(arg), config, defaults)
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"flag {arg!r} must be written --key=value")
        config[key] = _checked(key, _parse_literal(text), defaults, text)
    return config
