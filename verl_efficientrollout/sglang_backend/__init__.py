"""SGLang backend: ``sglang.Engine`` with the int4 self-drafter as SGLang's STANDALONE draft model.

``plugin`` (the ``sglang.srt.plugins`` entry point) registers the drafter recipes as SGLang
quantization methods and re-quantizes the drafter after each weight update; ``engine`` is the
rollout engine interface over ``sglang.Engine``; ``compat`` holds every SGLang internal it uses.
"""
