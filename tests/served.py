"""A running `qis-beam serve` over a loaded store, for the service tests."""

from __future__ import annotations

import grpc
import pytest
from serving_data import address_of, records_for

from qis_beam.proto import query_pb2_grpc
from qis_beam.service.server import ServeConfig, start_server
from qis_beam.store import open_store

PROBLEMS = 3


def load(url: str) -> dict[str, list[dict]]:
    by_address = {}
    with open_store(url, create=True) as store:
        for i in range(PROBLEMS):
            records = records_for(i)
            store.load(records, "backfill-test")
            by_address[address_of(i)] = records
    # a suppressed address (privacy guard): counts only
    with open_store(url, create=True) as store:
        store.load(records_for(99, packets=2, min_nodes=50), "backfill-test")
    return by_address


class Served:
    def __init__(self, url: str, **config):
        self.records = load(url)
        self.store = open_store(url)
        config.setdefault("health_interval_s", 0.2)
        self.config = ServeConfig(port=0, **config)
        self.running = start_server(self.store, self.config)
        self.target = f"127.0.0.1:{self.running.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = query_pb2_grpc.IntelligenceServiceStub(self.channel)

    def close(self):
        self.channel.close()
        self.running.stop(grace=None)
        self.store.close()


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()
