"""Known bugs the fidelity tests must catch, injected on request (tests only).

``VERL_EFFICIENTROLLOUT_INJECT_BUG=<name>`` makes the native engine's speculative step commit that bug
(``rejection.rejection_sample``, ``engine.native``), and vLLM's verify step where our drafter meets vLLM's
verifier (``vllm_backend.selfspec``; set in vLLM's worker by its ``efficient_inject_bug``), so a test can
show that the engine-level exact-law tests reject it (``tests/engine/test_exact_law.py``,
``tests/vllm_backend/test_vllm_exact_law.py``). Unset (always, outside those tests) it changes nothing.
Read at call time: nothing happens at import.
"""

from __future__ import annotations

import os

ENV = "VERL_EFFICIENTROLLOUT_INJECT_BUG"
BUGS = (
    "no-residual",  # the recovered token drawn from the target's law, not from max(target - draft, 0)
    "residual-of-next-draft",  # the residual built from the draft law of the position after the rejection
    "temperature-twice",  # the verifier divides the target's logits by the temperature twice
    "top-p-draft-only",  # top-p applied to the draft law but not to the target's
)


def injected_bug() -> str:
    """The bug to inject ("" for none); an unknown name raises, naming the allowed ones."""
    bug = os.environ.get(ENV, "")
    if bug and bug not in BUGS:
        raise ValueError(f"{ENV} must be one of {', '.join(BUGS)} (or unset), got {bug!r}")
    return bug
