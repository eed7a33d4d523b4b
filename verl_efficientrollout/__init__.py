"""verl-efficientrollout: system-aware int4 self-speculative decoding for veRL rollouts.

Importing the package has no side effects and imports neither torch, vLLM nor veRL;
each subsystem is imported where it is used.
"""

__version__ = "0.1.0.dev0"
