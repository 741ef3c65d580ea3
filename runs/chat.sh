#!/usr/bin/env bash
# The chat recipe, nanochat's speedrun.sh in small: pretrain -> SFT -> GRPO on word problems -> evaluate -> chat.
#   REAL (network, a GPU node): FineWeb-Edu -> GPT-2 124M (config/gpt2_124m.py) -> chat_data.py's GSM8K, SmolTalk,
#     ARC, MMLU -> SFT on SmolTalk + GSM8K (config/chat_sft.py) -> GRPO on GSM8K, gsm8k.judge scoring
#     (config/chat_grpo.py) -> eval.py --task=chat (GSM8K pass@1, ARC-Easy/Challenge, MMLU) -> sample.py --chat
#   OFFLINE (no network): the stdlib corpus -> a small GPT (config/wordprob_base.py) -> gsm8k.py's synthetic word
#     problems -> SFT (config/wordprob_sft.py) -> GRPO with gsm8k.judge (config/wordprob_grpo.py) -> pass@1 on
#     their test set (eval.py --task=chat; also each stage's last acc_greedy) -> sample.py --chat
#   bash runs/chat.sh                                  # OFFLINE, unless data/chat/gsm8k_train.jsonl is there
#   OFFLINE=0 TORCHRUN="torchrun --standalone --nproc_per_node=8" bash runs/chat.sh   # REAL, pretraining on 8 GPUs
#   OFFLINE=1 DIR=/tmp/c TRAIN_EXTRA="--device=cpu --max_iters=2 --compile=False" \
#     EXTRA="--device=cpu --max_iters=2 --eval_samples=4" EVAL_EXTRA=--device=cpu bash runs/chat.sh  # tiny, CPU
# A finished stage leaves $DIR/<stage>.done and is skipped when the script runs again; a stage cut short starts over.
set -eo pipefail
cd "$(dirname "$0")/.."
DIR=${DIR-out/chat}
DATA=${DATA-data}
PYTHON=${PYTHON-python}
TORCHRUN=${TORCHRUN-$PYTHON}   # how train.py is launched
TRAIN_EXTRA=${TRAIN_EXTRA-}    # train.py overrides
EXTRA=${EXTRA-}                # rlhf.py overrides, every post-training stage
EVAL_EXTRA=${EVAL_EXTRA-}      # eval.py overrides, e.g. --device=cpu
if [ -z "$OFFLINE" ]; then OFFLINE=1; if [ -f "$DATA/chat/gsm8k_train.jsonl" ]; then OFFLINE=0; fi; fi
mkdir -p "$DIR"

step() {  # step NAME COMMAND...: run it once; its out_dir, if any, is $DIR/NAME
    local name=$1
    shift
    if [ -e "$DIR/$name.done" ]; then echo "$name: done before"; return; fi
    rm -rf "${DIR:?}/$name"
    echo "== $name: $*"
    "$@"
    touch "$DIR/$name.done"
}

if [ "$OFFLINE" = 1 ]; then
    WP=$DATA/wordprob
    step data "$PYTHON" prepare.py --data_root="$DATA"                 # the stdlib corpus and a 4096-token BPE
    step base $TORCHRUN train.py config/wordprob_base.py --data_root="$DATA" --out_dir="$DIR/base" $TRAIN_EXTRA
    step problems "$PYTHON" gsm8k.py --synthetic --out="$WP"            # train 5000, val 200, test 500, rl 5000
    step sft "$PYTHON" rlhf.py config/wordprob_sft.py --init_from="$DIR/base" --out_dir="$DIR/sft" \
        --data="$WP/train.jsonl" --val_data="$WP/val.jsonl" --eval_prompts="$WP/test.jsonl" $EXTRA
    step grpo "$PYTHON" rlhf.py config/wordprob_grpo.py --init_from="$DIR/sft" --out_dir="$DIR/grpo" \
        --data="$WP/rl.jsonl" --eval_prompts="$WP/test.jsonl" $EXTRA
    EVAL=(--gsm8k_data="$WP/test.jsonl" --max_new_tokens=100)
else
    step data "$PYTHON" prepare.py --dataset=fineweb-edu --data_root="$DATA"   # 28.5 GB of parquet, a 50,257 BPE
    step base $TORCHRUN train.py config/gpt2_124m.py --data_root="$DATA" --out_dir="$DIR/base" $TRAIN_EXTRA
    step chat_data "$PYTHON" chat_data.py --data_root="$DATA"           # GSM8K, SmolTalk, UltraFeedback, ARC, MMLU
    C=$DATA/chat
    step sft "$PYTHON" rlhf.py config/chat_sft.py --init_from="$DIR/base" --out_dir="$DIR/sft" \
        --data="$C/smoltalk_train.jsonl,$C/gsm8k_train.jsonl" --val_data="$C/gsm8k_val.jsonl" \
        --eval_prompts="$C/gsm8k_val.jsonl" $EXTRA
    step grpo "$PYTHON" rlhf.py config/chat_grpo.py --init_from="$DIR/sft" --out_dir="$DIR/grpo" \
        --data="$C/gsm8k_train.jsonl" --eval_prompts="$C/gsm8k_val.jsonl" $EXTRA
    EVAL=(--chat_data_dir="$C" --gsm8k_data="$C/gsm8k_test.jsonl")
fi
for stage in sft grpo; do  # one table each: GSM8K pass@1 (and ARC, MMLU where their files are)
    "$PYTHON" eval.py --out_dir="$DIR/$stage" --task=chat "${EVAL[@]}" $EVAL_EXTRA
done
echo "chat with it: $PYTHON sample.py --out_dir=$DIR/grpo --chat"
if [ -t 0 ]; then exec "$PYTHON" sample.py --out_dir="$DIR/grpo" --chat; fi
