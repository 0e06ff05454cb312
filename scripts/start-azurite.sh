#!/usr/bin/env bash
# Start Azurite (the Azure Storage emulator) for `func start`: AzureWebJobsStorage=UseDevelopmentStorage=true
# in local.settings.json points the Functions host at it (Event Hubs checkpoints, leases, timers).
#
#   scripts/start-azurite.sh            # blob 10000, queue 10001, table 10002; data in .azurite/
#   AZURITE_DIR=/tmp/az AZURITE_BLOB_PORT=20000 scripts/start-azurite.sh
#
# Uses the azurite that `make setup-dev` installs under .tools/, else one on PATH.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
program="$root/.tools/node_modules/.bin/azurite"
if [[ ! -x "$program" ]]; then
  program="$(command -v azurite || true)"
fi
if [[ -z "$program" ]]; then
  echo "error: azurite not found; run 'make setup-dev' (npm install --prefix .tools azurite@3) or 'npm install -g azurite'" >&2
  exit 1
fi
dir="${AZURITE_DIR:-$root/.azurite}"
mkdir -p "$dir"
blob="${AZURITE_BLOB_PORT:-10000}"
queue="${AZURITE_QUEUE_PORT:-10001}"
table="${AZURITE_TABLE_PORT:-10002}"
echo "azurite: blob 127.0.0.1:$blob, queue 127.0.0.1:$queue, table 127.0.0.1:$table, data in $dir (Ctrl-C to stop)" >&2
exec "$program" --silent --skipApiVersionCheck --location "$dir" --debug "$dir/debug.log" \
  --blobHost 127.0.0.1 --blobPort "$blob" \
  --queueHost 127.0.0.1 --queuePort "$queue" \
  --tableHost 127.0.0.1 --tablePort "$table"
