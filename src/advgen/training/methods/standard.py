"""Standard training: cross-entropy on clean samples (the base model)."""
import torch.nn.functional as F

from ...config import NoOptions
from ..method import Method, register


@register("standard", NoOptions, "cross-entropy on clean images")
class Standard(Method):
    """loss(x, y) = CE(f(x), y)."""

    def loss(self, x, y):
        logits = self.train_model(x)
        return F.cross_entropy(logits, y), logits, y
