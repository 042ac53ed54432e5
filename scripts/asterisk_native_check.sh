#!/bin/sh
# Check a native Asterisk that runs Speech Pipe's rendered configuration (docs/telephony.md, "Native
# Asterisk", step 6). Uses only the Asterisk you installed and started; changes nothing.
#
#   sh scripts/asterisk_native_check.sh [ASTERISK_ETC]      (default /etc/asterisk)
#
# Environment: the same speechpipe-sip.env as `serve` (SPEECHPIPE_SIP_WORKERS, SPEECHPIPE_SIP_PORT_BASE);
# ASTERISK_BIN (default: asterisk on PATH), PYTHON (default: the repository's .venv, else python3).
# Exit 0 when every check passes; each failure prints a line starting with "FAIL".
set -u
ETC=${1:-/etc/asterisk}
AST=${ASTERISK_BIN:-asterisk}
VENV_PY=$(dirname "$0")/../.venv/bin/python
PY=${PYTHON:-$( [ -x "$VENV_PY" ] && echo "$VENV_PY" || echo python3 )}
bad=0
ok() { echo "ok    $*"; }
fail() { echo "FAIL  $*"; bad=1; }
rx() { "$AST" -rx "$1" 2>/dev/null; }

version=$(rx "core show version") || true
case "$version" in
    Asterisk*) ok "running: $(echo "$version" | cut -d' ' -f1-2)" ;;
    *) echo "FAIL  no running Asterisk answers '$AST -rx' (start it, or set ASTERISK_BIN)"; exit 1 ;;
esac
"$PY" -m speechpipe.telephony.pbx_check "$ETC" && ok "rendered $ETC matches SPEECHPIPE_SIP_WORKERS / _PORT_BASE" \
    || fail "the rendered configuration in $ETC and this environment disagree (see above)"
for mod in chan_pjsip res_pjsip_header_funcs codec_g722 codec_ulaw codec_alaw app_dial app_echo func_rand; do
    rx "module show like $mod" | grep -q "^$mod\.so" && ok "module $mod" || fail "module $mod is not loaded"
done
workers=$(rx "dialplan show globals" | sed -n 's/.*SPEECHPIPE_SIP_WORKERS=\([0-9]*\).*/\1/p')
[ -n "$workers" ] && ok "dialplan hunts over $workers worker(s)" \
    || fail "no SPEECHPIPE_SIP_WORKERS global in the loaded dialplan (dialplan reload?)"
i=0
while [ -n "$workers" ] && [ "$i" -lt "$workers" ]; do
    state=$(rx "pjsip show contacts" | awk -v a="speechpipe-w$i/" 'index($2, a) == 1 {print $4}')
    [ "$state" = "Avail" ] && ok "speechpipe-w$i reachable (OPTIONS answered)" \
        || fail "speechpipe-w$i is '${state:-missing}': is speechpipe serve running with its workers up?"
    i=$((i + 1))
done
exit $bad
