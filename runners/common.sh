# Sourced by the deployment kits' scripts (runners/*/*.sh): what they share.
# QIS: the qis-beam command (QIS_BEAM, else qis-beam on PATH, else python -m qis_beam.cli).
if [[ -n "${QIS_BEAM:-}" ]]; then
  read -r -a QIS <<<"$QIS_BEAM"
elif command -v qis-beam >/dev/null 2>&1; then
  QIS=(qis-beam)
else
  QIS=(python -m qis_beam.cli)
fi

# Print the calling script's header comment (its usage) and exit with $1 (default 2).
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-2}"
}
