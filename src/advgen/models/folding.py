"""Speed-ups that keep the math: BatchNorm folded into convolutions, channels-last memory layout.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it can be folded into
the convolution's weights and bias: one operation instead of two in every forward AND backward pass
of an attack (measured on ResNet-20 PGD steps; see benchmarks/README.md). The folded copy computes the
same function up to float rounding (about 1e-5 in the logits).
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def inference_copy(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """An eval-mode copy of `model` for attacks and evaluation; the original is left untouched.

    fold_bn: fold every Conv2d -> BatchNorm2d pair (torch.fx); a model that cannot be traced is kept
    unfolded (logged). channels_last: NHWC memory layout for the convolutions.
    """
    fast = copy.deepcopy(model).eval()
    if fold_bn:
        from torch.fx.experimental.optimization import fuse
        try:
            fast = fuse(fast)
        except Exception as e:  # torch.fx cannot trace every model (data-dependent control flow)
            log.info("BatchNorm folding skipped: %s is not traceable (%s)", type(model).__name__, e)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) of the Conv2d -> BatchNorm2d pairs that torch.fx's `fuse` folds."""
    from torch import fx
    traced = fx.symbolic_trace(model)   # references model's submodules, copies nothing
    modules = dict(traced.named_modules())
    pairs = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), nn.Conv2d)
                and len(src.users) == 1 and modules[node.target].track_running_stats):
            pairs.append((src.target, node.target))
    return pairs


class BNFolder:
    """A BatchNorm-folded, eval-mode copy of a model in training, refreshed from its live weights.

    For the attack inside min-max training: the classifier trains in train mode, the attack runs it in
    eval mode (running statistics), and `refresh()` returns the folded copy of the model AS IT IS NOW
    (weights and running statistics), computed with torch's own fuse_conv_bn_weights: the same function
    as eval_mode(model) up to float rounding. The graph is traced once; a refresh only re-folds the
    weights (a few small tensor operations per layer), so it can run before every batch.
    """

    def __init__(self, model: nn.Module, *, channels_last: bool = False):
        self.model = model
        self.fast = inference_copy(model, fold_bn=True, channels_last=channels_last)
        own = dict(model.named_modules())
        try:
            self.pairs = [(own[c], own[b], c) for c, b in _conv_bn_pairs(model)]
        except Exception:  # not traceable: inference_copy kept it unfolded
            self.pairs = []
        folded = {f"{c}.{k}" for _, _, c in self.pairs for k in ("weight", "bias")}
        model_keys = set(model.state_dict())
        fast_state = self.fast.state_dict()
        self.plain = [k for k in fast_state if k not in folded]
        # anything else folded or renamed that this class does not know: rebuild the copy at every refresh
        self.exact = set(self.plain) <= model_keys and all(k in fast_state for k in folded)
        self._fast_state = fast_state

    @torch.no_grad()
    def refresh(self) -> nn.Module:
        """The folded copy with the model's current weights and running statistics."""
        if not self.exact:
            self.fast = inference_copy(self.model, fold_bn=True,
                                       channels_last=next(self.fast.parameters()).is_contiguous(
                                           memory_format=torch.channels_last))
            return self.fast
        from torch.nn.utils.fusion import fuse_conv_bn_weights
        state, dst = self.model.state_dict(), self._fast_state
        for k in self.plain:
            dst[k].copy_(state[k])
        for conv, bn, name in self.pairs:
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
            dst[f"{name}.weight"].copy_(w)
            dst[f"{name}.bias"].copy_(b)
        return self.fast
