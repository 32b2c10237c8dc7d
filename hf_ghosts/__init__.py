"""hf_ghosts: keep every training step inside the convergence radius of the softmax.

Implements "Ghosts of Softmax" (arXiv 2603.13552) for Hugging Face ``transformers``.
"""

from hf_ghosts import radii
from hf_ghosts.architectures import FFN_PREACTIVATIONS, FfnSpec
from hf_ghosts.probe import RadiusProbe, RadiusReport

__all__ = ["FFN_PREACTIVATIONS", "FfnSpec", "RadiusProbe", "RadiusReport", "radii"]
__version__ = "0.1.0"
