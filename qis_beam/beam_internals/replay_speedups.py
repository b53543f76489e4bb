"""Speed-ups for ``replay`` on the BundleBasedDirectRunner, active only while one replay runs:
:func:`memoised_dofn_specs` and :func:`indexed_direct_timers` (the latter explained there).

Profiling a replay shows over half its time in ``userstate.get_dofn_specs``: the runner
re-derives each DoFn's state and timer specs by signature inspection at every bundle start,
and a replay has one bundle per watermark step per key with a timer. A DoFn's specs are
class attributes (the StateParam/TimerParam defaults of its methods), fixed per class, so
they are memoised per class. ``beam.Map``-style wrappers take their signature from the
wrapped callable, so they are keyed by its code object instead.

Each replaces private Beam functions, so it is checked against the Beam release it was
written for and refuses any other with one clear error, instead of silently misbehaving.
The originals are restored when the replay ends: nothing else in the process (later
pipelines, other tests) runs with the patch.

Why not Prism, which needs no patch: Prism 2.77 lets too-late packets into windows that have
already closed (apache/beam#31438), so replay's final panes would be wrong.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
from collections.abc import Iterator

from qis_beam.beam_internals import UnsupportedBeamError, check_beam_version

_lock = threading.Lock()  # one replay at a time may hold the patch


@contextlib.contextmanager
def memoised_dofn_specs() -> Iterator[None]:
    """Within the block, DoFn state/timer specs are computed once per DoFn class."""
    check_beam_version()
    from apache_beam.runners.direct import transform_evaluator
    from apache_beam.transforms import userstate
    from apache_beam.transforms.core import CallableWrapperDoFn

    # The evaluator imported the names; the runner's DoFnSignature and the state context call
    # them through the userstate module (and so do its own validators): patch both places.
    modules = (transform_evaluator, userstate)
    for module in modules:
        for name in ("get_dofn_specs", "is_stateful_dofn"):
            if not callable(getattr(module, name, None)):
                raise UnsupportedBeamError(f"{module.__name__}.{name} is gone from this Beam")
    if not _lock.acquire(blocking=False):
        raise RuntimeError("another replay in this process already holds the DoFn-spec patch")
    original = userstate.get_dofn_specs
    saved = {m: (m.get_dofn_specs, m.is_stateful_dofn) for m in modules}
    memo: dict[object, tuple] = {}

    def get_dofn_specs(dofn):
        if isinstance(dofn, CallableWrapperDoFn):
            key = getattr(dofn._fn, "__code__", None)
            if key is None:
                return original(dofn)
        else:
            key = type(dofn)
        if key not in memo:
            memo[key] = original(dofn)
        return memo[key]

    def is_stateful_dofn(dofn) -> bool:
        state_specs, timer_specs = get_dofn_specs(dofn)
        return bool(state_specs or timer_specs)

    try:
        for module in modules:
            module.get_dofn_specs = get_dofn_specs
            module.is_stateful_dofn = is_stateful_dofn
        yield
    finally:
        for module, (specs, stateful) in saved.items():
            module.get_dofn_specs = specs
            module.is_stateful_dofn = stateful
        _lock.release()


class _TimerIndexedStates(dict):
    """A transform's keyed states, indexed by each key's earliest event-time timer.

    The runner replaces a key's state object on every commit (``states[key] = state``), so
    ``__setitem__`` sees every change of a key's timers. The heap may hold stale entries;
    :meth:`due_keys` checks each against the key's current state.
    """

    def __init__(self):
        super().__init__()
        self._heap: list[tuple[int, int, object]] = []
        self._seq = 0
        self.realtime_keys: set = set()

    def __setitem__(self, key, state):
        super().__setitem__(key, state)
        earliest, realtime = _earliest_event_timer(state)
        if realtime:
            self.realtime_keys.add(key)
        else:
            self.realtime_keys.discard(key)
        if earliest is not None:
            self._push(earliest, key)

    def _push(self, micros: int, key) -> None:
        self._seq += 1  # keys need not be comparable
        heapq.heappush(self._heap, (micros, self._seq, key))

    def due_keys(self, watermark_micros: int) -> list:
        """Keys that may have event-time timers at or before the watermark, plus every key
        with a processing-time timer. Keys popped here are re-indexed when their state is
        committed again (the runner clears fired timers by committing)."""
        keys = dict.fromkeys(self.realtime_keys)
        heap = self._heap
        while heap and heap[0][0] <= watermark_micros:
            _, _, key = heapq.heappop(heap)
            keys[key] = None
        return list(keys)


def _earliest_event_timer(state) -> tuple[int | None, bool]:
    from apache_beam.transforms.timeutil import TimeDomain

    earliest = None
    realtime = False
    for timers in getattr(state, "timers", {}).values():
        for (_, time_domain, _), timestamp in timers.items():
            if time_domain == TimeDomain.WATERMARK:
                micros = timestamp.micros
                earliest = micros if earliest is None else min(earliest, micros)
            else:
                realtime = True
    return earliest, realtime


_timers_lock = threading.Lock()


@contextlib.contextmanager
def indexed_direct_timers() -> Iterator[None]:
    """Within the block, the DirectRunner looks for due timers only among keys with timers.

    Its monitor loop asks every key a stateful step ever saw for due timers at every round
    (and reads the clock once per key): with per-packet_id keys (streaming dedupe, too-late
    checks) that scan was two thirds of a replay's CPU time, growing with keys x rounds.
    Here each step's keys sit in a heap by their earliest event-time timer, so a round looks
    only at keys with a timer due (and at keys with processing-time timers). Pipelines
    started inside the block keep the index; the originals are restored after.
    """
    check_beam_version()
    from apache_beam.runners.direct import evaluation_context, watermark_manager
    from apache_beam.runners.direct.util import TimerFiring

    context_cls = evaluation_context.EvaluationContext
    watermarks_cls = watermark_manager._TransformWatermarks
    for owner, name in (
        (context_cls, "_initialize_keyed_states"),
        (watermarks_cls, "extract_transform_timers"),
    ):
        if not callable(getattr(owner, name, None)):
            raise UnsupportedBeamError(f"{owner.__name__}.{name} is gone from this Beam")
    if not _timers_lock.acquire(blocking=False):
        raise RuntimeError("another replay in this process already holds the timer index")
    saved = (context_cls._initialize_keyed_states, watermarks_cls.extract_transform_timers)

    def _initialize_keyed_states(self, root_transforms, value_to_consumers):
        states = {transform: _TimerIndexedStates() for transform in root_transforms}
        for consumers in value_to_consumers.values():
            for consumer in consumers:
                states[consumer] = _TimerIndexedStates()
        return states

    def extract_transform_timers(self):
        with self._lock:
            fired_timers = []
            has_realtime_timer = False
            keyed_states = self._keyed_states
            now = self._clock.time()
            if isinstance(keyed_states, _TimerIndexedStates):
                keys = keyed_states.due_keys(self._input_watermark.micros)
            else:
                keys = list(keyed_states)
            for encoded_key in keys:
                timers, had_realtime_timer = keyed_states[encoded_key].get_timers(
                    watermark=self._input_watermark, processing_time=now
                )
                has_realtime_timer = has_realtime_timer or had_realtime_timer
                for window, (name, time_domain, timestamp, dynamic_timer_tag) in timers:
                    fired_timers.append(
                        TimerFiring(
                            encoded_key,
                            window,
                            name,
                            time_domain,
                            timestamp,
                            dynamic_timer_tag=dynamic_timer_tag,
                        )
                    )
            self._fired_timers.update(fired_timers)
            return fired_timers, has_realtime_timer

    try:
        context_cls._initialize_keyed_states = _initialize_keyed_states
        watermarks_cls.extract_transform_timers = extract_transform_timers
        yield
    finally:
        context_cls._initialize_keyed_states, watermarks_cls.extract_transform_timers = saved
        _timers_lock.release()
