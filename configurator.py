"""
The poor man's configurator, written once and used by every script.

A script's config keys are its module-level globals whose name starts with a lowercase letter and whose value is
of a plain type (int, float, bool, str, None, tuple, list). UPPER_CASE names are constants, never keys
(GPT2_PATTERN, REMOTE), nor are _private names, modules, functions or classes.
`configure(globals())` reads the command line and overrides the keys, in order:
    python train.py config/small.py --learning_rate=3e-4 --compile=False
- a bare argument is a config file: Python that is executed, its lowercase assignments become overrides
  (config files are code: run only the ones you trust; UPPER_CASE names there are the file's own constants);
- `--key=value` sets one key; the value is parsed as a Python literal, and kept as a string if it is not one;
  a bare `--key` sets a bool key to True.
Every key must already exist in the script and keep its type (an int may widen to a float); anything else
is a one-line error that names the key and the closest valid ones. A script's RULES dict (next to its keys) gives
keys a range, choices, or a type where the default is None; they are checked after every override:
    RULES = dict(lr_schedule=("cosine", "wsd"), dropout=(0.0, 1.0), batch_size=(1, None), n_kv_head=(int, 1, None))
`--help` (or `-h`) prints the usage lines of the script's docstring and every key with its default, its comment
from the source and its rule, grouped as in the source, then exits.
"""
import ast
import dataclasses
import difflib
import inspect
import io
import os
import sys
import textwrap
import tokenize
import traceback

PLAIN_TYPES = (int, float, bool, str, type(None), tuple, list)


def is_key(name, value):
    return name[:1].islower() and isinstance(value, PLAIN_TYPES)


def config_keys(namespace):
    return {k: v for k, v in namespace.items() if is_key(k, v)}


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
    Returns the resulting config as a dict (what checkpoints store). --help / -h prints help_text and exits 0."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        try:
            print(help_text(namespace), flush=True)
        except BrokenPipeError:  # python train.py --help | head: the reader left, which is no error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
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
            overrides, source = config_keys(run_config_file(arg)), arg
        for key, value in overrides.items():
            namespace[key] = check_value(key, value, defaults, source)
    for key, rule in namespace.get("RULES", {}).items():  # after every override: the values the script will use
        if key not in defaults:
            raise ValueError(f"RULES names {key!r}, which is not a config key of this script")
        namespace[key] = check_rule(key, namespace[key], rule, defaults[key])
    return {k: namespace[k] for k in defaults}


def run_config_file(path):
    """The names a config file sets (it is executed: trusted code, by design, see the docstring); any mistake in
    it is a one-line error naming the file and, where Python knows it, the line."""
    scope = {}
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")  # (not open(encoding=): its decode error would come from read())
        exec(compile(text, path, "exec"), scope)
    except UnicodeDecodeError as e:  # a UTF-16 file (Windows editors), or not text at all
        raise SystemExit(f"error: config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except Exception as e:  # a typo in a config is a user error: name the file and line, no traceback
        lines = [t.lineno for t in traceback.extract_tb(e.__traceback__) if t.filename == path]
        line = getattr(e, "lineno", None) or (lines[-1] if lines else None)
        where = f" line {line}" if line else ""
        raise SystemExit(f"error: config file {path}{where}: {type(e).__name__}: {e}; fix the file "
                         f"(config files are Python: plain assignments such as n_layer = 4)") from None
    return scope

# ---------------------------------------------------------------------------- RULES: a key's type, range or choices


def rule_parts(rule):
    """A RULES entry -> (types or None, (low, high) or None, choices or None). The forms: ("a", "b") choices;
    (low, high) an inclusive range, None for an open side; (type, low, high) or (type,) for a key whose default
    is None (a type may be a tuple of types)."""
    is_type = lambda t: isinstance(t, type) or (isinstance(t, tuple) and t and all(isinstance(x, type) for x in t))
    types, rest = (rule[0], rule[1:]) if rule and is_type(rule[0]) else (None, tuple(rule))
    types = (types,) if isinstance(types, type) else types
    if rest and all(isinstance(x, str) for x in rest):
        return types, None, rest
    if not rest:
        return types, None, None
    if len(rest) == 2 and all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in rest):
        return types, rest, None
    raise ValueError(f"a RULES entry is choices, (low, high) or (type, low, high), not {rule!r}")


def rule_text(rule, default):
    """A rule as --help and the errors write it: "[1, inf)", "one of: cosine, wsd", "int in [1, inf), or None"."""
    types, span, choices = rule_parts(rule)
    text = f"one of: {', '.join(choices)}" if choices else ""
    if span:
        low, high = span
        text = f"{'(-inf' if low is None else f'[{low}'}, {'inf)' if high is None else f'{high}]'}"
    if types:
        names = " or ".join(t.__name__ for t in types)
        text = f"{names} {'in ' if span else ''}{text}".strip() + (", or None" if default is None else "")
    return text


def check_rule(key, value, rule, default):
    """value if it keeps key's rule (an int given for a float type becomes a float), else a one-line error.
    None passes where the default is None."""
    types, span, choices = rule_parts(rule)
    if value is None and default is None:
        return value
    text = rule_text(rule, default)
    if types and not (isinstance(value, types) and (bool in types or not isinstance(value, bool))):
        if float in types and type(value) is int:
            return check_rule(key, float(value), rule, default)
        raise SystemExit(f"error: --{key}={value!r} is a {type(value).__name__}; give a value that is {text}")
    if choices and value not in choices:
        raise SystemExit(f"error: --{key}={value!r} is not {text}")
    if span:
        low, high = span
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (low is not None and value < low) or (high is not None and value > high):
            raise SystemExit(f"error: --{key}={value!r} is out of range; give a value in {rule_text(span, 0)}")
    return value

# ---------------------------------------------------------------------------- --help


def source_notes(source, in_class=False):
    """What a source file says about its top-level assignments (or, in_class, those of its first class):
    {name: (line, section, comment lines)}, and (line, section) of the first top-level statement that is an expression,
    such as train.py's globals().update(...), which sets keys without naming them (None if there is none).
    comment: the comment on the assignment's line, then the comment-only lines right under it indented deeper.
    section: the last run of comment-only lines at column 0 above it; `# ----` ends a section, `# ---- title`
    starts one."""
    lines = source.splitlines()
    comments = {}  # line -> (column, text, whether the comment is alone on its line)
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
        if t.type == tokenize.COMMENT:
            (row, col), text = t.start, t.string.lstrip("#").strip()
            comments[row] = (col, text, not lines[row - 1][:col].strip())
    tree = ast.parse(source)
    body = tree.body[0].body if in_class else tree.body
    notes, bulk, section, run, row = {}, None, None, [], 0
    for stmt in body:
        for r in range(row + 1, stmt.lineno):  # the lines between the previous statement and this one
            col, text, alone = comments.get(r, (None, "", False))
            if not (alone and col == 0):
                run = []
                continue
            if text.startswith("---"):
                section, run = text.lstrip("-").strip() or None, []
            else:
                run.append(text)
                section = " ".join(run)
        row, run = stmt.end_lineno, []
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(
            stmt, ast.AnnAssign) else []
        if isinstance(stmt, ast.Expr) and not isinstance(stmt.value, ast.Constant) and bulk is None:
            bulk = (stmt.lineno, section)
        for target in targets:
            if not isinstance(target, ast.Name) or target.id in notes:
                continue
            col, text, alone = comments.get(stmt.lineno, (0, "", True))
            comment = [] if alone else [text]
            r = stmt.end_lineno + 1
            while r in comments and comments[r][2] and comments[r][0] > stmt.col_offset:
                comment.append(comments[r][1])
                r += 1
            notes[target.id] = (stmt.lineno, section, comment)
    return notes, bulk


def usage_lines(doc):
    """The docstring's usage: each block of indented lines (or lines such as 'Run:  python bpe.py ...') that
    holds a command (a line starting with python or torchrun)."""
    import re
    command = re.compile(r"^\s*(\w+:\s+)?(python|torchrun)\s")
    blocks, block = [], []
    for line in (doc or "").splitlines() + [""]:
        if line.strip() and (line[:1].isspace() or command.match(line)):
            block.append(line)
            continue
        if any(command.match(b) for b in block):
            blocks.append(textwrap.indent(textwrap.dedent("\n".join(block)), "    "))
        block = []
    return blocks


def help_text(namespace):
    """The script's one-line summary and usage (from __doc__), then every config key with its default and
    its comment, grouped by the section comments of the source (__file__), in the source's order. The keys are
    written as a config file would write them, so a few of those lines make a valid config/*.py."""
    keys, path, doc = config_keys(namespace), namespace.get("__file__"), namespace.get("__doc__") or ""
    notes, bulk = {}, None
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            notes, bulk = source_notes(f.read())
    # keys the script sets without naming them (train.py: GPTConfig's fields) get the comment of that field
    field_notes = {}
    for v in list(namespace.values()):
        if isinstance(v, type) and dataclasses.is_dataclass(v):
            try:
                field_notes.update(source_notes(textwrap.dedent(inspect.getsource(v)), in_class=True)[0])
            except (OSError, TypeError, SyntaxError):
                pass
    rows, rules = [], namespace.get("RULES", {})
    for i, (k, v) in enumerate(keys.items()):
        line, section, comment = notes.get(k) or ((*bulk, []) if bulk else (float("inf"), None, []))
        comment = list(comment or field_notes.get(k, (0, None, []))[2])
        if k in rules:  # the rule after the comment's first line: "# tokens per shard file  [1, inf)"
            comment[:1] = ["  ".join(comment[:1] + [rule_text(rules[k], v)])]
        rows.append((line, i, section, f"{k} = {v!r}", comment))
    rows.sort()
    summary = next((l.strip() for l in doc.splitlines() if l.strip()), "")
    name = os.path.basename(path) if path else "this script"
    out = [f"{name}: {summary}" if summary else name]
    usage = usage_lines(doc)
    if usage:
        out += ["", "usage:"] + usage
    out += ["", f"config keys, with their defaults (override them with config files, python {name} config/FILE.py, "
                f"and --key=value, in order; a bare --flag sets a bool key to True):"]
    width = min(max((len(r[3]) for r in rows), default=0), 34) + 2
    shown = object()
    for _, _, section, assign, comment in rows:
        if section != shown:
            out += ["", f"# {section}"] if section else [""]
            shown = section
        out.append(f"{assign.ljust(width - 2)}  # {comment[0]}" if comment else assign)
        out += [f"{'':{width}}# {more}" for more in comment[1:]]
    return "\n".join(out)
