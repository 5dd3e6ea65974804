"""Robustness evaluation: one protocol (EvalProtocol) run by one function (evaluate), with the sanity
checks of Carlini et al. (2019), Wilson intervals and resumable per-sample results."""
from .checks import GAP_CHECK, LARGE_EPS, gap_check, sanity_checks
from .core import accuracy, predict, robust_accuracy, robust_flags
from .protocol import FULL_REL_STEP, EvalProtocol, curve_key, evaluate, from_samples
from .stats import mcnemar, mean_std, paired_interval, welch_interval, wilson, with_interval

__all__ = ["EvalProtocol", "evaluate", "from_samples", "curve_key", "FULL_REL_STEP", "accuracy", "predict",
           "robust_accuracy", "robust_flags", "sanity_checks", "gap_check", "GAP_CHECK", "LARGE_EPS", "wilson",
           "with_interval", "mean_std", "welch_interval", "paired_interval", "mcnemar"]
