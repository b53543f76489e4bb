"""The streaming transforms (spec sections 4 and 6, streaming rules), one module per feature.

* :mod:`.dedupe` - :class:`IngestStream`: validation and first-arrival dedupe per packet_id;
* :mod:`.partials` - :class:`PacketPartials`: one-packet partials for the windowed synthesis;
* :mod:`.windowed` - :class:`SynthesizeWindows`: panes decided by Beam, accumulated in state;
* :mod:`.alltime` - :class:`AllTimeSnapshots`: continuous per-address synthesis and expiry;
* :mod:`.toolate` - :class:`FlagTooLate`: packets the windows dropped, counted and dead-lettered;
* :mod:`.tallies` - :class:`TallyStream`: exact counts of a drained replay.

Every stateful step does O(1) work per packet and keeps state values whose size does not grow
with traffic x TTL; the ``qis/state_bytes.<step>`` distributions (:mod:`.sizes`) show it.
"""

from qis_beam.transforms.streaming.alltime import AllTimeSnapshots
from qis_beam.transforms.streaming.dedupe import DUPLICATES, IngestStream
from qis_beam.transforms.streaming.partials import PacketPartials
from qis_beam.transforms.streaming.tallies import TallyStream
from qis_beam.transforms.streaming.toolate import FlagTooLate
from qis_beam.transforms.streaming.windowed import SynthesizeWindows

__all__ = [
    "DUPLICATES",
    "AllTimeSnapshots",
    "FlagTooLate",
    "IngestStream",
    "PacketPartials",
    "SynthesizeWindows",
    "TallyStream",
]
