"""`advgen compare`: recipes fine-tuned from one base at several budgets and seeds, as curves: plan.py (what
runs), run.py (running it), report.py (what is written), workers.py (worker processes)."""
