#!/usr/bin/env bash
# The speedrun: a recipe against a baseline on the same tokens, each once per seed as `python train.py CONFIG` in a
# fresh process (start-up, data, compilation and evaluations all count), then the table (plot.py --table): best val
# loss, seconds from launch to the baseline's best val loss (the mean over its seeds) and their ratio to the
# baseline's; and val loss against time into $DIR/curves.png when matplotlib is installed.
#   VARIANTS="unet_skips=False; value_embeds=False" bash runs/speedrun.sh  # the ablation: one recipe row each
#   python prepare.py --dataset=sitepackages && RECIPE=config/speedrun_124m.py BASE=config/speedrun_124m_base.py SEEDS=1 \
#       bash runs/speedrun.sh                              # 124M: one pass over 101.6M tokens
#   BASE= TARGET=1.5599 bash runs/speedrun.sh                # no baseline runs: a given val loss to reach
#   bash runs/speedrun.sh --device=cpu --max_iters=50         # --key=value: train.py overrides for every run
#   CORPUS=readmes-1mb bash runs/speedrun.sh                  # the small recipes on a corpus they were not tuned on
# PAR=1 starts a row's seeds at once (small models leave a GPU idle; their times then overlap, rows do not).
set -eo pipefail
cd "$(dirname "$0")/.."
RECIPE=${RECIPE-config/speedrun_small.py}
BASE=${BASE-config/speedrun_small_base.py}
VARIANTS=${VARIANTS-}   # ";"-separated sets of recipe overrides
SEEDS=${SEEDS-3}        # seeds 1337, 1338, ... in $DIR/<row>-s0, -s1, ...
TARGET=${TARGET-0}      # the val loss to reach; 0: the baseline's best
PAR=${PAR-0}
DIR=${DIR-out/speedrun}
DATA=${DATA-data}
PYTHON=${PYTHON-python}
CORPUS=${CORPUS-}       # "": each config's own dataset; readmes-1mb: every run on that corpus instead
if [ -z "$BASE" ] && [ "$TARGET" = 0 ]; then
    echo "error: BASE= (no baseline) needs a TARGET, the val loss to reach" >&2
    exit 1
fi

# The small corpora, ~1 MB of whole documents each, byte level (vocab 256 + the 5 special tokens), every 10th held
# out. stdlib-1mb: every 10th stdlib .py file, for variety (the small recipes were tuned on it). readmes-1mb: a corpus
# no recipe was tuned on, English prose with some markdown and code: the descriptions in the installed packages'
# METADATA files (their READMEs) of >= 2,000 bytes; it depends on what is installed.
corpus_1mb() {  # corpus_1mb NAME: makes $DATA/NAME unless it is there
    [ ! -f "$DATA/$1/meta.json" ] || return 0
    mkdir -p "$DATA"
    "$PYTHON" - "$1" "$DATA/$1.txt" <<'PY'
import glob, os, sys, sysconfig
from prepare import corpus_files, read_documents
if sys.argv[1] == "stdlib-1mb":
    docs = read_documents(corpus_files("stdlib")[::10], strict=False)
else:
    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "*.dist-info", "METADATA")))
    bodies = (open(p, encoding="utf-8", errors="replace").read().partition("\n\n")[2] for p in paths)
    docs = (b for b in bodies if len(b) >= 2000)  # a real README, not a one-line summary
size = 0
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for doc in docs:
        if "<|endoftext|>" not in doc:  # a document that holds the separator would be cut in two
            f.write(doc + "\n<|endoftext|>\n")
            size += len(doc.encode())
            if size >= 1_000_000:
                break
PY
    "$PYTHON" prepare.py --input="$DATA/$1.txt" --dataset="$1" --data_root="$DATA" --vocab_size=261 --val_fraction=0.1
}
corpus_1mb stdlib-1mb
if [ "$CORPUS" = readmes-1mb ]; then
    corpus_1mb readmes-1mb
elif [ -n "$CORPUS" ] && [ ! -f "$DATA/$CORPUS/meta.json" ]; then
    echo "error: CORPUS=$CORPUS is not in $DATA; give readmes-1mb, or a dataset prepare.py made there" >&2
    exit 1
fi

runs=()
failed() { echo "error: $1 failed; its log: $1/train.log" >&2; exit 1; }
row() {  # row NAME CONFIG [--key=value ...]: the row's runs, one per seed, in $DIR/NAME-s<i> (train.log: the output)
    local name=$1 config=$2 pids=() outs=() s i
    shift 2
    for ((s = 0; s < SEEDS; s++)); do
        outs+=("$DIR/$name-s$s")
        rm -rf "${outs[s]}" && mkdir -p "${outs[s]}"
        echo "${EPOCHREALTIME:-$(date +%s)}" > "${outs[s]}/launch"  # plot.py counts the seconds from here
        "$PYTHON" train.py "$config" "${COMMON[@]}" "$@" --seed=$((1337 + s)) --out_dir="${outs[s]}" \
            --data_root="$DATA" --save_checkpoints=False > "${outs[s]}/train.log" 2>&1 &
        pids+=($!)
        [ "$PAR" = 1 ] || wait $! || failed "${outs[s]}"
    done
    for i in "${!pids[@]}"; do [ "$PAR" != 1 ] || wait "${pids[i]}" || failed "${outs[i]}"; done
    runs+=("${outs[@]}")
    echo "$name: $SEEDS seed(s) done"
}
COMMON=("$@")
[ -z "$CORPUS" ] || COMMON=(--dataset="$CORPUS" "${COMMON[@]}")
[ -z "$BASE" ] || row baseline "$BASE"
row recipe "$RECIPE"
IFS=';' read -ra variants <<< "$VARIANTS"
for v in "${variants[@]}"; do
    read -ra kv <<< "$v"  # "unet_skips=False value_embeds=False": a row named unet_skips-False_value_embeds-False
    [ ${#kv[@]} = 0 ] || { name="${kv[*]}"; name=${name// /_}; row "${name//=/-}" "$RECIPE" "${kv[@]/#/--}"; }
done

"$PYTHON" plot.py --table --target="$TARGET" "${runs[@]}"
if "$PYTHON" -c "import matplotlib" 2>/dev/null; then  # the first seed of each row
    firsts=()
    for r in "${runs[@]}"; do [[ $r != *-s0 ]] || firsts+=("$r"); done
    "$PYTHON" plot.py "${firsts[@]}" --out="$DIR/curves.png"
fi
