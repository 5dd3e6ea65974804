"""Step 3: AutoAttack (L2, eps 0.5) on the first N_AA (default 300) test images for saved runs.

usage: run_autoattack.py NAME [NAME ...]   (models from exp/NAME)
pyautoattack, version "custom", attacks APGD-CE then APGD-T, as advgen.attacks.AutoAttack builds it,
but with the cost cut to fit one CPU core: APGD-CE 1 restart (as in the standard version; "custom"
would use 5), APGD-T on N_TARGETS (default 3) target classes instead of 9; 100 iterations each.
PGD-L2 (20 steps, rel_step 0.1, as in run_variant.py) is re-measured on the same images so the
two are comparable; a PGD - AA gap > 3 points is flagged as possible gradient masking.
Writes experiments/results/aa_NAME.json.
"""
import json, os, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
torch.set_num_threads(1)
from pyautoattack import AutoAttack as _AA

from advgen.attacks.pgd import eval_mode
from advgen.checkpoint import load_model
from advgen.data import load_cifar
from advgen.evaluate import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = int(os.environ.get("N_AA", "300"))
TARGETS = int(os.environ.get("N_TARGETS", "3"))
_, te = load_cifar("cifar10", "/work/shared/data")
x, y = te.float_images()[:N], te.labels[:N]
for name in sys.argv[1:]:
    model = load_model(os.path.join(ROOT, "exp", name), model_name="resnet20", num_classes=10, device="cpu")
    model.eval()
    pgd = evaluate(model, x, y, attack="pgd-l2", epsilons=[0, 0.5], steps=20, rel_step=0.1, checks=False)
    t0 = time.time()
    with eval_mode(model):
        aa = _AA(model, norm="L2", eps=0.5, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0, device="cpu")
        aa.apgd.n_restarts = 1
        aa.apgd_targeted.n_target_classes = TARGETS
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=250)
        with torch.no_grad():
            acc_aa = (model(x_adv).argmax(1) == y).float().mean().item()
    out = {"name": name, "n": N, "aa": {"attacks": ["apgd-ce", "apgd-t"], "apgd_ce_restarts": 1,
           "apgd_t_targets": TARGETS, "n_iter": 100, "eps": 0.5, "norm": "L2"},
           "clean": pgd["results"][0]["accuracy"], "pgd20_l2_0.5": pgd["results"][1]["accuracy"],
           "autoattack_l2_0.5": acc_aa, "aa_seconds": time.time() - t0}
    out["pgd_minus_aa_pts"] = round(100 * (out["pgd20_l2_0.5"] - acc_aa), 2)
    out["masking_flag"] = out["pgd_minus_aa_pts"] > 3
    json.dump(out, open(os.path.join(ROOT, "experiments/results", f"aa_{name}.json"), "w"), indent=1)
    print(json.dumps(out), flush=True)
