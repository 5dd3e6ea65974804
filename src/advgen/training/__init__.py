"""Training: one shared loop (loop.py) and one small module per method, registered in method.METHODS."""
from . import free, generator, minmax, nfgsm, standard, trades  # noqa: F401  (each registers its methods)
from .control import STOP, StopFlag
from .loop import Run, train
from .method import METHODS, Method, Setup, register, registered

__all__ = ["train", "Run", "METHODS", "Method", "Setup", "register", "registered", "STOP", "StopFlag"]
