"""The base model's reference numbers: PGD-L2 (as run_variant.py) on the first 500 test images,
and the generator-free direction check (random vs FGSM direction at L2 0.5)."""
import json, os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
torch.set_num_threads(1)
from advgen.checkpoint import load_model
from advgen.data import load_cifar
from advgen.evaluate import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_, te = load_cifar("cifar10", "/work/shared/data")
model = load_model(os.path.join(ROOT, "exp/base"), model_name="resnet20", num_classes=10)
model.eval()
ev = evaluate(model, te.float_images()[:500], te.labels[:500], attack="pgd-l2", epsilons=[0, 0.25, 0.5],
              steps=20, rel_step=0.1)
path = os.path.join(ROOT, "experiments/results/base.json")
d = json.load(open(path))
d["eval_pgd_l2"] = ev
json.dump(d, open(path, "w"), indent=1)
print(json.dumps({r["eps"]: r["accuracy"] for r in ev["results"]}), d["test_acc_10000"])
