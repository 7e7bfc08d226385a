#!/usr/bin/env bash
# Writes experiments/results/lora_vs_dora_predictions.md: experiments/compare_predictions.py on the LoRA/DoRA run
# pairs whose accuracies came out equal (and one Gemma pair of budgets). Needs the runs of method_comparison.py,
# learning_pattern.py (200-step setting) and gemma_commonsense.py (both settings) in runs/experiments/.
# Runtime on 2 shared CPU cores: about 15 minutes (the Gemma pairs score 350 questions with two models each).
set -euo pipefail
cd "$(dirname "$0")/.."
C=".venv/bin/python experiments/compare_predictions.py"
M=runs/experiments/method_comparison
G=runs/experiments/gemma_commonsense
OUT=experiments/results/lora_vs_dora_predictions.md
{
echo "# LoRA vs DoRA runs with equal accuracies: what differs"
echo
echo "\`experiments/lora_vs_dora_predictions.sh\`: \`python experiments/compare_predictions.py RUN_A RUN_B\` (A, B as named), $(date -u +%Y-%m-%d), the project's 2-core CPU VM."
echo "Scores: logits (MiniLM), the log-likelihood of each answer choice (Gemma)."
for s in 0 1 2; do
  echo; echo "## bbc, experiment 1, seed $s: A = \`$M/lora-bbc-lr0.001-s$s\`, B = \`$M/dora-bbc-lr0.001-s$s\`"; echo
  $C $M/lora-bbc-lr0.001-s$s $M/dora-bbc-lr0.001-s$s 2>/dev/null | sed 's/^/- /'
done
L=runs/experiments/learning_pattern
echo; echo "## tweets, 200 steps, lr 1e-3, seed 0: A = \`$L/lora-lr0.001-200steps-s0\`, B = \`$L/dora-lr0.001-200steps-s0\`"; echo
$C $L/lora-lr0.001-200steps-s0 $L/dora-lr0.001-200steps-s0 2>/dev/null | sed 's/^/- /'
for r in 16 32; do
  echo; echo "## Gemma-3-270M commonsense, experiment 6 (100 steps, lr 3e-4), r $r: A = \`$G/lora_r$r-s0\`, B = \`$G/dora_r$r-s0\`"; echo
  $C $G/lora_r$r-s0 $G/dora_r$r-s0 2>/dev/null | sed 's/^/- /'
done
echo; echo "## Gemma-3-270M LoRA r16: A = 100 steps at lr 3e-4 (\`$G/lora_r16-s0\`), B = 200 steps at lr 1e-3 (\`runs/experiments/gemma_commonsense_200steps_lr1e-3/lora_r16-s0\`)"; echo
$C $G/lora_r16-s0 runs/experiments/gemma_commonsense_200steps_lr1e-3/lora_r16-s0 2>/dev/null | sed 's/^/- /'
} > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
