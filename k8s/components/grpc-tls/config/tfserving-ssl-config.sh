#!/bin/bash
# Writes TF Serving's --ssl_config_file (a text SSLConfig: server_key, server_cert, custom_ca,
# client_verify). TF Serving wants the PEM texts inside that file, not paths, so an init container
# builds it from the mounted certificate Secret into a memory-backed emptyDir.
#   tfserving-ssl-config.sh <dir with tls.crt, tls.key, ca.crt> <output file>
# With ca.crt present, client_verify is on: only clients with a certificate of that CA connect.
set -euo pipefail
src="$1"
out="$2"

quote() { # a file's text as a protobuf text-format string
  local text
  text="$(<"$1")"
  text="${text//\\/\\\\}"
  text="${text//\"/\\\"}"
  text="${text//$'\n'/\\n}"
  printf '"%s\\n"' "$text"
}

{
  printf 'server_key: %s\n' "$(quote "$src/tls.key")"
  printf 'server_cert: %s\n' "$(quote "$src/tls.crt")"
  if [ -s "$src/ca.crt" ]; then
    printf 'custom_ca: %s\n' "$(quote "$src/ca.crt")"
    printf 'client_verify: true\n'
  fi
} >"$out.tmp"
chmod 0400 "$out.tmp"
mv "$out.tmp" "$out"
