"""Recipes: one name per way of training a model, the only names used by `advgen train --recipe`, compare,
the benchmark, the zoo's cards and the docs.

A recipe is a training method with its options, learning rate, schedule and epochs, where it starts
(`init`: the shipped 40-epoch base for the fine-tuning recipes, which is how the zoo's models were made;
None: from scratch) and any other TrainConfig field it sets (`settings`: the speedrun's batch size). `recipe_config(name, **changes)` is its TrainConfig; a command-line flag or a
keyword changes one setting and leaves the rest as the recipe has them. The names of advgen 0.1 (gen_sdi,
pgd10, minmax_paper, ...) are accepted as aliases, with a deprecation line.

    L2 at 0.5 and Linf at 8/255 are the norms' standard threat models (RobustBench); `-l2` / `-linf` say
    which one a recipe trains against. The paper's recipes (gen-paper, minmax-paper) keep its L2 0.05.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

from .attacks import STANDARD_EPS
from .config import from_dict
from .errors import UserError
from .training import METHODS, TrainConfig

log = logging.getLogger(__name__)

BASE = "zoo:resnet20-base"   # the shipped ResNet-20, 40 epochs of standard training on all 50,000 images


@dataclass(frozen=True)
class Recipe:
    """A named training: method and options (a dict of the method's options fields), optimizer schedule,
    epochs, the model it starts from, what it is, the names it had before, and `settings`: further
    TrainConfig fields it fixes (those it leaves out keep TrainConfig's defaults)."""

    name: str
    method: str
    summary: str
    options: dict = field(default_factory=dict)
    lr: float = 0.01
    epochs: int = 8
    schedule: str = "cosine"
    init: str | None = BASE
    aliases: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)

    def options_object(self):
        """The method's typed options with this recipe's values."""
        return from_dict(METHODS[self.method].options, copy.deepcopy(self.options))


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a recipe (extensions too: a plugin module registers its method and its recipes)."""
    taken = {n for r in RECIPES.values() for n in (r.name, *r.aliases)}
    for name in (recipe.name, *recipe.aliases):
        if name in taken:
            raise ValueError(f"recipe name {name!r} is registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


def resolve_recipe(name: str) -> Recipe:
    """The recipe called `name`, or whose old name it is (with a deprecation line); UserError otherwise."""
    if name in RECIPES:
        return RECIPES[name]
    for r in RECIPES.values():
        if name in r.aliases:
            log.warning("recipe name %r is deprecated: it is %r now", name, r.name)
            return r
    raise UserError(f"unknown recipe {name!r}; choose from {', '.join(sorted(RECIPES))}")


def recipe_config(name: str, **changes) -> TrainConfig:
    """The TrainConfig of recipe `name`, with `changes` (TrainConfig fields) applied on top."""
    r = resolve_recipe(name)
    values = dict(method=r.method, options=r.options_object(), lr=r.lr, epochs=r.epochs, schedule=r.schedule,
                  init=r.init, **r.settings)
    values.update(changes)
    return TrainConfig(**values)


def _threat(norm: str, **more) -> dict:
    return {"norm": norm, "eps": STANDARD_EPS[norm], **more}


# the generator bank advgen recommends: the input gradient as an input and its step as the starting point
# (grad skip), bounded in the norm's ball at its standard radius; Adam 1e-3 (docs/results.md, the 3-seed comparison)
def _gradient_bank(norm: str, **more) -> dict:
    return {"bank": {"n": 32, "bound": norm, "size": STANDARD_EPS[norm], "grad_input": True, "grad_skip": True},
            "optimizer": "adam", "lr": 1e-3, **more}


register_recipe(Recipe("standard", "standard", "standard training, no attack (the zoo's base: 40 epochs)",
                       lr=0.1, epochs=40, init=None, aliases=("base",)))
register_recipe(Recipe("gen-paper", "generator", "the paper's generators (Jung 2024): 32, box bound s = 0.2, SGD 0.005",
                       {"bank": {"n": 32, "bound": "box", "size": 0.2}, "optimizer": "sgd", "lr": 0.005},
                       lr=0.005, aliases=("gen_paper",)))
register_recipe(Recipe("minmax-paper", "minmax", "the paper's min-max: PGD-L2 eps 0.05, 40 steps of 0.005",
                       {"norm": "l2", "eps": 0.05, "steps": 40, "step_size": 0.005}, lr=0.005,
                       aliases=("minmax_paper", "minmax_pgd40")))

for _norm in ("l2", "linf"):
    _eps = STANDARD_EPS[_norm]
    _old = _norm == "l2"   # advgen 0.1's names were all L2
    register_recipe(Recipe(f"fgsm-rs-{_norm}", "fgsm", "FGSM with a random start, step 1.25 eps (Wong et al. 2020)",
                           _threat(_norm), aliases=("fgsm_rs",) if _old else ()))
    register_recipe(Recipe(f"nfgsm-{_norm}", "nfgsm", "N-FGSM: noise 2 eps, one step of eps, no projection "
                           "(de Jorge et al. 2022)", _threat(_norm), aliases=("nfgsm",) if _old else ()))
    register_recipe(Recipe(f"pgd10-{_norm}", "minmax", "min-max on PGD-10, step eps/4 (Madry et al. 2018)",
                           _threat(_norm, steps=10, step_size=_eps / 4),
                           aliases=("pgd10", "minmax_pgd10") if _old else ()))
    register_recipe(Recipe(f"free-{_norm}", "free", "Free-AT, 8 replays (Shafahi et al. 2019)", _threat(_norm),
                           aliases=("free",) if _old else ()))
    register_recipe(Recipe(f"trades-{_norm}", "trades", "TRADES, beta 6, PGD-10 (Zhang et al. 2019)",
                           _threat(_norm, steps=10), aliases=("trades",) if _old else ()))
    register_recipe(Recipe(f"gen-gradient-{_norm}", "generator", "generators fed the input gradient, grad skip "
                           "(advgen 0.1's recommendation)", _gradient_bank(_norm),
                           aliases=("gen_grad", "gen_gradient") if _old else ()))
    register_recipe(Recipe(f"gen-sdi-{_norm}", "generator", "the gradient generators' output + a gradient step "
                           "from it (FGSM-SDI style)", _gradient_bank(_norm, step_after=True),
                           aliases=("gen_sdi",) if _old else ()))
    # gen-sdi with N-FGSM's lever: the step from the bank's output is not projected back (up to 2 eps)
    register_recipe(Recipe(f"gen-nfgsm-{_norm}", "generator", "gen-sdi whose step is not projected back onto the "
                           "ball, as N-FGSM does not clip (up to 2 eps)", _gradient_bank(_norm, step_after=True,
                                                                                       step_project=False)))
    register_recipe(Recipe(f"gen-rec2-{_norm}", "generator", "2 recursive generator steps (Jang et al. 2019)",
                           _gradient_bank(_norm, recursions=2), aliases=("gen_rec2",) if _old else ()))
    register_recipe(Recipe(f"gen-mem-{_norm}", "generator", "generators fed x, the gradient and the sample's "
                           "previous perturbation, + a gradient step", _gradient_bank(_norm, memory=True, step_after=True),
                           aliases=("gen_mem",) if _old else ()))
    # gen-mem without the network: what the memory alone gives (FGSM-PGI-like); the control of gen-mem
    register_recipe(Recipe(f"mem-step-{_norm}", "generator", "the sample's previous perturbation + a gradient "
                           "step, no network (the control of gen-mem)",
                           {**_gradient_bank(_norm, memory=True, step_after=True, start="memory"),
                            "bank": {"n": 32, "bound": _norm, "size": _eps, "grad_input": False, "grad_skip": False}},
                           aliases=("mem_step",) if _old else ()))

# GradAlign's λ has a rule for Linf only (the authors' CIFAR-10 settings): no L2 recipe
register_recipe(Recipe("gradalign-linf", "gradalign", "FGSM + gradient alignment, lambda 0.2 at 8/255 "
                       "(Andriushchenko & Flammarion 2020)", _threat("linf")))

# From scratch on all of CIFAR-10 in 20 minutes of two CPU cores (docs/speedrun.md): N-FGSM at L2 0.5 with
# Wong et al. 2020's one-cycle learning rate (peak 0.2), as many epochs as fit the time on this project's
# machine in fp32 (about 195 s an epoch on two threads, without bf16)
register_recipe(Recipe("speedrun-l2", "nfgsm", "from scratch in 20 minutes of 2 CPU cores: N-FGSM, one-cycle "
                       "learning rate (docs/speedrun.md)", _threat("l2"), lr=0.2, epochs=6, schedule="cyclic", init=None))

# The Linf zoo from scratch (issue: Linf): the zoo's fine-tuning from the L2 base at lr 0.01 caps every Linf
# model near 29% AutoAttack at 8/255, PGD-10 included (docs/results.md); the N-FGSM first try, from
# scratch at lr 0.1 for 10 epochs, reached 34.2% PGD. The same training for N-FGSM and the generator variant
# to use, with the catastrophic-overfitting watch on, since lr 0.1 is where single-step training can overfit.
for _name in ("nfgsm-linf", "gen-sdi-linf"):
    _r = RECIPES[_name]
    register_recipe(Recipe(f"{_name}-scratch", _r.method, f"from scratch at lr 0.1 for 10 epochs: {_r.summary}",
                           _r.options, lr=0.1, epochs=10, init=None, settings={"watch_subset": 256}))
