"""Runner profiles and deployment kits; ``profiles.py`` is installed as ``qis_beam.runners``
(setup.py's ``package_dir``), the kits are repository files used from a checkout.

- ``profiles.py``: the named Beam option sets behind ``qis-beam ... --profile NAME``
  (direct, portable, flink, dataflow) - the one source of truth for runner options.
- ``flink/``: a Flink session cluster with the Beam job server, a Python SDK worker pool and
  Kafka (docker compose), the worker image, and ``submit.sh``.
- ``dataflow/``: the flex-template image, its metadata and ``launch.sh``.

The guide is ``docs/runners.md``.
"""
