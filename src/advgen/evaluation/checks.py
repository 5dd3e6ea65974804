"""The self-checks of an evaluation (Carlini et al. 2019, "On Evaluating Adversarial Robustness"):
accuracy must not rise with eps, PGD must be at least as strong as FGSM, a very large eps must drive
accuracy towards 0; and PGD must not sit far above AutoAttack (gap_check). Failed checks are logged as
warnings and kept in the result, each {"name", "passed", "detail"}."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

LARGE_EPS = {"l2": 10.0, "linf": 0.5}   # radii at which any undefended-looking image can be changed
LARGE_EPS_IMAGES = 200                  # the large-eps check attacks the first this many images



def sanity_checks(norm: str, epsilons, accs, fgsm_accs, large_eps_acc, n: int) -> list[dict]:
    """The checks of Carlini et al. 2019 on one curve; each {"name", "passed", "detail"}."""
    tol = 1.0 / n + 0.005
    checks = []
    order = sorted(range(len(epsilons)), key=lambda j: epsilons[j])
    rises = [(epsilons[a], epsilons[b]) for a, b in zip(order, order[1:]) if accs[b] > accs[a] + tol]
    checks.append({"name": "accuracy non-increasing in eps", "passed": not rises,
                   "detail": "ok" if not rises else f"accuracy rises between eps {rises}"})
    if fgsm_accs is not None:
        weaker = [epsilons[j] for j in range(len(epsilons)) if accs[j] > fgsm_accs[j] + tol]
        checks.append({"name": "attack at least as strong as FGSM", "passed": not weaker,
                       "detail": "ok" if not weaker else f"FGSM beats the attack at eps {weaker}: "
                                                         "too few steps or masked gradients"})
    if large_eps_acc is not None:
        checks.append({"name": f"large eps ({LARGE_EPS[norm]}) drives accuracy to ~0",
                       "passed": large_eps_acc <= 0.05,
                       "detail": f"accuracy {large_eps_acc:.3f} at eps {LARGE_EPS[norm]}" +
                                 ("" if large_eps_acc <= 0.05 else ": gradients may be masked")})
    for c in checks:
        if not c["passed"]:
            log.warning("sanity check failed: %s (%s)", c["name"], c["detail"])
    return checks


GAP_LIMIT = 0.03  # PGD minus AutoAttack accuracy above which PGD alone is not trusted
GAP_CHECK = f"PGD within {100 * GAP_LIMIT:.0f} points of AutoAttack"   # the name gap_check's result carries


def gap_check(pgd: dict, autoattack: dict, n: int) -> dict:
    """PGD must not exceed AutoAttack by more than GAP_LIMIT at any eps where both ran ({eps: accuracy},
    accuracies multiples of 1/n, hence the half-sample slack). A larger gap means PGD misses what
    AutoAttack finds, so PGD's accuracies at radii without AutoAttack overstate robustness."""
    stronger = [e for e in autoattack if e in pgd and pgd[e] - autoattack[e] > GAP_LIMIT + 0.5 / n]
    check = {"name": GAP_CHECK, "passed": not stronger,
             "detail": "ok" if not stronger else f"PGD overstates robustness at eps {', '.join(map(str, stronger))}"}
    if stronger:
        log.warning("sanity check failed: %s (%s)", check["name"], check["detail"])
    return check
