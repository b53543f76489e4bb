"""Generated protobuf modules for the qis.v1 wire contract (built from protos/ at install)."""
