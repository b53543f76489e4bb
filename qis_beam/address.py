"""Semantic addresses, lane A: the exact address of a problem (spec section 3).

Two nodes facing the same problem must compute the same 32-byte address on their own,
on any machine, so canonicalisation is strict and explicit:

* keys and string values: ``str.strip``, Unicode NFC, then lower-case;
* numbers (``int``/``float``, or strings that parse as a float such as ``"1e9"``, since the
  command line only has strings) are binned by the template: ``log10`` (decades,
  ``1e9``), ``log2`` (``2^5``), ``linear:STEP`` (``[k*STEP]`` as the lower bound) or ``exact``;
  zero is ``0`` and a negative value is ``-`` plus the bin of its magnitude; NaN and
  infinities are refused;
* booleans are ``true`` / ``false``;
* pairs are sorted by key; a key may appear once.

``address = SHA-256(utf8(template_id + "|" + "&".join("k=v")))``, keyed in the pipeline as
lower-case hex. Templates not registered here bin every number by decades (``log10``).
The context never leaves the node: only the hash is sent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import unicodedata
from collections.abc import Iterable, Mapping

from qis_beam.wire import TEMPLATE_ID_RE

DEFAULT_BINNING = "log10"
_BINNINGS = ("log10", "log2", "exact")


@dataclasses.dataclass(frozen=True)
class ContextTemplate:
    """How one template canonicalises its numbers: key -> binning (default decades)."""

    template_id: str
    numeric_binning: Mapping[str, str] = dataclasses.field(default_factory=dict)
    default_binning: str = DEFAULT_BINNING

    def __post_init__(self):
        if not TEMPLATE_ID_RE.fullmatch(self.template_id):
            raise ValueError(f"template_id must match [a-z0-9_.:/-]{{1,64}}: {self.template_id!r}")
        for binning in [self.default_binning, *self.numeric_binning.values()]:
            _check_binning(binning)

    def binning_for(self, key: str) -> str:
        return self.numeric_binning.get(key, self.default_binning)


def _check_binning(binning: str) -> None:
    if binning in _BINNINGS:
        return
    if binning.startswith("linear:"):
        step = float(binning.split(":", 1)[1])
        if math.isfinite(step) and step > 0:
            return
    raise ValueError(f"unknown numeric binning {binning!r} (log10, log2, linear:STEP, exact)")


# Templates shipped with qis-beam; a template's id carries its version (a change of
# binning is a new id, so old and new packets never share an address by accident).
TEMPLATES: dict[str, ContextTemplate] = {
    t.template_id: t
    for t in (
        ContextTemplate(
            "llm-finetune/v1",
            {"params": "log10", "tokens": "log10", "batch_size": "log2", "seq_len": "log2"},
        ),
        ContextTemplate(
            "vision-classify/v1",
            {"params": "log10", "images": "log10", "resolution": "log2", "batch_size": "log2"},
        ),
        ContextTemplate(
            "tabular-gbdt/v1",
            {"rows": "log10", "features": "log2", "depth": "exact"},
        ),
    )
}


def template_for(template_id: str) -> ContextTemplate:
    return TEMPLATES.get(template_id) or ContextTemplate(template_id)


def _normalise_text(text: str) -> str:
    return unicodedata.normalize("NFC", text.strip()).lower()


def _as_number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _format_number(x: float) -> str:
    return format(x, ".12g")


def bin_number(x: float, binning: str) -> str:
    """Canonical text of a number under a binning (see module docstring)."""
    if not math.isfinite(x):
        raise ValueError(f"context values must be finite, got {x!r}")
    if x == 0:
        return "0"
    if x < 0:
        return "-" + bin_number(-x, binning)
    if binning == "exact":
        return _format_number(x)
    if binning == "log2":
        _, exponent = math.frexp(x)  # x = m * 2**e with 0.5 <= m < 1, exact
        return f"2^{exponent - 1}"
    if binning == "log10":
        decade = math.floor(math.log10(x))
        # log10 rounds: correct the decade so 10**decade <= x < 10**(decade + 1) holds.
        if 10.0**decade > x:
            decade -= 1
        elif 10.0 ** (decade + 1) <= x:
            decade += 1
        return f"1e{decade}"
    step = float(binning.split(":", 1)[1])
    return f"[{_format_number(math.floor(x / step) * step)}]"


def canonical_context(template: ContextTemplate, context: Mapping[str, object]) -> str:
    """The ``k=v&k=v`` text that is hashed (exposed for debugging and tests)."""
    pairs: dict[str, str] = {}
    for raw_key, raw_value in context.items():
        key = _normalise_text(str(raw_key))
        if not key or any(c in key for c in "=&|"):
            raise ValueError(f"context key must be non-empty without '=', '&' or '|': {raw_key!r}")
        if key in pairs:
            raise ValueError(f"context key appears twice after canonicalisation: {key!r}")
        if isinstance(raw_value, bool):
            value = "true" if raw_value else "false"
        elif (number := _as_number(raw_value)) is not None:
            value = bin_number(number, template.binning_for(key))
        elif isinstance(raw_value, str):
            value = _normalise_text(raw_value)
            if any(c in value for c in "&|"):
                raise ValueError(f"context value may not contain '&' or '|': {raw_value!r}")
        else:
            raise ValueError(f"context value must be a string, number or bool: {raw_value!r}")
        pairs[key] = value
    return "&".join(f"{k}={pairs[k]}" for k in sorted(pairs))


def semantic_address(template_id: str, context: Mapping[str, object]) -> bytes:
    """The 32-byte lane-A address of a problem."""
    template = template_for(template_id)
    text = template.template_id + "|" + canonical_context(template, context)
    return hashlib.sha256(text.encode("utf-8")).digest()


def parse_context_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """``["k=v", ...]`` from the command line into a context mapping."""
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"context pairs are written k=v, got {pair!r}")
        context[key] = value
    return context
