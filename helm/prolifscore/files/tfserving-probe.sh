#!/bin/bash
# Probes for TensorFlow Serving, which has no gRPC health service. Run by the kubelet inside the
# tensorflow/serving container (bash, no curl there): HTTP over bash's /dev/tcp to the REST API on
# 127.0.0.1:${REST_PORT}.
#   probe.sh ready    GetModelStatus (GET /v1/models/<name>) of every model: all AVAILABLE
#   probe.sh warmup   the same, plus one tiny Predict per model (first-request graph set-up is
#                     paid here, before the pod takes traffic); used by the startup probe
# Models are the arguments after the mode, e.g. `probe.sh ready resnet50 mitosis`.
set -u
REST_PORT="${REST_PORT:-8501}"
mode="$1"
shift

http() { # http METHOD PATH [BODY] -> response on stdout
  local body="${3:-}"
  exec 3<>"/dev/tcp/127.0.0.1/${REST_PORT}" || return 1
  printf '%s %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s' \
    "$1" "$2" "${#body}" "$body" >&3
  timeout 20 cat <&3
  exec 3>&-
}

status=0
for model in "$@"; do
  if ! http GET "/v1/models/${model}" | grep -q '"AVAILABLE"'; then
    echo "model ${model} is not AVAILABLE" >&2
    status=1
    continue
  fi
  if [ "$mode" = "warmup" ]; then
    # One 8x8 uint8 tile: the serving signature resizes and preprocesses it itself.
    row="[0,0,0],[0,0,0],[0,0,0],[0,0,0],[0,0,0],[0,0,0],[0,0,0],[0,0,0]"
    tile="[[${row}],[${row}],[${row}],[${row}],[${row}],[${row}],[${row}],[${row}]]"
    http POST "/v1/models/${model}:predict" "{\"inputs\":{\"tiles\":[${tile}]}}" \
      | grep -q '"outputs"' || echo "warm-up predict on ${model} failed (ignored)" >&2
  fi
done
exit "$status"
