"""The paper's evaluation protocol (section 4.2 and appendix A.3 of the LoRWeB paper).

- ``evalsets``: readers for evaluation sets (a simple folder layout, the released LoRWeB evaluation set,
  Relation252k's unseen tasks) and for runs folders (``RUNS/<task>/<id>/{a,a_prime,b,b_prime}.png``);
- ``generate``: inference over an evaluation set in batches of different analogies, resumable;
- ``metrics``: CLIP directional similarity (``clip_dir``) and LPIPS between b and b';
- ``judge``: the VLM judge (the paper's two prompts, a Gemma-3 backend and a replay backend, robust parsing);
- ``score``: ``eval score``'s driver (metric and judge caches, the balanced 2AFC order);
- ``report``: per-task then over-task aggregation, ``metrics.json``, ``summary.md`` and the plots;
- ``cli``: ``lorweb-fast eval generate`` and ``lorweb-fast eval score``;
- ``tiny``: offline tiny stand-ins (a random Gemma-3, LPIPS weights, synthetic sets) for tests and dry runs.
"""

from .evalsets import EvalInputError, ImageRef, Triplet, read_evalset, read_runs
from .judge import PAIRWISE_PROMPT, SCORE_PROMPT, parse_pairwise, parse_score

__all__ = ["EvalInputError", "ImageRef", "PAIRWISE_PROMPT", "SCORE_PROMPT", "Triplet", "parse_pairwise",
           "parse_score", "read_evalset", "read_runs"]
