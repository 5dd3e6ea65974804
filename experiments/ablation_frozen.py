"""Ablation: can a gradient-free generator find L2-0.5 adversarial directions at all?

The generator bank (l2 bound s=0.5, split assignment, N=32) is trained by Adam to MAXIMISE the
cross-entropy of the FROZEN base classifier (eval mode; no classifier updates, so the generator
faces a fixed target and has every step to itself). Every 30 steps the bank is scored on the first
500 test images (held out from the training subset): accuracy and CE under its perturbation, vs a
random direction and the FGSM direction at the same L2 norm 0.5. If even here the generator's
perturbation stays as harmless as random noise, the bottleneck is what a small x -> ψ(x) CNN can
represent, not the min-max game.
Writes experiments/results/ablation_frozen.json.
"""
import json, os, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
import torch.nn.functional as F
torch.set_num_threads(1)
from advgen.attacks.pgd import eval_mode
from advgen.checkpoint import load_model
from advgen.data import Batches, balanced_subset, load_cifar
from advgen.models.generators import GeneratorBank, BankConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = int(os.environ.get("ABL_STEPS", "120"))
tr, te = load_cifar("cifar10", "/work/shared/data")
train_set = balanced_subset(tr, 10000, 0)
xt, yt = te.float_images()[:500], te.labels[:500]
model = load_model(os.path.join(ROOT, "exp/base"), model_name="resnet20", num_classes=10)
unit = lambda t: t / t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


@torch.no_grad()
def score(bank):
    with eval_mode(model):
        adv, _ = bank(xt)
        lo = model(adv)
    return {"acc": (lo.argmax(1) == yt).float().mean().item(), "ce": F.cross_entropy(lo, yt).item()}


with eval_mode(model):
    xg = xt.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), yt, reduction="sum"), xg)
    with torch.no_grad():
        ref = {}
        for k, v in {"clean": xt, "random_0.5": (xt + 0.5 * unit(torch.randn(xt.shape, generator=torch.Generator().manual_seed(1)))).clamp(0, 1),
                     "fgsm_0.5": (xt + 0.5 * unit(g)).clamp(0, 1)}.items():
            lo = model(v)
            ref[k] = {"acc": (lo.argmax(1) == yt).float().mean().item(), "ce": F.cross_entropy(lo, yt).item()}
print(ref, flush=True)
results = {"reference": ref, "steps": STEPS, "runs": []}
for name, bank_kw, lr in (("d3w16_adam1e-3", dict(depth=3, width=16), 1e-3),
                          ("d3w16_adam1e-2", dict(depth=3, width=16), 1e-2),
                          ("d6w64_adam1e-3", dict(depth=6, width=64), 1e-3)):
    torch.manual_seed(0)
    bank = GeneratorBank(BankConfig(bound="l2", size=0.5, **bank_kw))
    opt = torch.optim.Adam(bank.parameters(), lr=lr, maximize=True)
    batches = Batches(train_set, 128, seed=0, train=True)
    curve, step, t0 = [{"step": 0, **score(bank)}], 0, time.process_time()
    for epoch in range(1, 100):
        for x, y in batches.epoch(epoch):
            with eval_mode(model):
                adv, _ = bank(x)
                loss = F.cross_entropy(model(adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 30 == 0:
                curve.append({"step": step, "train_ce": loss.item(), **score(bank)})
            if step >= STEPS:
                break
        if step >= STEPS:
            break
    r = {"name": name, "bank": bank_kw, "lr": lr, "cpu_s": time.process_time() - t0, "curve": curve}
    results["runs"].append(r)
    print(json.dumps(r), flush=True)
json.dump(results, open(os.path.join(ROOT, "experiments/results/ablation_frozen.json"), "w"), indent=1)
