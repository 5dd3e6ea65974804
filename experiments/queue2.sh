#!/bin/bash
# Batch 2 (after queue1.sh): AutoAttack on the main contenders, the frozen-classifier ablation, then
# the remaining gradient-free variants.
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src ADAM_LR=1e-3
/work/main/.venv/bin/python experiments/run_autoattack.py gen_l2_adam_gradinput pgd10_T fgsm_rs gen_l2_adam_gradinput_skip
/work/main/.venv/bin/python experiments/run_variant.py fgsm_nors_l2
/work/main/.venv/bin/python experiments/ablation_frozen.py
/work/main/.venv/bin/python experiments/run_variant.py gen_l2_adam_random_reinit gen_l2_adam_steps2 gen_l2_adam_clean0.5
/work/main/.venv/bin/python experiments/run_variant.py fgsm_full_l2
