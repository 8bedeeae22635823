"""``python -m lorweb_fast ...``: the ``lorweb-fast`` command (e.g. under a launcher that takes a module, such as
``torchrun -m lorweb_fast train ...`` or ``accelerate launch -m lorweb_fast train ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
