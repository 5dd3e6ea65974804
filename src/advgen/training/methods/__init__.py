"""The training methods, one module each. Importing this package imports every module in it, and each
registers its method (training/method.py, @register): a new method is one new file here, or a module of
your own named in $ADVGEN_PLUGINS (advgen's CLI imports those before it reads its arguments)."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
