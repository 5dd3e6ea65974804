"""Step 2-4: fine-tune one variant from exp/base for a fixed time budget (CPU seconds of the single training thread, see below), then measure it.

usage: run_variant.py NAME [NAME ...]   (names: see VARIANTS; env BUDGET_S overrides the budget)

Every run: seed 0, the same 10,000-image balanced train subset as the base, classifier SGD lr 0.01
constant (momentum 0.9, wd 5e-4), batch 128, stopped after TrainConfig.time_budget seconds of
training steps (T = 480 s for PGD-10, T/5 = 96 s for everything else), one CPU thread.
Measured on the first 500 test images: advgen.evaluate.evaluate(pgd-l2, eps 0/0.25/0.5, 20 steps,
rel_step 0.1, with its Carlini sanity checks). Generator runs also record, every 10 steps, the
perturbation norms, the share of pixels held by the box clamp (gradient zero there) and the clean vs
adversarial loss, and after training an equal-norm comparison of the generator's direction with
random noise and the FGSM direction against the final classifier.
Writes experiments/results/NAME.json; weights go to exp/NAME (not in git).
"""
import json, os, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
import torch.nn.functional as F
torch.set_num_threads(1)

from advgen.attacks import FGSM
from advgen.attacks.pgd import eval_mode
from advgen.config import AttackConfig, TrainConfig
from advgen.training.generator import GeneratorOptions
from advgen.data import balanced_subset, first_n, load_cifar
from advgen.evaluate import evaluate
from advgen.models.generators import BankConfig
from advgen.training import registered, train
from advgen.training.generator import GeneratorMethod
from advgen.training.minmax import FGSMRS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 480.0
ADAM_LR = float(os.environ.get("ADAM_LR", "1e-3"))


def gen(bank, budget=T / 5, **kw):
    return dict(method="generator", options=GeneratorOptions(bank=BankConfig(**bank), **kw), time_budget=budget)


def mm(k, budget):
    return dict(method="minmax", options=AttackConfig(norm="l2", eps=0.5, steps=k, step_size=2.5 * 0.5 / k),
                time_budget=budget)


L2 = dict(bound="l2", size=0.5)
VARIANTS = {
    "gen_paper_box0.2_sgd": gen(dict(bound="box", size=0.2), optimizer="sgd", lr=0.005),
    "gen_l2_sgd": gen(L2, optimizer="sgd", lr=0.005),
    "gen_l2_adam1e-3": gen(L2, optimizer="adam", lr=1e-3),
    "gen_l2_adam1e-2": gen(L2, optimizer="adam", lr=1e-2),
    "gen_l2_adam_random_reinit": gen(dict(L2, assign="random"), optimizer="adam", lr=ADAM_LR, reinit_every=20),
    "gen_l2_adam_steps2": gen(L2, optimizer="adam", lr=ADAM_LR, steps=2),
    "gen_l2_adam_clean0.5": gen(L2, optimizer="adam", lr=ADAM_LR, clean_fraction=0.5),
    "gen_l2_adam_gradinput": gen(dict(L2, grad_input=True), optimizer="adam", lr=ADAM_LR),
    "gen_l2_adam_gradinput_skip": gen(dict(L2, grad_input=True, grad_skip=True), optimizer="adam", lr=ADAM_LR),
    "fgsm_rs": dict(method="fgsm", options=AttackConfig(norm="l2", eps=0.5), time_budget=T / 5),
    # control for grad_input(+skip): FGSM along the L2-normalised gradient, step = eps, NO random start
    # (what the grad_skip bank is at initialisation); method "fgsm" with the attack swapped, see main()
    "fgsm_nors_l2": dict(method="fgsm", options=AttackConfig(norm="l2", eps=0.5), time_budget=T / 5, _no_rs=True),
    # the same, but EVERY sample gets the full step (the library's PGD/FGSM keep the first iterate that
    # fools the model, so with no random start a sample misclassified when clean is trained clean):
    # exactly the grad_skip bank's perturbation at initialisation, with no generator
    "fgsm_full_l2": dict(method="fgsm", options=AttackConfig(norm="l2", eps=0.5), time_budget=T / 5, _full=True),
    "pgd2_T5": mm(2, T / 5),
    "pgd5_T5": mm(5, T / 5),
    "pgd10_T5": mm(10, T / 5),
    "pgd10_T": mm(10, T),
}


class Probe(GeneratorMethod):
    """The generator method plus cheap diagnostics every 10 steps (no_grad; one eval-mode forward)."""
    last = None

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.trace = []
        self.w0 = torch.cat([p.detach().flatten() for p in self.bank.parameters()]).clone()
        Probe.last = self

    def loss(self, x, y):
        out = super().loss(x, y)
        if self.step_count % 10 == 0:
            with torch.no_grad():
                x_adv, _, _ = self._generate(x, y) if not self.options.bank.grad_input else (None, None, None)
            if x_adv is None:
                with torch.enable_grad():
                    x_adv, _, _ = self._generate(x, y)
            with torch.no_grad(), eval_mode(self.model):
                x_adv = x_adv[: x.shape[0]]
                d = x_adv - x
                s = self.bank.cfg.size
                clean = F.cross_entropy(self.model(x), y).item()
                adv = F.cross_entropy(self.model(x_adv), y).item()
            self.trace.append({"step": self.step_count, "train_loss": out[0].item(), "clean_loss_eval": clean,
                               "adv_loss_eval": adv, "delta_l2": d.flatten(1).norm(dim=1).mean().item(),
                               "delta_linf": d.abs().amax().item(),
                               "box_clamp_frac": (d.abs() >= s - 1e-6).float().mean().item(),
                               "range_clip_frac": ((x_adv <= 0) | (x_adv >= 1)).float().mean().item(),
                               # how far the generators moved from their init (relative L2 of all weights;
                               # a re-draw also moves them)
                               "gen_weight_rel_change": (torch.cat([p.detach().flatten() for p in self.bank.parameters()])
                                                         - self.w0).norm().item() / self.w0.norm().item()})
        return out


class FGSMFull(FGSMRS):
    """x + eps · ∇x/‖∇x‖₂ for every sample (no early stop, no random start), clipped to [0, 1]."""

    def __init__(self, model, options, setup):
        super().__init__(model, options, setup)
        self.eps = options.radius

    def loss(self, x, y):
        xg = x.detach().requires_grad_(True)
        with eval_mode(self.model):
            (g,) = torch.autograd.grad(F.cross_entropy(self.model(xg), y, reduction="sum"), xg)
        g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        logits = self.model((x + self.eps * g).clamp(0, 1))
        return F.cross_entropy(logits, y), logits, y


class FGSMNoRS(FGSMRS):
    """FGSM without a random start: one step of eps along ∇x/‖∇x‖₂ (L2)."""

    def make_attack(self, model, a, seed):
        return FGSM(model, norm=a.norm, eps=a.radius, random_start=False, seed=seed)

def direction_ablation(model, method, x, y):
    """Against the final classifier: accuracy/CE of the generator's perturbation as trained, and of its
    direction, a random direction and the FGSM direction, each scaled to L2 norm 0.5."""
    model.eval()
    res = {}
    with torch.enable_grad():
        x_adv, _, _ = method._generate(x, y)
    x_adv = x_adv[: x.shape[0]].detach()
    d = x_adv - x
    xg = x.clone().requires_grad_(True)
    with eval_mode(model):
        (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    unit = lambda t: t / t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    gen_rand = torch.Generator().manual_seed(1)
    cands = {"clean": x, "generator_as_trained": x_adv,
             "generator_dir_l2_0.5": (x + 0.5 * unit(d)).clamp(0, 1),
             "random_dir_l2_0.5": (x + 0.5 * unit(torch.randn(x.shape, generator=gen_rand))).clamp(0, 1),
             "fgsm_dir_l2_0.5": (x + 0.5 * unit(g)).clamp(0, 1)}
    with torch.no_grad():
        for k, v in cands.items():
            lo = model(v)
            res[k] = {"acc": (lo.argmax(1) == y).float().mean().item(), "ce": F.cross_entropy(lo, y).item()}
    res["cos_generator_vs_gradient"] = F.cosine_similarity(d.flatten(1), g.flatten(1), dim=1).mean().item()
    res["generator_delta_l2_mean"] = d.flatten(1).norm(dim=1).mean().item()
    return res


def main():
    tr, te = load_cifar("cifar10", "/work/shared/data")
    train_set = balanced_subset(tr, 10000, 0)
    watch_test = first_n(te, 200)  # the per-epoch test_acc only (informational)
    n_eval = int(os.environ.get("N_EVAL", "500"))  # N_EVAL=20 for a smoke test
    x500, y500 = te.float_images()[:n_eval], te.labels[:n_eval]
    for name in sys.argv[1:]:
        torch.manual_seed(0)
        v = dict(VARIANTS[name])
        fgsm = FGSMNoRS if v.pop("_no_rs", False) else FGSMFull if v.pop("_full", False) else FGSMRS
        if "BUDGET_S" in os.environ:
            v["time_budget"] = float(os.environ["BUDGET_S"])
        # the budget clock: this machine's 2 cores are shared (load 3-5 during these runs), so the budget
        # counts this process's CPU seconds (one thread: equal to wall-clock on a dedicated core)
        cfg = TrainConfig(init=os.path.join(ROOT, "exp/base"), lr=0.01, schedule="constant", epochs=50,
                          batch_size=128, seed=0, budget_clock="process", **v)
        Probe.last = None
        t0, c0 = time.time(), time.process_time()
        with registered("generator", Probe), registered("fgsm", fgsm):
            model, rec = train(cfg, train_set, watch_test, out_dir=os.path.join(ROOT, "exp", name), progress=False)
        wall, cpu = time.time() - t0, time.process_time() - c0
        trained = sum(e["seconds"] for e in rec["epochs"])
        steps = sum(e["steps"] for e in rec["epochs"])
        ev = evaluate(model, x500, y500, attack="pgd-l2", epsilons=[0, 0.25, 0.5], steps=20, rel_step=0.1)
        out = {"name": name, "config": cfg.to_dict(), "trained_s": trained, "steps": steps,
               "s_per_step": trained / steps, "wall_s_train_incl_epoch_evals": wall,
               "cpu_s_train_incl_epoch_evals": cpu,
               "epochs": rec["epochs"], "eval_pgd_l2": ev,
               "clean": ev["results"][0]["accuracy"], "pgd_0.25": ev["results"][1]["accuracy"],
               "pgd_0.5": ev["results"][2]["accuracy"]}
        if Probe.last is not None:
            out["trace"] = Probe.last.trace
            torch.manual_seed(0)
            out["ablation"] = direction_ablation(model, Probe.last, x500, y500)
        json.dump(out, open(os.path.join(ROOT, "experiments/results", name + ".json"), "w"), indent=1)
        print(f"{name}: {trained:.0f}s {steps} steps clean {out['clean']:.3f} pgd.25 {out['pgd_0.25']:.3f} "
              f"pgd.5 {out['pgd_0.5']:.3f} checks {[c['passed'] for c in ev['checks']]} "
              f"{json.dumps(out.get('ablation', {}))}", flush=True)


if __name__ == "__main__":
    main()
