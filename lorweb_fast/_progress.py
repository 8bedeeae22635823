"""Progress bars: ``tqdm.auto``'s, without tqdm's monitor thread for a bar that is switched off."""

from __future__ import annotations

_quiet_classes: dict = {}


def progress_bar(*args, disable: bool = False, **kwargs):
    """``tqdm.auto.tqdm(*args, disable=disable, **kwargs)``. Every tqdm bar, even a disabled one, starts tqdm's
    monitor thread (woken every 10 s until the process exits); a disabled bar (``progress=False``, ``--quiet``) is
    built from a subclass whose ``monitor_interval`` is 0, so a quiet run starts no thread."""
    from tqdm.auto import tqdm

    if not disable:
        return tqdm(*args, **kwargs)
    quiet = _quiet_classes.get(tqdm)  # per tqdm class (a test may substitute its own)
    if quiet is None:
        quiet = _quiet_classes[tqdm] = type("QuietProgressBar", (tqdm,), {"monitor_interval": 0})
    return quiet(*args, disable=True, **kwargs)
