"""Collect experiments/results/*.json into experiments/results/summary.md (the table of every run)."""
import glob, json, os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = os.path.join(ROOT, "experiments/results")


def settings(c):
    if c["method"] == "generator":
        g, b = c["generator"], c["generator"]["bank"]
        s = f"{b['bound']} s={b['size']}, {g['optimizer']} {g['lr']:g}"
        for k, v in (("assign", b["assign"]), ):
            if v != "split":
                s += f", assign {v}"
        if g["reinit_every"]:
            s += f", reinit/{g['reinit_every']}"
        if g["steps"] > 1:
            s += f", gen steps {g['steps']}"
        if g["clean_fraction"]:
            s += f", clean {g['clean_fraction']:g}"
        if b["grad_input"]:
            s += ", grad_input"
        if b.get("grad_skip"):
            s += "+skip"
        return s
    a = c["attack"]
    if c["method"] == "fgsm":
        return f"FGSM-RS {a['norm']} eps {a['eps']}"
    return f"PGD-{a['steps']} {a['norm']} eps {a['eps']} step {a['step_size']:.3g}"


rows = []
for p in sorted(glob.glob(os.path.join(R, "*.json"))):
    n = os.path.basename(p)[:-5]
    if n in ("base",) or n.startswith(("aa_", "ablation")):
        continue
    d = json.load(open(p))
    aa = os.path.join(R, f"aa_{n}.json")
    aa = json.load(open(aa)) if os.path.exists(aa) else None
    ab = d.get("ablation")
    label = {"fgsm_nors_l2": "FGSM l2 eps 0.5, step eps, no random start (library: first fooling iterate)",
             "fgsm_full_l2": "x + 0.5·∇/‖∇‖₂ on every sample (no RS, no early stop)"}.get(n) or settings(d["config"])
    rows.append((n, label, d["trained_s"], d["steps"], d["clean"], d["pgd_0.25"], d["pgd_0.5"],
                 aa, ab, d["eval_pgd_l2"]["checks"]))

lines = ["| run | settings | budget s (CPU) | trained s | steps | clean | PGD-L2 0.25 | PGD-L2 0.5 | AA (n, PGD on same n) | checks |",
         "|---|---|---|---|---|---|---|---|---|---|"]
b = json.load(open(os.path.join(R, "base.json")))
if "eval_pgd_l2" in b:
    r = [x["accuracy"] for x in b["eval_pgd_l2"]["results"]]
    lines.append(f"| base | standard, 15 epochs, lr 0.1 cosine (clean on all 10,000 test: {100*b['test_acc_10000']:.1f}) | - | "
                 f"{sum(e['seconds'] for e in b['epochs']):.0f} (wall) | {15 * 78} | {100*r[0]:.1f} | {100*r[1]:.1f} | {100*r[2]:.1f} | | |")
for n, s, t, st, c, p1, p2, aa, ab, ch in rows:
    b = json.load(open(os.path.join(R, n + ".json")))["config"]["time_budget"]
    aas = "" if aa is None else (f"{100*aa['autoattack_l2_0.5']:.1f} (n={aa['n']}, PGD {100*aa['pgd20_l2_0.5']:.1f})"
                                 + (" MASKING?" if round(100 * (aa["pgd20_l2_0.5"] - aa["autoattack_l2_0.5"]), 2) > 3 else ""))
    chs = "ok" if all(x["passed"] for x in ch) else "; ".join(x["name"] for x in ch if not x["passed"])
    lines.append(f"| {n} | {s} | {b:.0f} | {t:.0f} | {st} | {100*c:.1f} | {100*p1:.1f} | {100*p2:.1f} | {aas} | {chs} |")

lines += ["", "Generator runs, against the final classifier on the 500 images: accuracy under the generator's "
          "perturbation as trained, and of equal-L2-norm (0.5) perturbations along the generator's direction, "
          "a random direction and the FGSM direction; cosine(generator δ, input gradient).", "",
          "| run | clean acc | gen (as trained) acc | mean ‖δ‖₂ | gen dir @0.5 acc / CE | random @0.5 acc / CE | FGSM dir @0.5 acc / CE | cos(δ, ∇) |",
          "|---|---|---|---|---|---|---|---|"]
for n, s, t, st, c, p1, p2, aa, ab, ch in rows:
    if not ab:
        continue
    f = lambda k: f"{100*ab[k]['acc']:.1f} / {ab[k]['ce']:.2f}"
    lines.append(f"| {n} | {100*ab['clean']['acc']:.1f} | {100*ab['generator_as_trained']['acc']:.1f} | "
                 f"{ab['generator_delta_l2_mean']:.2f} | {f('generator_dir_l2_0.5')} | {f('random_dir_l2_0.5')} | "
                 f"{f('fgsm_dir_l2_0.5')} | {ab['cos_generator_vs_gradient']:.3f} |")
open(os.path.join(R, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
