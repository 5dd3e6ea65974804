"""advgen: fast adversarial training with generator networks, min-max PGD training, robust evaluation."""
from ._version import __version__
from .attacks import FGSM, PGD, STANDARD_EPS, AutoAttack
from .checkpoint import load_model
from .config import AttackConfig
from .data import Batches, Dataset, load_cifar
from .errors import UserError
from .evaluation import EvalProtocol, accuracy, evaluate, robust_accuracy
from .models import MODELS, BankConfig, GeneratorBank, build_model
from .recipes import RECIPES, recipe_config
from .training import METHODS, TrainConfig, train
from .training.methods.generator import GeneratorOptions, generator_preset

__all__ = ["PGD", "FGSM", "AutoAttack", "STANDARD_EPS", "load_model", "TrainConfig", "AttackConfig",
           "GeneratorOptions", "generator_preset", "BankConfig", "GeneratorBank", "METHODS", "RECIPES",
           "recipe_config", "load_cifar", "Dataset", "Batches", "UserError", "EvalProtocol", "accuracy", "evaluate",
           "robust_accuracy", "MODELS", "build_model", "train", "__version__"]
