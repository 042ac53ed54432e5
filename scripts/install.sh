#!/usr/bin/env bash
# Installs everything Speech Pipe needs on Debian 12: system packages, a virtualenv in .venv with the
# product and its engines, and (with --dev) the test tools. Idempotent: re-running only fills gaps.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

# System packages: the TTS engine, audio tools, SQLite shell; for tests also the SIP peers, Chromium and
# real recorded speech.
apt_pkgs=(espeak-ng sox libsndfile1 sqlite3 python3-venv ca-certificates)
# asterisk-core-sounds-*: real recorded human speech with transcripts, the tests' development set.
[ $dev = 1 ] && apt_pkgs+=(baresip sip-tester chromium iproute2 postgresql-client redis-tools
                           asterisk-core-sounds-en asterisk-core-sounds-en-g722)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The server extra is what `serve` needs; a runner machine only needs `pip install speechpipe`.
if [ $dev = 1 ]; then
  .venv/bin/python -m pip install -q -e '.[server,dev]'
else
  .venv/bin/python -m pip install -q -e '.[server]'
fi
