"""Training methods: standard, min-max (PGD), FGSM-RS and the generator method, over one shared loop."""
from .loop import METHOD_CLASSES, train

__all__ = ["train", "METHOD_CLASSES"]
