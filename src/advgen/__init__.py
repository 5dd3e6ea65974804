"""advgen: fast adversarial training with generator networks, min-max PGD training, robust evaluation."""
__version__ = "0.1.0"

from .attacks import FGSM, PGD, AutoAttack, make_attack  # noqa: E402
from .checkpoint import load_model  # noqa: E402
from .config import AttackConfig, TrainConfig  # noqa: E402
from .data import Batches, Dataset, load_cifar  # noqa: E402
from .errors import UserError  # noqa: E402
from .evaluate import accuracy, evaluate, robust_accuracy  # noqa: E402
from .models import MODELS, BankConfig, GeneratorBank, build_model  # noqa: E402
from .training import METHODS, train  # noqa: E402
from .training.generator import GeneratorOptions, generator_preset  # noqa: E402

__all__ = ["PGD", "FGSM", "AutoAttack", "make_attack", "load_model", "TrainConfig", "AttackConfig",
           "GeneratorOptions", "generator_preset", "BankConfig", "GeneratorBank", "METHODS", "load_cifar", "Dataset", "Batches",
           "UserError", "accuracy", "evaluate", "robust_accuracy", "MODELS", "build_model", "train",
           "__version__"]
