"""TestStream scripts of raw records for the streaming graph (test_streaming, test_prism)."""

from __future__ import annotations

from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from qis_beam.settings import Settings
from qis_beam.wire import HOUR_MS


def ts(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)


def stream_of(script, settings: Settings) -> TestStream:
    """script: ("add", [(record, event_ms), ...]) or ("wm", ms) steps.

    Ends past every pending timer (state TTL included) before +infinity, as replay does.
    """
    stream = TestStream().with_output_types(tuple[bytes, str])
    for kind, value in script:
        if kind == "add":
            stream.add_elements(
                [TimestampedValue((record, "test"), ts(event_ms)) for record, event_ms in value]
            )
        else:
            stream.advance_watermark_to(ts(value))
    last_event = max(ms for kind, value in script if kind == "add" for _, ms in value)
    stream.advance_watermark_to(ts(last_event + settings.stream.state_ttl_ms + HOUR_MS))
    stream.advance_watermark_to_infinity()
    return stream
