"""The gRPC query service over an intelligence store (``qis-beam serve``); proto in
``protos/qis/v1/query.proto``. The client training nodes import is :mod:`qis_beam.client`."""
