"""The one table of radii, and what each field of a probe's report holds.

:data:`RADIUS_TABLE`: the name ``rho_radii`` takes, the report field the probe fills and how it reduces across ranks,
the ``StepRecord`` field and logged key, and the plot label. Adding a radius means a row here and the code that
measures it. :data:`REPORT_FIELDS`: each report field's kind (how it reduces across processes and scales with the
direction's length). :mod:`hf_ghosts.settings` re-exports both (its settings name the radii).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "COUNT",
    "FD_CHECK",
    "FD_STEP",
    "RADII",
    "RADIUS",
    "RADIUS_BY_NAME",
    "RADIUS_FIELDS",
    "RADIUS_TABLE",
    "REDUCTIONS",
    "REPORT_FIELDS",
    "SPREAD",
    "FieldKind",
    "Radius",
]


@dataclass(frozen=True)
class Radius:
    """One radius: ``name`` (what ``rho_radii`` / ``radii`` take), ``raw`` (the :class:`~hf_ghosts.probe.RadiusReport`
    field the probe fills: a spread ``Delta``, reduced across ranks by MAX, ``rho = pi / Delta``; or a radius, reduced
    by MIN), ``field`` (the ``StepRecord`` field and the ``ghosts/<field>`` key), ``meaning`` (the logged key's row in
    the README), ``label`` / ``color`` (plots), and ``exact`` (a report field with a tighter radius that replaces
    ``pi / Delta`` where the probe measured it, reduced by MIN: the output's top-k radius), and ``tokens`` (a report
    field counting the positions the radius was taken over, reduced by SUM: over none it is not measured, NaN in the
    report, left out of the record, not limiting, and counted under ``ghosts/no_<tokens>``)."""

    name: str
    raw: str
    spread: bool
    field: str
    meaning: str
    label: str
    color: str
    exact: str | None = None  # a report field holding a tighter radius that replaces pi / spread where measured
    tokens: str | None = None  # a report field counting the positions measured; 0: the radius was not measured

    @property
    def key(self) -> str:
        return f"ghosts/{self.field}"


RADIUS_TABLE: tuple[Radius, ...] = (
    Radius(
        "output", "out_spread", True, "rho_out",
        "output softmax radius: `pi / max Delta_out`, or with `rho_radius=\"topk_exact\"` the top-k certified radius",
        "rho_out", "tab:blue", exact="out_radius", tokens="output_tokens",
    ),
    Radius("attention", "attn_spread", True, "rho_attn", "attention radius, min over layers and heads",
           "rho_attn (min over heads)", "tab:orange", tokens="attention_tokens"),
    Radius(
        "ffn", "ffn_radius", False, "rho_ffn",
        "FFN radius (kink proxy, 1% quantile of `|z| / |z'|`, or per `rho_ffn_mode`), when `\"ffn\"` is measured",
        "rho_ffn (kink proxy)", "tab:green", tokens="ffn_tokens",
    ),
    Radius(
        "ffn_activation", "ffn_activation_radius", False, "rho_ffn_activation",
        "FFN activation radius (Appendix B, eq. 21; inf for exact GELU), when `\"ffn_activation\"` is measured",
        "rho_ffn_activation (Appendix B)", "tab:olive", tokens="ffn_tokens",
    ),
)
# "ffn" is the FFN radius in the form rho_ffn_mode picks (default "kink": the paper's 1% quantile of |z| / |z'|);
# "ffn_activation" is always Appendix B's activation radius (eq. 21; inf for exact GELU), so that one probe can watch
# both forms. With ffn_mode="activation" the two names measure the same thing.
RADIUS_BY_NAME = {radius.name: radius for radius in RADIUS_TABLE}
RADII = tuple(RADIUS_BY_NAME)
RADIUS_FIELDS = {radius.name: radius.field for radius in RADIUS_TABLE}


@dataclass(frozen=True)
class FieldKind:
    """What a :class:`~hf_ghosts.probe.RadiusReport` field holds, and so how it is combined: ``reduction`` across
    processes (``"max"``, ``"min"``, ``"sum"``), and ``length_power``, how it scales with the length of the direction
    it was measured along (``J d = |d| J v``: a report along ``d`` is one along ``v = d / |d|`` once each field is
    multiplied by ``|d| ** length_power``)."""

    name: str
    reduction: str
    length_power: int


SPREAD = FieldKind("spread", "max", -1)  # a slope's spread, per unit length: the largest binds (rho = pi / spread)
RADIUS = FieldKind("radius", "min", 1)  # a length along the direction: the least binds
COUNT = FieldKind("count", "sum", 0)  # positions measured: they add up across processes
FD_STEP = FieldKind("fd step", "min", 0)  # fd's step h, along the unit direction already: the narrowest any rank took
FD_CHECK = FieldKind("fd check", "max", 0)  # fd's estimated error and its JVP fallback flag: the worst rank's

#: What each report field holds, from the radius table (its spread or radius, the exact radius that replaces a bound,
#: the count of positions it was taken over) and fd's step control. Adding a field means a kind here: nothing reduces
#: or rescales a field by a guess.
REPORT_FIELDS: dict[str, FieldKind] = {
    **{radius.raw: SPREAD if radius.spread else RADIUS for radius in RADIUS_TABLE},
    **{radius.exact: RADIUS for radius in RADIUS_TABLE if radius.exact is not None},
    **{radius.tokens: COUNT for radius in RADIUS_TABLE if radius.tokens is not None},
    "fd_step": FD_STEP,
    "fd_error": FD_CHECK,
    "fd_fallback": FD_CHECK,
}
#: How each report field agrees across processes (:data:`REPORT_FIELDS`): MAX of spreads, MIN of radii (and of the
#: exact radii that replace a bound), SUM of the token counts; fd's step control: MIN of the step, MAX of its
#: estimated error and of the JVP fallback flag.
REDUCTIONS: dict[str, str] = {name: kind.reduction for name, kind in REPORT_FIELDS.items()}
