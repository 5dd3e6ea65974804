"""Step 1: the base model. ResNet-20, standard training, 10,000-image class-balanced CIFAR-10 subset,
15 epochs, SGD lr 0.1 cosine, batch 128, one CPU thread. Writes exp/base (weights; not in git) and
experiments/results/base.json."""
import json, os, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
torch.set_num_threads(1)
torch.manual_seed(0)
from advgen.config import TrainConfig
from advgen.data import load_cifar, balanced_subset
from advgen.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tr, te = load_cifar("cifar10", "/work/shared/data")
train_set = balanced_subset(tr, 10000, 0)
cfg = TrainConfig(method="standard", epochs=int(sys.argv[1]) if len(sys.argv) > 1 else 15, lr=0.1,
                  schedule="cosine", batch_size=128, seed=0)
t0 = time.time()
model, rec = train(cfg, train_set, te, out_dir=os.path.join(ROOT, "exp/base"), progress=False)
out = {"config": cfg.to_dict(), "epochs": rec["epochs"], "wall_s": time.time() - t0,
       "test_acc_10000": rec["epochs"][-1]["test_acc"]}
json.dump(out, open(os.path.join(ROOT, "experiments/results/base.json"), "w"), indent=1)
print(json.dumps(out["epochs"][-1]))
