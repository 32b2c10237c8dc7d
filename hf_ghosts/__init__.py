"""hf_ghosts: keep every training step inside the convergence radius of the softmax.

Implements "Ghosts of Softmax" (arXiv 2603.13552) for Hugging Face ``transformers``:
``RhoTrainer`` (or ``rho_trainer(SFTTrainer)``, any Trainer subclass) clips each AdamW update to ``r = |u| / rho <= r_target``; ``RhoCallback`` watches
``r`` from any Trainer; ``RhoController`` does both in a plain loop; ``RadiusProbe`` and
:mod:`hf_ghosts.radii` are the measurement and the math.
"""

from hf_ghosts import radii
from hf_ghosts.architectures import FFN_PREACTIVATIONS, FfnSpec
from hf_ghosts.arguments import RhoTrainingArguments, rho_arguments
from hf_ghosts.callback import RhoCallback
from hf_ghosts.controller import RhoController
from hf_ghosts.distributed import all_reduce_report
from hf_ghosts.probe import RadiusProbe, RadiusReport
from hf_ghosts.settings import RhoSettings
from hf_ghosts.trainer import RhoTrainer, rho_trainer

__all__ = [
    "FFN_PREACTIVATIONS",
    "FfnSpec",
    "RadiusProbe",
    "RadiusReport",
    "RhoCallback",
    "RhoController",
    "RhoSettings",
    "RhoTrainer",
    "RhoTrainingArguments",
    "all_reduce_report",
    "radii",
    "rho_arguments",
    "rho_trainer",
]
__version__ = "0.1.0"
