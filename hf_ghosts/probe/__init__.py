"""The measurement: :class:`RadiusProbe` -> :class:`RadiusReport` (and :class:`ShardedRadiusProbe` under FSDP2).

One job per module, read from the bottom up:

=====================  ==================================================================================
``report``             :class:`RadiusReport`, the spreads measured and the radii they imply
``inputs``             the forward's inputs (:func:`model_inputs`, :func:`forward_kwargs`) and which logits count
                       (:func:`output_positions`)
``attention``          the ``"ghosts"`` attention: sdpa outside a probe; inside, the attention JVP with the score-slope
                       spread on the fly (jvp), eager with the capture (fd)
``masks``              which keys a query may see: the one rule of the eager, blocked and Triton attention paths
``attention_jvp``      the query-blocked attention JVP (pure torch: every mask, softcap, GQA; no ``[B, H, T, T]``)
``attention_triton``   the fused Triton attention JVP on CUDA (``_attention_triton_kernel``: the kernel itself)
``norm_jvp``           LayerNorm / RMSNorm JVPs in closed form, and the norm modules run through them under forward AD
``buffers``            the persistent flat buffers a 16-bit probe casts the weights and the direction into
``ffn``                the FFN hooks (:class:`FfnRecorder`)
``head``               the chunked output head (logit-slope spreads over vocabulary blocks) and its glue
``core``               the ``jvp`` measuring path, probe mode, one measurement's session
``fd``                 the ``fd`` path: central differences, the rounding guard, the step control (error check, jvp fallback)
``radius_probe``       :class:`RadiusProbe`: construction, ``measure`` (fd: the step control chooses the step),
                       ``measure_with`` (the estimator and fd step given), ``logit_slopes``
``sharded``            :class:`ShardedRadiusProbe`: central differences in the FSDP2 shards, in place
``blocks``             per-block spreads for the block-wise step (``granularity="blocks"``): one ``measure_with`` per
                       moving block, at the step fd's control chose
=====================  ==================================================================================
"""

from hf_ghosts.architectures import LINEAR_HEAD_MODELS  # docs/probe.md names hf_ghosts.probe.LINEAR_HEAD_MODELS
from hf_ghosts.probe.ffn import FfnRecorder
from hf_ghosts.probe.inputs import IGNORE_INDEX, forward_kwargs, model_inputs, output_positions
from hf_ghosts.probe.radius_probe import RadiusProbe
from hf_ghosts.probe.report import RadiusReport
from hf_ghosts.probe.sharded import ShardedRadiusProbe

__all__ = [
    "IGNORE_INDEX",
    "LINEAR_HEAD_MODELS",
    "FfnRecorder",
    "RadiusProbe",
    "RadiusReport",
    "ShardedRadiusProbe",
    "forward_kwargs",
    "model_inputs",
    "output_positions",
]
