#!/usr/bin/env bash
# The offline demo, end to end on a CPU: build the demo world -> measure the policy -> sample rollouts ->
# pretrain a LenVM -> evaluate its length predictions -> PPO with the LenVM as a frozen length critic -> evaluate
# the policy before and after. Every step reuses what a previous run already built (the world is cached by
# fingerprint, sampling resumes chunk by chunk, a trained LenVM and a finished PPO run are kept, an interrupted PPO
# run resumes from its checkpoint), so a second run only re-evaluates. Delete outputs/demo to start over.
#
#   bash recipes/demo.sh            (or: make demo, which also creates the virtualenv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=outputs/demo
step() { printf '\n=== %s [%s] ===\n' "$*" "$(date +%T)"; }

step "1/7 demo world (problems + the SFT policy shipped with lenvm-rl; add --rebuild to train it, ~7 min): cached"
$PY -m lenvm_rl.demo build --output_dir "$OUT/world"
$PY -m lenvm_rl.demo measure --world_dir "$OUT/world" --output_dir "$OUT"

step "2/7 rollouts: 16 completions for each of 256 train and 64 held-out prompts (resumable)"
$PY recipes/sample_rollouts.py --config recipes/configs/rollouts_demo.yaml
$PY recipes/sample_rollouts.py --config recipes/configs/rollouts_demo_eval.yaml

step "3/7 LenVM pretraining (initialised from the policy)"
if [ -f "$OUT/lenvm/value_head.safetensors" ]; then
  echo "reusing $OUT/lenvm (delete it to retrain)"
else
  $PY recipes/train_lenvm.py --config recipes/configs/lenvm_demo.yaml
fi

step "4/7 length prediction on held-out prompts"
$PY recipes/eval_length_prediction.py --config recipes/configs/eval_length_demo.yaml

step "5/7 PPO with the LenVM as a frozen length critic (resumes from its last checkpoint)"
if [ -f "$OUT/ppo/model.safetensors" ] && grep -q '"final": {' "$OUT/ppo/results.json" 2>/dev/null; then
  echo "reusing $OUT/ppo (delete it to retrain)"
else
  $PY recipes/ppo_gsm8k.py --config recipes/configs/demo.yaml
fi

step "6/7 before / after on the same held-out problems, with hard token-budget curves"
$PY recipes/eval_gsm8k.py --config recipes/configs/eval_gsm8k_demo.yaml

step "7/7 done"
echo "results: $OUT/results.json (start / ppo_lenvm), $OUT/eval_gsm8k.png (accuracy / length frontier),"
echo "         $OUT/demo_policy_stats.json, $OUT/eval_length_prediction.json (+ PNGs)"
