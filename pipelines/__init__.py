"""Pipeline builders: they only wire qis_beam transforms to sources and sinks.

Installed as ``qis_beam.pipelines`` (see setup.py).
"""
