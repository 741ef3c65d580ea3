#!/usr/bin/env bash
# The post-training pipeline on the built-in task (see rlhf.py's docstring) once per seed, then the table of every
# stage's last evaluation on the held-out problems, mean +- std over the seeds (plot.py --table): accuracy (exact
# match, sampled at temperature 1 or greedy), reward (by the stage's own reward model, or the judge), KL to the SFT
# model; each reward model's pairwise accuracy on its held-out pairs. Per seed, in this order:
#   pretraining (train.py config/add.py) -> sft -> rm on the offline pairs -> ppo on it; ppo-judge, grpo and rloo on
#   the task's judge; dpo on the offline pairs; InstructGPT's way: label (the SFT model's samples judged) ->
#   rm-onpol (the offline pairs and those) -> ppo-onpol on it.
#   bash runs/posttrain.sh                       # seeds 1337 1 2, in out/posttrain/<stage>-s<seed>
#   SEEDS=1337 PAR=1 bash runs/posttrain.sh      # one seed; PAR=1: seeds, and the stages after sft, run at once
#   bash runs/posttrain.sh --device=cpu          # --key=value: rlhf.py overrides, every stage (TRAIN_ARGS: train.py's)
# A stage that finished leaves a `done` file in its out_dir and is kept when the script runs again (after a failure,
# or to add seeds); delete its folder to run it again (the stages that read it are not redone).
set -eo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS-1337 1 2}
PAR=${PAR-0}
DIR=${DIR-out/posttrain}
TRAIN_ARGS=${TRAIN_ARGS-}  # e.g. "--device=cpu --max_iters=100"
PYTHON=${PYTHON-python}
ARGS=("$@")
T=$DIR/task

stage() {  # stage NAME SCRIPT [--key=value ...]: python SCRIPT ... with out_dir $DIR/NAME, unless done before
    local name=$1 t0=$SECONDS
    shift
    if [ -e "$DIR/$name/done" ]; then echo "$name: done before"; return; fi
    rm -rf "${DIR:?}/$name" && mkdir -p "$DIR/$name"  # a stage cut short starts again
    if ! "$PYTHON" "$@" > "$DIR/$name.log" 2>&1; then
        echo "error: stage $name failed (see $DIR/$name.log); fix it and rerun: finished stages are kept" >&2
        exit 1
    fi
    touch "$DIR/$name/done"
    echo "$name: done in $((SECONDS - t0))s"
}
rl() {  # rl STAGE CONFIG [--key=value ...]: an rlhf.py stage of seed $s from its SFT model, evaluated on all 300
    local name=$1-s$s config=$2  # held-out problems (the table's scores are the last evaluation's)
    shift 2
    stage "$name" rlhf.py "$config" --init_from="$DIR/sft-s$s" --out_dir="$DIR/$name" --seed="$s" --eval_samples=300 \
        "$@" "${ARGS[@]}"
}
bg() { if [ "$PAR" = 1 ]; then "$@" & pids+=($!); else "$@"; fi; }  # in the background with PAR=1
join() { for p in "${pids[@]}"; do wait "$p"; done; pids=(); }      # a failure there stops the script

offline() {  # the RM on the task's offline pairs, then PPO on it
    rl rm config/rm.py --data="$T/prefs.jsonl" --val_data="$T/prefs_val.jsonl"
    rl ppo config/ppo.py --data="$T/prompts.jsonl" --eval_prompts="$T/prompts_val.jsonl" --reward_model="$DIR/rm-s$s"
}
onpolicy() {  # the SFT model's own samples compared by the judge, an RM on those and the offline pairs, PPO on it
    local pairs=$DIR/label-s$s/prefs_sft
    stage "label-s$s" rlhf.py config/label.py --init_from="$DIR/sft-s$s" --data="$T/prompts.jsonl" \
        --label_out="$pairs.jsonl" --seed="$s" "${ARGS[@]}"
    rl rm-onpol config/rm.py --data="$T/prefs.jsonl,$pairs.jsonl" --val_data="${pairs}_val.jsonl"
    rl ppo-onpol config/ppo.py --data="$T/prompts.jsonl" --eval_prompts="$T/prompts_val.jsonl" \
        --reward_model="$DIR/rm-onpol-s$s"
}
chain() {  # chain SEED: one seed's stages
    local s=$1 pids=() judge=(--reward_model=task --data="$T/prompts.jsonl" --eval_prompts="$T/prompts_val.jsonl")
    stage "base-s$s" train.py config/add.py --data_root="$DIR/data" --out_dir="$DIR/base-s$s" --seed="$s" $TRAIN_ARGS
    rl sft config/sft.py --init_from="$DIR/base-s$s" --data="$T/sft.jsonl" --val_data="$T/sft_val.jsonl" \
        --eval_prompts="$T/prompts_val.jsonl"
    bg offline
    bg rl ppo-judge config/ppo.py "${judge[@]}"
    bg rl dpo config/dpo.py --data="$T/prefs.jsonl" --val_data="$T/prefs_val.jsonl" \
        --eval_prompts="$T/prompts_val.jsonl"
    bg rl grpo config/grpo.py "${judge[@]}"
    bg rl rloo config/rloo.py "${judge[@]}"
    bg onpolicy
    join
}

pids=()
stage task addition.py --task_dir="$T"
stage data prepare.py --input="$T/corpus.txt" --data_root="$DIR/data" --dataset=add --vocab_size=261
for s in $SEEDS; do bg chain "$s"; done
join
runs=()
for name in base sft rm ppo ppo-judge dpo grpo rloo rm-onpol ppo-onpol; do
    for s in $SEEDS; do runs+=("$DIR/$name-s$s"); done
done
"$PYTHON" plot.py --table "${runs[@]}"
