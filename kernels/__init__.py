"""Triton kernels and their PyTorch references. No nn.Module, no autograd: tensors in, tensors out.

This folder is installed as `fastpeft.kernels` and is meant to be imported only under that name.
Python started inside the checkout (a script in its root, a REPL, ``python -c`` or ``python -m``
there) has the root on `sys.path`, so ``import kernels`` lands here instead of the Hugging Face
hub package `kernels` that transformers and bitsandbytes import. Imported under that name, this
module steps aside: it loads the installed `kernels` in its own place, or fails as if it were
absent, so the checkout never shadows it.
"""
if __name__ != "fastpeft.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
