"""Runner profiles and deployment kits; installed as ``qis_beam.runners`` (see setup.py)."""
