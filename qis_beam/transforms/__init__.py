"""Beam transforms of qis-beam; ``pipelines/`` wires them to sources and sinks."""
