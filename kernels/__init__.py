"""Triton kernels of lorweb_fast (pure launchers). Installed and imported only as ``lorweb_fast.kernels``."""

if __name__ != "lorweb_fast.kernels":
    raise ImportError(
        f"lorweb_fast's kernels/ folder was imported as {__name__!r}. It must only be imported as "
        "'lorweb_fast.kernels' (setuptools package-dir mapping); a top-level 'kernels' module is a different PyPI "
        "package that bitsandbytes and diffusers import. Do not put the lorweb_fast source root on sys.path."
    )
