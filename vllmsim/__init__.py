"""vllmsim: a vLLM simulator (OpenAI API + real /metrics families) for routing work.

See docs/vllmsim.md. Entry points: ``python -m vllmsim`` / the ``vllmsim`` console script,
or ``vllmsim.server.serve(SimConfig(...))`` inside an event loop.
"""

from .config import SimConfig, parse_args

__all__ = ["SimConfig", "parse_args"]
