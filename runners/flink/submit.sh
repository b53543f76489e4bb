#!/usr/bin/env bash
# Start the compose cluster and submit qis-beam jobs to it. See README.md in this directory.
#
#   runners/flink/submit.sh up                          # build images, start the cluster
#   runners/flink/submit.sh topic [TOPIC]               # create the Kafka topic (4 partitions)
#   runners/flink/submit.sh backfill GLOB OUTPUT_DIR [qis/Beam options...]
#   runners/flink/submit.sh run TOPIC OUTPUT_DIR [qis/Beam options...]
#   runners/flink/submit.sh jobs                        # list Flink jobs
#   runners/flink/submit.sh savepoint JOB_ID            # stop a job with a savepoint
#   runners/flink/submit.sh resume SAVEPOINT TOPIC OUTPUT_DIR [options...]
#   runners/flink/submit.sh down                        # stop the cluster (volumes kept)
#
# Submission path (QIS_SUBMIT):
#   uberjar   (default) the `flink` profile: FlinkRunner --flink_submit_uber_jar uploads the
#             pipeline to localhost:8081. Needs beam-runners-flink-1.20-job-server-2.77.0.jar
#             in ~/.apache_beam/cache/jars/ or QIS_FLINK_JOB_SERVER_JAR (no Java needed here).
#   jobserver the compose job server: PortableRunner --job_endpoint=localhost:8099. Needs no jar
#             here; --flink_master=[auto] lets the job server use its own jobmanager:8081.
# Environment: QIS_BEAM (command, default: qis-beam on PATH, else python -m qis_beam.cli),
# QIS_DATA_DIR (shared data directory, default /tmp/qis-data), KAFKA_BOOTSTRAP (as seen by the
# task manager, default kafka:9092), QIS_KAFKA_EXPANSION_SERVICE (default localhost:8096).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
COMPOSE=(docker compose -f "$HERE/docker-compose.yaml")
FLINK_VERSION="1.20"   # = FLINK_VERSION in runners/profiles.py
BEAM_VERSION="2.77.0"
JAR_NAME="beam-runners-flink-${FLINK_VERSION}-job-server-${BEAM_VERSION}.jar"
QIS_SUBMIT="${QIS_SUBMIT:-uberjar}"
QIS_DATA_DIR="${QIS_DATA_DIR:-/tmp/qis-data}"
KAFKA_BOOTSTRAP="${KAFKA_BOOTSTRAP:-kafka:9092}"
QIS_KAFKA_EXPANSION_SERVICE="${QIS_KAFKA_EXPANSION_SERVICE:-localhost:8096}"
FLINK_REST="${FLINK_REST:-http://localhost:8081}"

# shellcheck source=../common.sh
source "$HERE/../common.sh"

# Beam options for the chosen submission path (the `flink` profile supplies the rest).
EXTRA=()
submit_args() {
  case "$QIS_SUBMIT" in
    uberjar)
      if [[ -n "${QIS_FLINK_JOB_SERVER_JAR:-}" ]]; then
        EXTRA=("--flink_job_server_jar=${QIS_FLINK_JOB_SERVER_JAR}")
      elif [[ ! -f "$HOME/.apache_beam/cache/jars/$JAR_NAME" ]]; then
        echo "note: $JAR_NAME not in ~/.apache_beam/cache/jars; Beam will try Maven Central" >&2
      fi
      ;;
    jobserver)
      EXTRA=(--runner=PortableRunner --job_endpoint=localhost:8099
        --artifact_endpoint=localhost:8098 "--flink_master=[auto]")
      ;;
    *)
      echo "QIS_SUBMIT must be uberjar or jobserver, not '$QIS_SUBMIT'" >&2
      exit 2
      ;;
  esac
}

data_path() {  # inputs and local outputs must live under the shared data directory
  case "$1" in
    gs://* | s3://* | hdfs://*) ;;
    "$QIS_DATA_DIR"/*) ;;
    *) echo "warning: $1 is outside QIS_DATA_DIR=$QIS_DATA_DIR; the workers cannot see it" >&2 ;;
  esac
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  up)
    mkdir -p "$QIS_DATA_DIR"
    QIS_DATA_DIR="$QIS_DATA_DIR" "${COMPOSE[@]}" up -d --build
    echo "Flink UI: $FLINK_REST  job server: localhost:8099  Kafka (host): localhost:29092"
    ;;
  topic)
    topic="${1:-qis-packets}"
    "${COMPOSE[@]}" exec kafka /opt/kafka/bin/kafka-topics.sh --bootstrap-server kafka:9092 \
      --create --if-not-exists --topic "$topic" --partitions 4 --replication-factor 1
    ;;
  backfill)
    [[ $# -ge 2 ]] || usage
    input="$1" output="$2"
    shift 2
    data_path "$input"
    data_path "$output"
    submit_args
    exec "${QIS[@]}" backfill --profile flink --input "$input" --output "$output" \
      --job_name=qis-backfill "${EXTRA[@]}" "$@"
    ;;
  run | resume)
    savepoint=()
    if [[ "$cmd" == resume ]]; then
      [[ $# -ge 1 ]] || usage
      savepoint=("--savepoint_path=$1")
      shift
    fi
    [[ $# -ge 2 ]] || usage
    topic="$1" output="$2"
    shift 2
    data_path "$output"
    submit_args
    # ReadFromKafka is expanded by the compose expansion service (see README.md).
    export QIS_KAFKA_EXPANSION_SERVICE
    exec "${QIS[@]}" run --profile flink --source kafka --input-topic "$topic" \
      --bootstrap-servers "$KAFKA_BOOTSTRAP" --output "$output" --job_name=qis-run \
      "${savepoint[@]}" "${EXTRA[@]}" "$@"
    ;;
  jobs)
    curl -fsS "$FLINK_REST/jobs/overview"
    echo
    ;;
  savepoint)
    [[ $# -eq 1 ]] || usage
    # Stop (not cancel) with a savepoint: sources stop, state is snapshotted, job finishes.
    "${COMPOSE[@]}" exec jobmanager flink stop --savepointPath file:///flink-data/savepoints "$1"
    ;;
  down)
    "${COMPOSE[@]}" down
    ;;
  help | -h | --help)
    usage 0
    ;;
  *)
    usage
    ;;
esac
