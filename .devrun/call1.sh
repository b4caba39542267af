#!/usr/bin/env bash
# Call 1: corpus; GPU0: 4a (qwen3-0.6b trajectory + fidelity); GPU1: 4b model pick, then seed 1.
source .devrun/common.sh
nvidia-smi -L; date
if [ ! -f data/cache/experiment/manifest.json ]; then
  python3 tools/build_experiment_corpus.py --out-dir data/cache/experiment $NATURAL_ARGS -j 16 > logs/corpus.log 2>&1 || { tail -30 logs/corpus.log; pack call1; exit 1; }
fi
tail -25 logs/corpus.log; echo "corpus done at $(( $(date +%s) - T0 )) s"
(CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 20 )) examples/evidence/fidelity_trajectory.sh qwen3-0.6b > logs/trajectory.log 2>&1; echo "4a rc=$? at $(( $(date +%s) - T0 )) s") &
(
  GPUS=1 PER_GPU=3 STUDY_DIR=runs/study examples/evidence/recipe_comparison.sh pick $PICK_MODELS > logs/pick.log 2>&1
  M=$(tail -1 logs/pick.log); echo "picked $M at $(( $(date +%s) - T0 )) s"
  GPUS=1 PER_GPU=7 SEEDS=1 DEADLINE_MIN=$(python3 -c "print(max(0.5, ($(left) - 110) / 60))") STUDY_DIR=runs/study \
    examples/evidence/recipe_comparison.sh run "$M" > logs/study-call1.log 2>&1
  echo "study rc=$? at $(( $(date +%s) - T0 )) s"
) &
while sleep 60; do echo "[$(( $(date +%s) - T0 )) s] $(tail -c 300 logs/trajectory.log | tr '\n' ' ' | tail -c 200)"; grep "study:" logs/study-call1.log logs/pick.log 2>/dev/null | tail -2; jobs -r | grep -q . || break; done
wait
pack call1
