"""Convergence-radius math of "Ghosts of Softmax" (arXiv 2603.13552): pure functions on tensors.

No models, no Trainer, no distributed code. Along a step ``theta + t v`` the logits move as ``z + a t``
(``a = J v``) and the cross-entropy is analytic in ``t`` up to the nearest complex zero of
``F(t) / F(0) = sum_k softmax(z)_k exp(a_k t)`` (eq. 8). Everything here estimates or bounds the
modulus of that zero, or turns it into a step size:

- :mod:`~hf_ghosts.radii.bounds`: ``Delta = max a - min a`` (eq. 11), ``pi / Delta`` (eq. 14), two-class and top-2;
- :mod:`~hf_ghosts.radii.exact`: the nearest zero by the argument principle;
- :mod:`~hf_ghosts.radii.certified`: a Rouché-certified lower bound at any vocabulary size, and the top-k batch radius;
- :mod:`~hf_ghosts.radii.activations`: FFN activations' radii (Appendix B);
- :mod:`~hf_ghosts.radii.step`: ``r = |u| / rho`` (eq. 17), the clip / set scale (eq. 19), and the block-wise
  step's certificate and scales.

The training-path functions make no host sync: NaN or inf inputs give NaN on the device, and the caller
checks the one scalar it reads (:func:`check_radius`).
"""

from hf_ghosts.radii.activations import ACTIVATION_FAMILIES, activation_radius
from hf_ghosts.radii.bounds import binary_radius, rho_bound, spread, top2_radius
from hf_ghosts.radii.certified import TOPK_POOL, certified_radius, topk_exact_radius, topk_radius, widest_tokens
from hf_ghosts.radii.exact import exact_radius
from hf_ghosts.radii.step import (
    CLIP_MODES,
    block_allocation,
    block_scale_up,
    check_radius,
    clip_scale,
    normalized_step,
    spread_bound,
    update_norm,
)

__all__ = [
    "ACTIVATION_FAMILIES",
    "CLIP_MODES",
    "TOPK_POOL",
    "activation_radius",
    "binary_radius",
    "block_allocation",
    "block_scale_up",
    "certified_radius",
    "check_radius",
    "clip_scale",
    "exact_radius",
    "normalized_step",
    "rho_bound",
    "spread",
    "spread_bound",
    "top2_radius",
    "topk_exact_radius",
    "topk_radius",
    "update_norm",
    "widest_tokens",
]
