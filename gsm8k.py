"""
The GSM8K task (Cobbe et al. 2021): grade-school word problems whose worked solution ends in a line "#### N".

    python chat_data.py --which=gsm8k                  # the real GSM8K (download, then data/chat/gsm8k_*.jsonl)
    python gsm8k.py --synthetic --out=data/wordprob    # offline: GSM8K-shaped problems, {train,val,test,rl}.jsonl

A row, real or synthetic, is {"prompt": question, "response": worked solution ending "#### N", "answer": "N"}: rlhf.py
reads it as an SFT row (prompt, response) and as an RL prompt (prompt), and the judge reads "answer" from it, so
the answer travels with its prompt. judge(row, response) -> 1.0 for the right final number, else 0.0.

The final number of a text is the first number after its last "####", commas, "$" and a trailing "." dropped, and
numbers are compared as numbers ("1,000" == "1000", "3.50" == "3.5"). A response without "####" has no answer
(None), even when the right number is in it: the SFT data teaches the "####" line, and reading "the last number"
instead would pay a response for listing numbers until one is right.
"""
import json
import os
import random
import re
from decimal import Decimal, InvalidOperation

from configurator import configure

# -----------------------------------------------------------------------------
synthetic = False           # write the offline synthetic word problems (the only thing this script writes)
out = "data/wordprob"       # their directory: train.jsonl, val.jsonl, test.jsonl, rl.jsonl
n_train = 5000              # problems of each split, all distinct
n_val = 200
n_test = 500
n_rl = 5000                 # the RL stage's prompts: problems the SFT stage never saw, so RL learns to solve, not to
                            # recall (on its own SFT problems the SFT model samples right answers ~1.7x as often)
seed = 1337
# -----------------------------------------------------------------------------
RULES = dict(n_train=(0, None), n_val=(0, None), n_test=(0, None), n_rl=(0, None))  # checked by configurator.configure

# a number as written: 1,234.5 (commas only in groups of three), 42, 3.50, .5; a "$" and a "-" on either side of it
NUMBER = re.compile(r"(-?)\$?(-?)(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def canonical(number):
    """"1,000" / "$1000." / "1000.00" -> "1000"; None if it is not one number."""
    m = NUMBER.fullmatch(str(number).strip().rstrip("."))
    if m is None or (m[1] and m[2]):
        return None
    try:
        d = Decimal(m[1] + m[2] + m[3].replace(",", ""))
    except InvalidOperation:
        return None
    return "0" if d == 0 else format(d.normalize(), "f")


def gsm8k_answer(text):
    """The final number of a solution or a model's response (see the docstring above), canonical, or None."""
    if not isinstance(text, str) or "####" not in text:
        return None
    m = NUMBER.search(text.rsplit("####", 1)[1])
    return canonical(m[0]) if m else None


def gsm8k_reward(prompt, response, answer):
    """1.0 if the response's final number is `answer` (a number, or a string of one), else 0.0. `prompt` (a row or its
    prompt) is not read: the answer is given, the argument is there so every judge is called alike."""
    got = gsm8k_answer(response)
    return float(got is not None and got == canonical(answer))


def judge(row, response):
    """The programmatic judge of a JSONL row {"prompt", "answer", ...} and a response to its prompt."""
    if not isinstance(row, dict) or canonical(row.get("answer", "")) is None:
        raise SystemExit(f'error: a GSM8K row needs "answer", a number; got {str(row)[:80]}')
    return gsm8k_reward(row, response, row["answer"])


def gsm8k_row(question, solution):
    """A row from a question and its worked solution in the official format. GSM8K's calculator annotations
    ("48/2 = <<48/2=24>>24") are dropped: scratchlm's models have no calculator to call, and the text already says
    the same. None when the solution has no final number."""
    answer = gsm8k_answer(solution)
    if answer is None or not question.strip():
        return None
    return dict(prompt=question.strip(), response=re.sub(r"<<[^<>]*>>", "", solution).strip(), answer=answer)

# ---------------------------------------------------------------------------- synthetic word problems
NAMES = [("Ava", "she"), ("Ben", "he"), ("Chloe", "she"), ("Dev", "he"), ("Ema", "she"), ("Femi", "he"),
         ("Gia", "she"), ("Hugo", "he"), ("Iris", "she"), ("Jon", "he"), ("Kai", "he"), ("Lena", "she")]
ITEMS = ["apples", "stickers", "marbles", "cookies", "pencils", "cards", "shells", "stamps"]


def shares(rng, name, he, item):  # a*b, then - c, then / d, all whole numbers
    a, b, d = rng.randint(3, 9), rng.randint(4, 12), rng.randint(2, 6)  # a*b >= 12: each friend gets >= 1
    each = rng.randint(1, (a * b - 1) // d)
    t1, t2 = a * b, each * d
    c = t1 - t2
    q = (f"{name} buys {a} packs of {item} with {b} {item} in each pack. {he.capitalize()} gives {c} {item} to a "
         f"neighbour and shares the rest equally among {d} friends. How many {item} does each friend get?")
    steps = [f"{name} buys {a} * {b} = {t1} {item}.", f"After giving some away, {t1} - {c} = {t2} {item} are left.",
             f"Each friend gets {t2} / {d} = {each} {item}."]
    return q, steps, each


def savings(rng, name, he, item):  # a*b, then *c, then -d
    a, b, c = rng.randint(5, 20), rng.randint(2, 10), rng.randint(2, 6)
    t1 = a * b
    t2 = t1 * c
    d = rng.randint(1, t2 - 1)
    q = (f"{name} earns ${a} an hour and works {b} hours a week. After {c} weeks {he} spends ${d} on a bike. How "
         f"many dollars does {name} have left?")
    steps = [f"{name} earns {a} * {b} = {t1} dollars a week.", f"In {c} weeks that is {t1} * {c} = {t2} dollars.",
             f"After the bike, {t2} - {d} = {t2 - d} dollars are left."]
    return q, steps, t2 - d


def farm(rng, name, he, item):  # a*b, then a+t1
    a, b = rng.randint(2, 30), rng.randint(2, 9)
    t1 = a * b
    q = (f"{name}'s farm has {a} cows and {b} times as many chickens as cows. How many cows and chickens are there "
         f"on the farm?")
    steps = [f"There are {a} * {b} = {t1} chickens.", f"Cows and chickens together: {a} + {t1} = {a + t1}."]
    return q, steps, a + t1


def reading(rng, name, he, item):  # a+b, then *c, then a+t1, then +t2
    a, b, c = rng.randint(5, 40), rng.randint(1, 20), rng.randint(2, 3)
    t1 = a + b
    t2, t3 = t1 * c, a + t1
    q = (f"{name} reads {a} pages on Monday and {b} more pages on Tuesday than on Monday. On Wednesday {he} reads "
         f"{c} times as many pages as on Tuesday. How many pages does {name} read in the three days?")
    steps = [f"On Tuesday {name} reads {a} + {b} = {t1} pages.", f"On Wednesday {he} reads {t1} * {c} = {t2} pages.",
             f"Monday and Tuesday make {a} + {t1} = {t3} pages.", f"In all, {t3} + {t2} = {t3 + t2} pages."]
    return q, steps, t3 + t2


TEMPLATES = [shares, savings, farm, reading]


def synthetic_rows(n, rng):
    """n distinct GSM8K-shaped rows (2 to 4 worked steps, then "#### N"), a function of rng's state."""
    rows, seen = [], set()
    while len(rows) < n:
        name, he = rng.choice(NAMES)
        q, steps, answer = rng.choice(TEMPLATES)(rng, name, he, rng.choice(ITEMS))
        if q not in seen:
            seen.add(q)
            rows.append(gsm8k_row(q, "\n".join(steps) + f"\n#### {answer}"))
    return rows


def write_synthetic(out_dir, sizes, seed):
    """<split>.jsonl in out_dir, sizes a dict split -> rows, no question in two splits. The rows are drawn in the
    order of sizes: a split added at the end leaves the earlier splits' files as they were."""
    rows = synthetic_rows(sum(sizes.values()), random.Random(seed))
    os.makedirs(out_dir, exist_ok=True)
    start = 0
    for split, n in sizes.items():
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[start:start + n])
        os.replace(path + ".tmp", path)  # whole or absent: a killed run leaves no short file behind
        start += n
        print(f"{path}: {n} rows, {os.path.getsize(path)} bytes")


def main():
    configure(globals())
    if not synthetic:
        raise SystemExit("error: nothing to do; pass --synthetic to write the offline word problems, or get the "
                         "real GSM8K with python chat_data.py --which=gsm8k")
    if n_train + n_test == 0:  # each >= 0: RULES
        raise SystemExit("error: n_train and n_test are both 0: nothing to write; give either some problems")
    write_synthetic(out, dict(train=n_train, val=n_val, test=n_test, rl=n_rl), seed)


if __name__ == "__main__":
    main()
