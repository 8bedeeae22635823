"""``python -m lorweb_fast.info``: versions and which backends can run here, and why not."""

from __future__ import annotations

import platform
from importlib import metadata

#: the packages whose version bounds (pyproject.toml) and optional features the README describes
ECOSYSTEM = ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "optimum-quanto")


def collect() -> dict[str, str]:
    import torch

    import lorweb_fast

    info = {
        "lorweb_fast": lorweb_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA build": str(torch.version.cuda),
        "CUDA GPU": torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ModuleNotFoundError as exc:
        info["triton"] = "not installed" if exc.name == "triton" else f"installed, but its import fails ({exc})"
    except Exception as exc:  # noqa: BLE001 - installed but broken (another torch's triton, a missing library)
        info["triton"] = f"installed, but its import fails ({type(exc).__name__}: {exc})"
    for package in ECOSYSTEM:  # read from the installed metadata: nothing is imported
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    for name, why in lorweb_fast.backend_status().items():
        info[f"backend {name}"] = why
    return info


def main(argv=()) -> None:
    """Print ``collect()`` as a table. ``argv``: the command's arguments (none are taken: argparse refuses any, exit
    status 2); the command passes ``sys.argv[1:]``, a call from Python none (never the caller's own ``sys.argv``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lorweb_fast.info", description=__doc__.replace("``", ""))
    parser.parse_args(list(argv))
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}} : {value}")


if __name__ == "__main__":
    import sys

    from .cli import run_writing_stdout

    sys.exit(run_writing_stdout("python -m lorweb_fast.info", lambda: main(sys.argv[1:]) or 0))
