"""Triton kernels of lorweb_fast (pure launchers). Installed and imported only as ``lorweb_fast.kernels``.

Python started in a source checkout has the checkout's root on ``sys.path``, so this folder is also found as a
top-level ``kernels``: the name of an unrelated PyPI package that transformers, diffusers and bitsandbytes probe for
(transformers even imports it to read its version). Imported under that name, this file makes the folder look like
what it is to them, a stray folder rather than an installed package: no ``__file__`` (how transformers recognises a
namespace folder shadowing a package), no version, and no submodules (``import kernels.mixed_lora`` fails), so those
libraries conclude that ``kernels`` is not installed and import normally.
"""

if __name__ != "lorweb_fast.kernels":
    __path__ = []  # nothing below this folder is importable as kernels.*
    del __file__
