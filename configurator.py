"""
The poor man's configurator, written once and used by every script.

A script's config is its module-level globals of plain types (int, float, bool, str, None, tuple, list).
`configure(globals())` reads the command line and overrides them, in order:
    python train.py config/small.py --learning_rate=3e-4 --compile=False
- a bare argument is a config file: Python that is executed, its assignments become overrides
  (config files are code: run only the ones you trust);
- `--key=value` sets one key; the value is parsed as a Python literal, and kept as a string if it is not one.
Every key must already exist in the script and keep its type (an int may widen to a float); anything else
is a one-line error that names the key and the closest valid ones.
"""
import ast
import difflib
import os
import sys

PLAIN_TYPES = (int, float, bool, str, type(None), tuple, list)


def config_keys(namespace):
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, PLAIN_TYPES)}


def check_value(key, value, defaults):
    """Return `value` converted to the type of the default of `key`, or exit with a one-line error."""
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else f" (valid keys: {', '.join(sorted(defaults))})"
        raise SystemExit(f"error: unknown config key '{key}'{hint}")
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
        raise SystemExit(f"error: config key '{key}' expects {type(default).__name__} "
                         f"(default {default!r}), got {type(value).__name__} {value!r}")
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
            if not eq:
                raise SystemExit(f"error: '{arg}' has no value; write --{key}=VALUE")
            overrides = {key: parse_literal(text)}
        else:
            if not os.path.isfile(arg):
                raise SystemExit(f"error: config file '{arg}' does not exist (configs live in config/*.py)")
            scope = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), scope)  # trusted code, by design: see docstring
            overrides = {k: v for k, v in scope.items() if not k.startswith("_") and isinstance(v, PLAIN_TYPES)}
        for key, value in overrides.items():
            namespace[key] = check_value(key, value, defaults)
    return {k: namespace[k] for k in defaults}
