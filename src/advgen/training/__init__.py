"""Training: one shared loop (loop.py) and one small module per method under methods/, each registered in
method.METHODS when the package is imported."""
from . import methods  # noqa: F401  (imports every method module, each registering itself)
from .config import SCHEDULES, TrainConfig
from .control import STOP, StopFlag
from .loop import Run, config_changes, train
from .method import METHODS, Method, Setup, register, registered

__all__ = ["TrainConfig", "SCHEDULES", "train", "config_changes", "Run", "METHODS", "Method", "Setup", "register", "registered", "STOP", "StopFlag"]
