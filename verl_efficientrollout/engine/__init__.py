"""Rollout engines behind one small interface (``base.RolloutEngine``).

``native``: the embedded PyTorch engine (CPU and CUDA). vLLM and SGLang backends come later.
"""

from verl_efficientrollout.engine.base import Request, RequestOutput, RolloutEngine, RolloutResult

__all__ = ["Request", "RequestOutput", "RolloutEngine", "RolloutResult"]
