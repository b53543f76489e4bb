"""A local speed-up for ``replay`` on the BundleBasedDirectRunner, applied only there.

Profiling a replay shows over half its time in ``userstate.get_dofn_specs``: the runner
re-derives each DoFn's state and timer specs by signature inspection at every bundle start,
and a replay has one bundle per watermark step per key with a timer. A DoFn's specs are
class attributes (the StateParam/TimerParam defaults of its methods), fixed per class, so
they are memoised per class. ``beam.Map``-style wrappers take their signature from the
wrapped callable, so they are keyed by its code object instead.
"""

from __future__ import annotations

_installed = False


def memoise_qis_dofn_specs() -> None:
    global _installed
    if _installed:
        return
    from apache_beam.runners.direct import transform_evaluator
    from apache_beam.transforms import userstate
    from apache_beam.transforms.core import CallableWrapperDoFn

    original = userstate.get_dofn_specs
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

    # The evaluator imported the names; the runner's DoFnSignature and the state context call
    # them through the userstate module (and so do its own validators): patch both places.
    for module in (transform_evaluator, userstate):
        module.get_dofn_specs = get_dofn_specs
        module.is_stateful_dofn = is_stateful_dofn
    _installed = True
