"""The pipeline flags of ``backfill``, ``replay`` and ``run``, each mapped onto one settings field.

The table says, per flag, which field it sets, how its text parses (a kind the CLI maps to a
parser), its help when the field's class lives elsewhere, and which commands use it. Defaults
are read from the dataclasses (:mod:`qis_beam.settings`, ``ValidationPolicy``,
``SynthesisParams``), never restated: the CLI derives its parser from this table and builds the
settings back through :func:`settings_from` / :func:`source_from`. Nothing here parses text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from qis_beam.settings import STREAMING_DEFAULTS, Settings, SourceSettings

BACKFILL, REPLAY, RUN = "backfill", "replay", "run"
BATCH = frozenset({BACKFILL})
STREAMING = frozenset({REPLAY, RUN})
ALL = BATCH | STREAMING
INGESTION = "ingestion (spec section 4)"
SYNTHESIS = "synthesis (spec sections 5-6)"
SOURCE = "live source"
REPLAYED = "replay (spec section 8)"
SOURCE_ROOT = "source"  # paths starting "source." are SourceSettings fields, the rest Settings


@dataclasses.dataclass(frozen=True)
class Option:
    flag: str
    path: str  # dotted field path from Settings (or "source." + a SourceSettings field)
    kind: str  # duration | positive_int | non_negative_int | switch | text | choice | path
    commands: frozenset[str]
    group: str
    help: str | None = None  # only for fields of classes without help metadata
    choices: tuple[str, ...] = ()
    hidden: bool = False

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option(
        "--node-registry",
        "validation.registry",
        "path",
        ALL,
        INGESTION,
        "file of hex Ed25519 public keys allowed to send",
    ),
    Option(
        "--allow-unsigned",
        "validation.allow_unsigned",
        "switch",
        ALL,
        INGESTION,
        "accept envelopes without signature",
    ),
    Option(
        "--max-packet-bytes",
        "validation.max_packet_bytes",
        "positive_int",
        ALL,
        INGESTION,
        "larger envelopes are dead letters (oversize)",
    ),
    Option(
        "--max-clock-skew",
        "validation.max_clock_skew_ms",
        "duration",
        ALL,
        INGESTION,
        "event times further ahead of the pipeline's clock are dead letters",
    ),
    Option("--dedupe-ttl", "stream.dedupe_ttl_ms", "duration", STREAMING, INGESTION),
    Option("--dedupe-shards", "dedupe_shards", "positive_int", BATCH, INGESTION),
    Option("--window", "windows.size_ms", "duration", ALL, SYNTHESIS),
    Option("--window-period", "windows.period_ms", "duration", ALL, SYNTHESIS),
    Option("--allowed-lateness", "windows.allowed_lateness_ms", "duration", STREAMING, SYNTHESIS),
    Option(
        "--early-firing-count",
        "windows.early_firing_count",
        "non_negative_int",
        STREAMING,
        SYNTHESIS,
    ),
    Option(
        "--early-firing-delay", "windows.early_firing_delay_ms", "duration", STREAMING, SYNTHESIS
    ),
    Option(
        "--min-support",
        "synthesis.min_support",
        "positive_int",
        ALL,
        SYNTHESIS,
        "approaches with fewer packets are not ranked",
    ),
    Option("--top-k", "synthesis.top_k", "positive_int", ALL, SYNTHESIS, "ranked approaches kept"),
    Option(
        "--min-nodes",
        "synthesis.min_nodes",
        "non_negative_int",
        ALL,
        SYNTHESIS,
        "privacy guard: fewer distinct nodes suppress the record",
    ),
    Option("--emit-every", "stream.emit_every_ms", "duration", STREAMING, SYNTHESIS),
    Option("--state-ttl", "stream.state_ttl_ms", "duration", STREAMING, SYNTHESIS),
    Option("--hot-key-fanout", "hot_key_fanout", "non_negative_int", BATCH, SYNTHESIS),
    Option("--read-batch-size", "read_batch_size", "positive_int", BATCH, SYNTHESIS, hidden=True),
    Option(
        "--watermark-delay", "stream.watermark_delay_ms", "duration", frozenset({REPLAY}), REPLAYED
    ),
    # qis-beam run: the live source (SourceSettings).
    *(
        Option(flag, f"{SOURCE_ROOT}.{field}", kind, frozenset({RUN}), SOURCE, choices=choices)
        for flag, field, kind, choices in (
            ("--source", "kind", "choice", ("kafka", "pubsub")),
            ("--input-topic", "topic", "text", ()),
            ("--input-subscription", "subscription", "text", ()),
            ("--bootstrap-servers", "bootstrap_servers", "text", ()),
            ("--kafka-expansion-service", "kafka_expansion_service", "text", ()),
            (
                "--kafka-timestamp-policy",
                "kafka_timestamp_policy",
                "choice",
                ("ProcessingTime", "CreateTime", "LogAppendTime"),
            ),
            ("--kafka-reader", "kafka_reader", "choice", ("native", "xlang")),
            ("--kafka-group-id", "kafka_group_id", "text", ()),
            ("--kafka-watermark-delay", "kafka_watermark_delay_ms", "duration", ()),
            ("--kafka-stop-when-idle", "kafka_stop_when_idle_ms", "duration", ()),
            ("--timestamp-attribute", "timestamp_attribute", "text", ()),
            ("--flush-every", "flush_every_ms", "duration", ()),
            ("--output-shards", "output_shards", "positive_int", ()),
        )
    ),
)
BY_FLAG = {option.flag: option for option in OPTIONS}


def options_for(command: str) -> list[Option]:
    return [option for option in OPTIONS if command in option.commands]


def defaults_for(command: str) -> Settings:
    return STREAMING_DEFAULTS if command in STREAMING else Settings()


def _field(root: Any, path: str) -> tuple[Any, dataclasses.Field]:
    """(the dataclass instance holding the field, the field) for a dotted path."""
    *parents, name = path.split(".")
    for part in parents:
        root = getattr(root, part)
    field = next(f for f in dataclasses.fields(root) if f.name == name)
    return root, field


def _root(option: Option, command: str) -> tuple[Any, str]:
    if option.path.startswith(SOURCE_ROOT + "."):
        return SourceSettings(), option.path[len(SOURCE_ROOT) + 1 :]
    return defaults_for(command), option.path


def default(option: Option, command: str) -> Any:
    """The option's default for ``command``, read from its dataclass."""
    root, path = _root(option, command)
    holder, field = _field(root, path)
    return getattr(holder, field.name)


def help_text(option: Option) -> str:
    if option.help:
        return option.help
    root, path = _root(option, BACKFILL)
    return _field(root, path)[1].metadata.get("help", "")


def _apply(root: Any, updates: Mapping[str, Any]) -> Any:
    """``root`` with the dotted-path ``updates``; one ``replace`` per nested dataclass, so its
    checks (e.g. a window period dividing the size) see all of its new fields at once."""
    direct = {k: v for k, v in updates.items() if "." not in k}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in updates.items():
        if "." in key:
            head, rest = key.split(".", 1)
            nested.setdefault(head, {})[rest] = value
    for head, inner in nested.items():
        direct[head] = _apply(getattr(root, head), inner)
    return dataclasses.replace(root, **direct) if direct else root


def settings_from(
    values: Mapping[str, Any], command: str, extra: Mapping[str, Any] | None = None
) -> Settings:
    """Settings of ``command`` from ``{flag: value}`` (flags of other commands are ignored);
    ``extra`` sets fields no flag owns, e.g. ``{"validation.now_ms": ...}``. ValueError when
    the values do not fit together."""
    updates = {
        BY_FLAG[flag].path: value
        for flag, value in values.items()
        if command in BY_FLAG[flag].commands and not BY_FLAG[flag].path.startswith(SOURCE_ROOT)
    }
    return _apply(defaults_for(command), {**updates, **(extra or {})})


def source_from(values: Mapping[str, Any]) -> SourceSettings:
    prefix = SOURCE_ROOT + "."
    updates = {
        BY_FLAG[flag].path[len(prefix) :]: value
        for flag, value in values.items()
        if BY_FLAG[flag].path.startswith(prefix)
    }
    return _apply(SourceSettings(), updates)


def foreign(flags: Iterable[str], command: str) -> tuple[str, frozenset[str]] | None:
    """The first of ``flags`` that is a pipeline flag of other commands only, with those
    commands; None when there is none (other unknown flags are left to Beam's check)."""
    for flag in flags:
        option = BY_FLAG.get(flag.split("=", 1)[0])
        if option is not None and command not in option.commands:
            return option.flag, option.commands
    return None
