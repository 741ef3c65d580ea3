"""
The built-in post-training task, two-digit addition ("37+48=" -> "37+48=85"): its data and its judge.

    python addition.py             # writes data/add/: corpus.txt (pretraining), sft, prefs, prompts (+ held-out _val)
    python prepare.py --input=data/add/corpus.txt --dataset=add --vocab_size=261 && python train.py config/add.py
    python rlhf.py config/sft.py   # then the other stages (rlhf.py's docstring)

The corpus and the demonstrations are written by someone who forgets the carry task_slip of the time, so pretraining
and SFT learn the slip with the skill; the judge (task_reward) only has to *check* answers, so the preference stages
can go past the demonstrators (rlhf.py calls judge(row, response)). The task_held_out problems of the _val files are in no training set.
"""
import json
import os
import random
import re

from configurator import configure

# -----------------------------------------------------------------------------
task_dir = "data/add"
task_slip = 0.5             # how often the corpus and the demonstrations forget a carry
task_held_out = 300         # problems kept out of every training set
seed = 1337
# -----------------------------------------------------------------------------
RULES = dict(task_slip=(0.0, 1.0), task_held_out=(0, 9999))  # checked by configurator.configure (rules.md)


def task_answer(a, b, slip=0.0, rng=random):
    """The sum as the sloppy writer writes it: a carry out of the units is forgotten with probability slip."""
    forget = (a % 10 + b % 10) >= 10 and rng.random() < slip
    return a + b - 10 if forget else a + b


def task_reward(prompt, response):
    """The programmatic judge: 1.0 for exactly the right answer ("37+48=" -> "37+48=85"), else 0.0."""
    m = re.fullmatch(r"(\d+)\+(\d+)=", prompt if isinstance(prompt, str) else prompt[-1]["content"])
    return float(m is not None and response.strip() == f"{m[0]}{int(m[1]) + int(m[2])}")


def judge(row, response):
    """The judge of a JSONL row {"prompt", ...} and a response to its prompt, as every task's is called (rlhf.py)."""
    return task_reward(row["prompt"], response)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def make_task(task_dir, slip, n_held, seed):
    rng = random.Random(seed)
    problems = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(problems)
    held, rest = problems[:n_held], problems[n_held:]

    def worse(a, b):  # a rejected answer: the demonstrators' slip where there is a carry, else a carry that was not
        s, u = a + b, rng.random()  # there, a wrong digit, a digit too many, no working shown, or cut short
        if (a % 10 + b % 10) >= 10:
            return f"{a}+{b}={s - 10}"
        if u < 0.3:
            return f"{a}+{b}={s + 10}"
        if u < 0.55:
            return f"{a}+{b}={s + rng.choice([-2, -1, 1, 2] if s > 1 else [1, 2])}"
        if u < 0.7:
            return f"{a}+{b}={s}{rng.randrange(10)}"
        return str(s) if u < 0.85 else f"{a}+{b}={str(s)[:-1]}"

    os.makedirs(task_dir, exist_ok=True)
    out = lambda name: os.path.join(task_dir, name)  # noqa: E731
    with open(out("corpus.txt"), "w") as f:  # documents of 40 lines, prepare.py's separator
        for _ in range(3000):
            lines = (f"{a}+{b}={task_answer(a, b, slip, rng)}" for a, b in (rng.choice(rest) for _ in range(40)))
            f.write("\n".join(lines) + "\n<|endoftext|>\n")
    # The answer restates the problem, so its digits follow "=" as in pretraining and the skill learned there carries
    # over; a bare "85" after <|end|><|assistant|> would have to be relearned.
    write_jsonl(out("sft.jsonl"), [dict(prompt=f"{a}+{b}=", response=f"{a}+{b}={task_answer(a, b, slip, rng)}")
                                   for a, b in rest[:2000]])
    write_jsonl(out("sft_val.jsonl"), [dict(prompt=f"{a}+{b}=", response=f"{a}+{b}={a + b}") for a, b in held])
    for suffix, ps in (("", rest), ("_val", held)):
        write_jsonl(out(f"prefs{suffix}.jsonl"), [dict(prompt=f"{a}+{b}=", chosen=f"{a}+{b}={a + b}",
                                                       rejected=worse(a, b)) for a, b in ps])
        write_jsonl(out(f"prompts{suffix}.jsonl"), [dict(prompt=f"{a}+{b}=") for a, b in ps])
    print(f"wrote {task_dir}: corpus.txt, sft, prefs, prompts (.jsonl and held-out _val.jsonl); next: python "
          f"prepare.py --input={task_dir}/corpus.txt --dataset=add --vocab_size=261 && python train.py config/add.py")


if __name__ == "__main__":
    configure(globals())
    make_task(task_dir, task_slip, task_held_out, seed)
