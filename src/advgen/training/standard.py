"""Standard training: cross-entropy on clean samples (the base model)."""
import torch.nn.functional as F


class Standard:
    """loss(x, y) = CE(f(x), y)."""

    def __init__(self, model, cfg, steps_per_epoch: int):
        self.model = model

    def loss(self, x, y):
        """-> (scalar loss to minimise, logits (B, classes), labels (B,)) for the metrics."""
        logits = self.model(x)
        return F.cross_entropy(logits, y), logits, y
