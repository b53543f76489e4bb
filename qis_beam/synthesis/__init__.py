"""Per-address synthesis of outcome packets (spec section 5): the math, with no Beam in it.

* :mod:`.accumulator` -- :class:`Synthesis`, the mergeable accumulator (add, merge, extract);
* :mod:`.encoding` -- its versioned byte encoding, ``qis.v1.SynthesisState``;
* :mod:`.columnar` -- :func:`synthesize_columns`, the numpy fold of a batch of many addresses;
* :mod:`.sketch` -- :class:`DistinctSketch`, the bottom-k distinct-node counter;
* :mod:`.ranking` -- the order approaches are reported in;
* :mod:`.hashing` -- node and approach hashes; :mod:`.params` -- :class:`SynthesisParams`.
"""

from qis_beam.synthesis.accumulator import (
    APPROACH_NODE_SKETCH_K,
    MAX_TRACKED_APPROACHES,
    NODE_SKETCH_K,
    Synthesis,
    _unpickle,  # noqa: F401  (pickles made before the package split name it here)
)
from qis_beam.synthesis.columnar import synthesize_columns
from qis_beam.synthesis.encoding import ENCODING_VERSION
from qis_beam.synthesis.hashing import approach_hash, node_hash, node_hash_array
from qis_beam.synthesis.params import DEFAULT_PARAMS, SynthesisParams
from qis_beam.synthesis.sketch import DistinctSketch

__all__ = [
    "APPROACH_NODE_SKETCH_K",
    "DEFAULT_PARAMS",
    "ENCODING_VERSION",
    "MAX_TRACKED_APPROACHES",
    "NODE_SKETCH_K",
    "DistinctSketch",
    "Synthesis",
    "SynthesisParams",
    "approach_hash",
    "node_hash",
    "node_hash_array",
    "synthesize_columns",
]
