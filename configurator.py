"""
The poor man's configurator, written once and used by every script.

A script's config is its module-level globals of plain types (int, float, bool, str, None, tuple, list).
`configure(globals())` reads the command line and overrides them, in order:
    python train.py config/small.py --learning_rate=3e-4 --compile=False
- a bare argument is a config file: Python that is executed, its assignments become overrides
  (config files are code: run only the ones you trust);
- `--key=value` sets one key; the value is parsed as a Python literal, and kept as a string if it is not one;
  a bare `--key` sets a bool key to True.
Every key must already exist in the script and keep its type (an int may widen to a float); anything else
is a one-line error that names the key and the closest valid ones.
"""
import ast
import difflib
import os
import sys
import traceback

PLAIN_TYPES = (int, float, bool, str, type(None), tuple, list)


def config_keys(namespace):
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, PLAIN_TYPES)}


def check_value(key, value, defaults, source="--"):
    """Return `value` converted to the type of the default of `key`, or exit with a one-line error.
    `source` names where the value came from (a config file, or the command line)."""
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(sorted(defaults))}"
        where = "" if source == "--" else f" in {source}"
        raise SystemExit(f"error: unknown config key '{key}'{where} ({hint})")
    default = defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):  # bool is an int subclass: compare exactly
        ok = type(value) is type(default)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list))
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        hint = "; write True or False" if isinstance(default, bool) else ""
        raise SystemExit(f"error: config key '{key}' expects {type(default).__name__} "
                         f"(default {default!r}), got {type(value).__name__} {value!r}{hint}")
    return value


def parse_literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as --dataset=stdlib is a string


def configure(namespace, argv=None):
    """Apply config files and --key=value from argv (default sys.argv[1:]) to `namespace` in place.
    Returns the resulting config as a dict (what checkpoints store)."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = config_keys(namespace)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq and isinstance(defaults.get(key), bool):
                text = "True"  # a bare --flag switches a bool key on: python sample.py --chat
            elif not eq:
                raise SystemExit(f"error: '{arg}' has no value; write --{key}=VALUE")
            value = parse_literal(text)
            if isinstance(defaults.get(key), str) and not isinstance(value, str):
                value = text  # a str key takes the text as written: --out_dir=2024 is the string '2024'
            overrides, source = {key: value}, "--"
        else:
            if not os.path.isfile(arg):
                raise SystemExit(f"error: config file '{arg}' does not exist (configs live in config/*.py)")
            scope = {}
            try:
                with open(arg, encoding="utf-8") as f:
                    exec(compile(f.read(), arg, "exec"), scope)  # trusted code, by design: see docstring
            except Exception as e:  # a typo in a config is a user error: name the file and line, no traceback
                line = getattr(e, "lineno", None) or [t.lineno for t in traceback.extract_tb(e.__traceback__)
                                                      if t.filename == arg][-1]
                raise SystemExit(f"error: config file {arg} line {line}: {type(e).__name__}: {e}; fix the file "
                                 f"(config files are Python: plain assignments such as n_layer = 4)") from None
            overrides = {k: v for k, v in scope.items() if not k.startswith("_") and isinstance(v, PLAIN_TYPES)}
            source = arg
        for key, value in overrides.items():
            namespace[key] = check_value(key, value, defaults, source)
    return {k: namespace[k] for k in defaults}
