"""
Real post-training data: download public datasets once and convert them to rlhf.py's and eval.py's JSONL rows.

    python chat_data.py                                # every dataset below (parquet: needs pyarrow)
    python chat_data.py --which=gsm8k,arc --data_root=data

Writes data_root/chat/<name>_{train,val,test}.jsonl and prints each file's rows and bytes. Downloads go to
data_root/downloads/ (prepare.py's download: resumable, the Hub revision pinned in the URL, size and sha256 checked
where known, else the first download's sha256 pinned beside it). A dataset without a validation split gives every
val_every-th training row to val instead, so val is never trained on.

- gsm8k (openai/gsm8k, main): {"prompt": question, "response": worked solution ending "#### N", "answer": "N"},
  an SFT row and an RL prompt at once, judged by gsm8k.judge; train -> train/val, test -> test.
- smoltalk (HuggingFaceTB/smoltalk, one subset, `smoltalk_subset`): SFT rows {"messages": [{"role", "content"}]}.
  The chat SFT mix is rlhf.py's comma list: --data=data/chat/smoltalk_train.jsonl,data/chat/gsm8k_train.jsonl
- ultrafeedback (HuggingFaceH4/ultrafeedback_binarized, train_prefs/test_prefs): preference rows {"prompt": str (one
  user turn) or the messages before the answer, "chosen": str, "rejected": str}, the final assistant turns.
- arc_easy, arc_challenge (allenai/ai2_arc; --which=arc is both) and mmlu (cais/mmlu, all): multiple-choice rows
  {"question", "choices": [str], "answer": index} and, for eval.py --task=mc, the same as {"context": "Question:
  ...\\nAnswer:", "endings": [" " + choice], "label": index}. mmlu's train is its 285 "dev" (few-shot) rows.
"""
import json
import os

from configurator import configure
from gsm8k import gsm8k_row
from prepare import download

# -----------------------------------------------------------------------------
which = "gsm8k,smoltalk,ultrafeedback,arc,mmlu"  # comma-separated names of SOURCES, or "arc" for both ARC sets
data_root = "data"
smoltalk_subset = "everyday-conversations"  # a one-file subset of SmolTalk's data/ (smol-rewrite, systemchats-30k...)
val_every = 20              # datasets without a validation split: every val_every-th training row goes to val
# -----------------------------------------------------------------------------
RULES = dict(val_every=(2, None))  # checked by configurator.configure (rules.md): val_every=1 would leave no train

HF = "https://huggingface.co/datasets/"
GSM8K = HF + "openai/gsm8k/resolve/740312add88f781978c0658806c59bc2815b9866/main/"
SMOLTALK = HF + "HuggingFaceTB/smoltalk/resolve/492f43bb75cfc708660a9055b6eabeced4949c72/data/{subset}/"
ULTRAFEEDBACK = HF + "HuggingFaceH4/ultrafeedback_binarized/resolve/2a3fb934ee563e5441bf211adaf5215c3fa508dd/data/"
ARC = HF + "allenai/ai2_arc/resolve/210d026faf9955653af8916fad021475a3f00453/"
MMLU = HF + "cais/mmlu/resolve/c30699e8356da336a370243923dbaf21066bb9fe/all/"
ONE = "-00000-of-00001.parquet"
SOURCES = {  # name -> split -> (url, size in bytes or None, sha256 or None = pinned on first download)
    "gsm8k": dict(
        train=(GSM8K + "train" + ONE, None, "ea82612ea9582142387730c793eb67d3b12849002bc0b7fa6f8efafa7351419d"),
        test=(GSM8K + "test" + ONE, None, "ee7b8da9e381df27b9e3f7758a159ab2bdaa4dbaa910546cbbc47e0cb44e4f59")),
    "smoltalk": dict(train=(SMOLTALK + "train" + ONE, None, None), test=(SMOLTALK + "test" + ONE, None, None)),
    "ultrafeedback": dict(train=(ULTRAFEEDBACK + "train_prefs" + ONE, None, None),
                          test=(ULTRAFEEDBACK + "test_prefs" + ONE, None, None)),
    "arc_easy": {split: (ARC + f"ARC-Easy/{part}" + ONE, None, None)
                 for split, part in (("train", "train"), ("val", "validation"), ("test", "test"))},
    "arc_challenge": dict(
        train=(ARC + "ARC-Challenge/train" + ONE, 189909,
               "e488c1587ffdcfc8443f916c53488a95cd471c5790e0746c6bfe4cecf20962cb"),
        val=(ARC + "ARC-Challenge/validation" + ONE, 55743,
             "395a5c88d1580d69855fbaee9450270578df1ad5af6259771cd0a42c20e99f05"),
        test=(ARC + "ARC-Challenge/test" + ONE, 203808,
              "62f03257e737aed263f55c6abf87c7bb0028a44a6bdd2a26eb1279eb42c1d1e9")),
    "mmlu": dict(train=(MMLU + "dev" + ONE, None, None), val=(MMLU + "validation" + ONE, None, None),
                 test=(MMLU + "test" + ONE, None, None)),
}
GROUPS = {"arc": ["arc_easy", "arc_challenge"]}
COLUMNS = {"gsm8k": ["question", "answer"], "smoltalk": ["messages"], "ultrafeedback": ["prompt", "chosen", "rejected"],
           "arc_easy": ["question", "choices", "answerKey"], "arc_challenge": ["question", "choices", "answerKey"],
           "mmlu": ["question", "subject", "choices", "answer"]}
ROLES = ("system", "user", "assistant")  # bpe.encode_chat's


def parquet_module():
    try:
        import pyarrow.parquet  # optional: only these downloads need it
    except ImportError:
        raise SystemExit("error: reading the datasets' .parquet files needs pyarrow; `pip install pyarrow`") from None
    return pyarrow.parquet


def parquet_rows(path, columns):
    """The rows of a parquet file as dicts of `columns` (nested lists and structs as Python lists and dicts)."""
    pq = parquet_module()
    try:
        names = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise SystemExit(f"error: {path} lacks the columns {', '.join(missing)} (it has {', '.join(names)})")
        return pq.read_table(path, columns=columns).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowIOError is an OSError, ArrowInvalid a ValueError
        raise SystemExit(f"error: cannot read {path} as parquet ({type(e).__name__}: {e})") from None

# ---------------------------------------------------------------------------- one converter per dataset
# Each takes the parquet's rows and returns the JSONL rows; a row that cannot be used is left out (counted).


def gsm8k_rows(rows):
    return [gsm8k_row(r["question"] or "", r["answer"] or "") for r in rows]


def chat_messages(messages):
    """[{"role", "content"}] if every message is one bpe.encode_chat takes and an assistant speaks, else None."""
    ok = isinstance(messages, list) and all(isinstance(m, dict) and m.get("role") in ROLES and
                                            isinstance(m.get("content"), str) for m in messages)
    if not ok or not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None
    return [dict(role=m["role"], content=m["content"]) for m in messages]


def smoltalk_rows(rows):
    return [dict(messages=m) if (m := chat_messages(r["messages"])) else None for r in rows]


def preference_row(r):
    chosen, rejected = chat_messages(r["chosen"]), chat_messages(r["rejected"])
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant" \
            or chosen[:-1] != rejected[:-1] or chosen[-1]["content"] == rejected[-1]["content"]:
        return None  # not two answers to one conversation, or no preference between them
    context = chosen[:-1]
    prompt = context[0]["content"] if [m["role"] for m in context] == ["user"] else context
    return dict(prompt=prompt, chosen=chosen[-1]["content"], rejected=rejected[-1]["content"]) if context else None


def ultrafeedback_rows(rows):
    return [preference_row(r) for r in rows]


def mc_row(question, choices, answer, **extra):
    """A multiple-choice row, also in eval.py's form: the question as context, each choice an ending after a space."""
    if not isinstance(question, str) or not question.strip() or not isinstance(choices, list) or len(choices) < 2 \
            or not all(isinstance(c, str) and c.strip() for c in choices) or answer not in range(len(choices)):
        return None
    return dict(question=question, choices=choices, answer=answer, **extra, context=f"Question: {question}\nAnswer:",
                endings=[" " + c for c in choices], label=answer)


def arc_rows(rows):
    out = []
    for r in rows:  # answerKey is one of choices.label: "A".."E", or "1".."5" in a few questions
        labels = (r["choices"] or {}).get("label") or []
        out.append(mc_row(r["question"], (r["choices"] or {}).get("text"), labels.index(r["answerKey"]))
                   if r["answerKey"] in labels else None)
    return out


def mmlu_rows(rows):
    return [mc_row(r["question"], r["choices"], r["answer"], subject=r["subject"]) for r in rows]


CONVERT = {"gsm8k": gsm8k_rows, "smoltalk": smoltalk_rows, "ultrafeedback": ultrafeedback_rows, "arc_easy": arc_rows,
           "arc_challenge": arc_rows, "mmlu": mmlu_rows}

# ---------------------------------------------------------------------------- files


def write_jsonl(path, rows):
    """Write rows atomically (a killed run leaves no short file) and say how much."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(path + ".tmp", path)
    print(f"{path}: {len(rows)} rows, {os.path.getsize(path)} bytes")


def dataset_names(which):
    names = [n for w in which.split(",") if w.strip() for n in GROUPS.get(w.strip(), [w.strip()])]
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        raise SystemExit(f"error: unknown dataset {', '.join(unknown) or repr(which)} in --which; choose from "
                         f"{', '.join([*SOURCES, *GROUPS])}")
    return list(dict.fromkeys(names))


def fetch(name, data_root, smoltalk_subset):
    """{split: path} of the dataset's downloaded parquet files."""
    os.makedirs(os.path.join(data_root, "downloads"), exist_ok=True)
    paths = {}
    for split, (url, size, sha256) in SOURCES[name].items():
        stem = f"{name}-{smoltalk_subset}" if name == "smoltalk" else name
        paths[split] = download(url.format(subset=smoltalk_subset),
                                os.path.join(data_root, "downloads", f"{stem}-{split}.parquet"), size, sha256)
    return paths


def convert(name, paths, out_dir, val_every):
    """Write out_dir/<name>_<split>.jsonl for each split; train gives every val_every-th row to val if no val file."""
    splits = {}
    for split, path in paths.items():
        rows = CONVERT[name](parquet_rows(path, COLUMNS[name]))
        kept = [r for r in rows if r is not None]
        if len(kept) < len(rows):
            print(f"{name} {split}: left out {len(rows) - len(kept)} of {len(rows)} rows that are not usable")
        if split == "train" and "val" not in paths:
            splits["val"] = kept[val_every - 1::val_every]
            kept = [r for i, r in enumerate(kept) if (i + 1) % val_every]
        splits[split] = kept
    os.makedirs(out_dir, exist_ok=True)
    for split in ("train", "val", "test"):
        if split in splits:
            write_jsonl(os.path.join(out_dir, f"{name}_{split}.jsonl"), splits[split])


def main():
    configure(globals())
    names = dataset_names(which)
    parquet_module()  # before any download: a missing pyarrow is found in a second, not after the downloads
    for name in names:
        convert(name, fetch(name, data_root, smoltalk_subset), os.path.join(data_root, "chat"), val_every)


if __name__ == "__main__":
    main()
