#!/usr/bin/env bash
# Build and launch qis-beam's streaming job on Google Cloud Dataflow. See README.md here.
#
#   runners/dataflow/launch.sh image                 # build and push the launcher+worker image
#   runners/dataflow/launch.sh template              # write the flex-template spec to GCS
#   runners/dataflow/launch.sh run TOPIC OUTPUT [name=value ...]    # launch the flex template
#   runners/dataflow/launch.sh direct TOPIC OUTPUT [options...]     # launch from this machine
#   runners/dataflow/launch.sh dry-run TOPIC OUTPUT [options...]    # translate only, no GCP calls
#
# Required environment: PROJECT (GCP project id) and BUCKET (gs://bucket, no trailing slash)
# for everything but dry-run. Optional: REGION (us-central1), REPOSITORY (Artifact Registry
# docker repository, qis-beam), TAG (image tag, default: the checkout's commit, else dev),
# IMAGE (full image name), TEMPLATE (gs:// path of the template spec), QIS_BEAM (command).
# TOPIC is projects/<project>/topics/<topic>; OUTPUT is gs://.../dir.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
REGION="${REGION:-us-central1}"
REPOSITORY="${REPOSITORY:-qis-beam}"

# shellcheck source=../common.sh
source "$HERE/../common.sh"

need_gcp() {
  : "${PROJECT:?set PROJECT to the GCP project id}"
  : "${BUCKET:?set BUCKET to gs://<bucket> (staging, temp and the template spec live there)}"
  TAG="${TAG:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo dev)}"
  IMAGE="${IMAGE:-${REGION}-docker.pkg.dev/${PROJECT}/${REPOSITORY}/qis-beam:${TAG}}"
  TEMPLATE="${TEMPLATE:-${BUCKET}/templates/qis-beam-run-${TAG}.json}"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  image)
    need_gcp
    # One-time: gcloud artifacts repositories create "$REPOSITORY" --repository-format=docker \
    #             --location="$REGION"; gcloud auth configure-docker "${REGION}-docker.pkg.dev"
    docker build -f "$HERE/Dockerfile" -t "$IMAGE" "$ROOT"
    docker push "$IMAGE"
    echo "$IMAGE"
    ;;
  template)
    need_gcp
    gcloud dataflow flex-template build "$TEMPLATE" \
      --project "$PROJECT" \
      --image "$IMAGE" \
      --sdk-language PYTHON \
      --metadata-file "$HERE/metadata.json"
    echo "$TEMPLATE"
    ;;
  run)
    need_gcp
    [[ $# -ge 2 ]] || usage
    topic="$1" output="$2"
    shift 2
    params=("--parameters=input_topic=${topic}" "--parameters=output=${output}"
      "--parameters=sdk_container_image=${IMAGE}")
    for kv in "$@"; do params+=("--parameters=${kv}"); done
    # Streaming Engine, Runner v2, autoscaling and the region are also set by the `dataflow`
    # profile inside the launcher; the environment flags below win over it.
    gcloud dataflow flex-template run "qis-run-$(date +%Y%m%d-%H%M%S)" \
      --project "$PROJECT" \
      --region "$REGION" \
      --template-file-gcs-location "$TEMPLATE" \
      --temp-location "${BUCKET}/tmp" \
      --staging-location "${BUCKET}/staging" \
      --enable-streaming-engine \
      --additional-experiments use_runner_v2 \
      --max-workers 10 \
      "${params[@]}"
    ;;
  direct | dry-run)
    [[ $# -ge 2 ]] || usage
    topic="$1" output="$2"
    shift 2
    if [[ "$cmd" == dry-run ]]; then
      # DataflowRunner builds the whole job and stops before any call to Google Cloud.
      extra=(--dry_run=True "--project=${PROJECT:-dry-run-project}"
        "--temp_location=${BUCKET:-gs://dry-run-bucket}/tmp")
    else
      need_gcp
      # Workers install qis-beam from the image (same as the template) when IMAGE is built;
      # otherwise the profile's --setup_file stages an sdist of this checkout.
      extra=("--project=${PROJECT}" "--temp_location=${BUCKET}/tmp"
        "--staging_location=${BUCKET}/staging")
      if [[ "${USE_IMAGE:-1}" == 1 ]]; then
        extra+=("--sdk_container_image=${IMAGE}")
      fi
    fi
    exec "${QIS[@]}" run --profile dataflow --source pubsub --input-topic "$topic" \
      --output "$output" --job_name=qis-run "--region=${REGION}" "${extra[@]}" "$@"
    ;;
  help | -h | --help)
    usage 0
    ;;
  *)
    usage
    ;;
esac
