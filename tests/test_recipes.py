"""The recipe registry: one name per training, each documented where users look for it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from advgen.recipes import RECIPES, recipe_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_recipe_is_in_the_methods_table():
    """docs/methods.md's recipe table names every registered recipe: a recipe added without its row is
    one the CLI offers and the docs do not explain."""
    documented = set(re.findall(r"`([a-z0-9-]+)`", (ROOT / "docs" / "methods.md").read_text()))
    assert sorted(set(RECIPES) - documented) == []


@pytest.mark.parametrize("name", ["nfgsm-linf", "gen-sdi-linf"])
def test_the_linf_scratch_recipes_are_their_fine_tuning_from_scratch(name):
    """`NAME-scratch` trains what NAME does, from scratch at lr 0.1 for 10 epochs with the
    catastrophic-overfitting watch on: nothing else differs."""
    scratch, tuned = recipe_config(f"{name}-scratch"), recipe_config(name)
    assert (scratch.init, scratch.lr, scratch.epochs, scratch.watch_subset) == (None, 0.1, 10, 256)
    assert tuned.init is not None and tuned.lr == 0.01
    assert scratch == recipe_config(name, init=None, lr=0.1, epochs=10, watch_subset=256)
