"""qis-beam: outcome routing for ML training swarms on Apache Beam.

Public API (everything else is an implementation module):

* :mod:`qis_beam.emitter` — what training nodes import: ``OutcomeEmitter``, ``OutcomeType``;
* :mod:`qis_beam.address` — ``semantic_address`` (lane A);
* :mod:`qis_beam.signing` — ``NodeKey``, ``load_registry``;
* :mod:`qis_beam.synthesis` — the Beam-free synthesis accumulator;
* ``qis-beam`` command line — :mod:`qis_beam.cli`.
"""

__version__ = "0.1.0"
