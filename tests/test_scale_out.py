"""Scale-out: no step that handles per-packet data puts more than 1% of the packets under one key.

Measured on 50k packets over 1000 addresses with zipf-skewed load (the hottest address has
~18% of the packets), from the Beam distributions the keyed steps report: packets per
dedupe shard (``dedupe_key_packets``) and per range re-read and folded
(``range_key_packets``). The partials merged per (address, window) and per address after
those steps are pre-aggregated per bundle (combiner lifting), which is how hot addresses
scale, and are exempt.

Why 50k packets stand for 1M: both key counts grow with the input (sized from the input's
bytes when the pipeline is built): dedupe shards are a power of two >= max(512, N/2048) and
ranges hold N/256 records (at least 256), so the largest share per key is about 1/512 and
1/256 of the packets at any size up to millions (checked below at 1M from the sizing
functions themselves); beyond, a key's work stays bounded (2048 entries per shard, ranges
capped by ``read_batch_size``) and the shares only shrink.
"""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from conftest import fnapi_options

from qis_beam.dedupe import shards_for
from qis_beam.pipelines.backfill import build_backfill
from qis_beam.positions import estimated_records, range_records_for
from qis_beam.settings import Settings
from qis_beam.sim import SwarmConfig, simulate
from qis_beam.validation import ValidationPolicy

PACKETS = 50_000
ONE_PERCENT = 0.01


@pytest.mark.slow
def test_no_key_holds_more_than_one_percent_of_the_packets(tmp_path):
    config = SwarmConfig(
        packets=PACKETS,
        addresses=1000,
        nodes=300,
        approaches=12,
        signed=False,
        address_skew=1.1,
        shards=4,
        seed=5,
    )
    simulate(str(tmp_path / "in"), config)
    settings = Settings(validation=ValidationPolicy(allow_unsigned=True))
    pipeline = beam.Pipeline(options=fnapi_options())
    build_backfill(pipeline, str(tmp_path / "in" / "*.tfrecord"), str(tmp_path / "out"), settings)
    result = pipeline.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_namespace("qis"))
    sizes = {m.key.metric.name: m.committed for m in metrics["distributions"]}
    counts = {m.key.metric.name: m.committed for m in metrics["counters"]}
    assert counts["valid"] >= PACKETS  # without a registry, unknown_node records are valid
    # Both steps see every copy that passed validation, duplicates and conflicts included.
    copies = counts["valid"] + counts["duplicates"] + counts["dead_letter.conflicting_duplicate"]
    for step in ("dedupe_key_packets", "range_key_packets"):
        largest = sizes[step]
        assert largest.sum == copies, step  # every copy is under exactly one key
        assert largest.count > 100, step
        assert largest.max <= ONE_PERCENT * copies, (step, largest.max, copies)


def test_the_sizing_keeps_keys_under_one_percent_at_one_million_packets():
    n = 1_000_000
    records = estimated_records(n * 240)  # ~240 bytes per unsigned record
    assert records >= n
    assert n / shards_for(records) <= ONE_PERCENT * n / 4  # expected share per shard
    assert range_records_for(records, Settings().read_batch_size) <= ONE_PERCENT * n
