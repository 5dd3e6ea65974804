#!/bin/bash
# Batch 1 (run after train_base.py): the key runs in priority order, one process, one thread.
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src ADAM_LR=1e-3
/work/main/.venv/bin/python experiments/run_variant.py gen_paper_box0.2_sgd gen_l2_adam1e-3 \
  gen_l2_adam_gradinput fgsm_rs pgd10_T gen_l2_sgd gen_l2_adam1e-2 gen_l2_adam_gradinput_skip pgd2_T5 pgd5_T5
OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src /work/main/.venv/bin/python experiments/eval_base.py
