"""What an extracted synthesis reports (spec section 5): the CLI and settings build these."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SynthesisParams:
    min_support: int = 3  # approaches with fewer packets are not ranked
    top_k: int = 10  # ranked approaches reported
    min_nodes: int = 1  # fewer distinct nodes: the record is suppressed


DEFAULT_PARAMS = SynthesisParams()
