#!/bin/sh
# Speech Pipe - render the Asterisk configuration in this folder, then (in the container) run Asterisk.
#
# Every *.conf in this folder is copied to the destination; two are filled in from the environment:
#
#   pjsip.conf       each $-brace NAME is replaced by the environment variable NAME, and the line
#                    `;@speechpipe-workers@` becomes one endpoint + aor per media worker: speechpipe-w0 ..
#                    speechpipe-w(N-1), worker i at sip:speechpipe@SPEECHPIPE_SIP_HOST:(SPEECHPIPE_SIP_PORT_BASE+i)
#   extensions.conf  each @NAME@ is replaced (this file keeps $-brace for Asterisk's own variables): the
#                    [globals] the hunt reads, so the hunt covers exactly the workers pjsip.conf has
#
# A missing or empty variable stops the render with a message naming it (a password never silently
# becomes empty, the hunt never silently shrinks to one worker). SPEECHPIPE_SIP_PORT_BASE defaults to 5080,
# as in Speech Pipe itself; SPEECHPIPE_SIP_WORKERS has no default: set it to what `speechpipe serve` runs.
#
#   entrypoint.sh                      render into /etc/asterisk and exec asterisk (the container)
#   entrypoint.sh --render SRC DST     only render SRC/*.conf into DST (a native install: DST=/etc/asterisk,
#                                      or wherever your asterisk.conf's astetcdir points)
#
# Environment for the container run: ASTERISK_ETC (default /etc/asterisk), ASTERISK_BIN (default asterisk).
set -eu

SRC=$(dirname "$0")
DST=${ASTERISK_ETC:-/etc/asterisk}
RUN=1
if [ "${1:-}" = "--render" ]; then
    if [ $# -ne 3 ]; then
        echo "usage: $0 --render SRC_DIR DST_DIR" >&2
        exit 2
    fi
    SRC=$2
    DST=$3
    RUN=0
fi
TEMPLATES="pjsip.conf extensions.conf"
: "${SPEECHPIPE_SIP_PORT_BASE:=5080}"
export SPEECHPIPE_SIP_PORT_BASE

fail() {
    echo "speechpipe-asterisk: $*" >&2
    exit 1
}

case "${SPEECHPIPE_SIP_WORKERS:-}" in
    "") fail "environment variable SPEECHPIPE_SIP_WORKERS is not set: set it to the number of media workers" \
             "speechpipe serve runs (the same SPEECHPIPE_SIP_WORKERS), so the hunt covers them all" ;;
    *[!0-9]*) fail "SPEECHPIPE_SIP_WORKERS must be a whole number, got '$SPEECHPIPE_SIP_WORKERS'" ;;
esac
[ "$SPEECHPIPE_SIP_WORKERS" -ge 1 ] && [ "$SPEECHPIPE_SIP_WORKERS" -le 64 ] \
    || fail "SPEECHPIPE_SIP_WORKERS must be between 1 and 64, got $SPEECHPIPE_SIP_WORKERS"
case "$SPEECHPIPE_SIP_PORT_BASE" in
    ""|*[!0-9]*) fail "SPEECHPIPE_SIP_PORT_BASE must be a port number, got '$SPEECHPIPE_SIP_PORT_BASE'" ;;
esac
[ $((SPEECHPIPE_SIP_PORT_BASE + SPEECHPIPE_SIP_WORKERS)) -le 65536 ] \
    || fail "SPEECHPIPE_SIP_PORT_BASE + SPEECHPIPE_SIP_WORKERS runs past port 65535"

render() {  # $1 template, $2 output, $3 placeholder style: dollar | at
    if ! awk -v style="$3" '
    function worker_sections(    i, n, base) {
        n = ENVIRON["SPEECHPIPE_SIP_WORKERS"] + 0; base = ENVIRON["SPEECHPIPE_SIP_PORT_BASE"] + 0
        print "; " n " media workers (SPEECHPIPE_SIP_WORKERS), ports " base ".." base + n - 1 \
              " (SPEECHPIPE_SIP_PORT_BASE): rendered by asterisk/entrypoint.sh"
        for (i = 0; i < n; i++) {
            print "[speechpipe-w" i "](speechpipe-worker)"
            print "aors=speechpipe-w" i
            print "[speechpipe-w" i "](speechpipe-worker-aor)"
            print "contact=sip:speechpipe@" ENVIRON["SPEECHPIPE_SIP_HOST"] ":" base + i
            print ""
        }
    }
    {
        if ($0 == ";@speechpipe-workers@") {
            if (!("SPEECHPIPE_SIP_HOST" in ENVIRON) || ENVIRON["SPEECHPIPE_SIP_HOST"] == "") {
                printf "speechpipe-asterisk: environment variable SPEECHPIPE_SIP_HOST is not set (needed by %s)\n", FILENAME > "/dev/stderr"
                bad = 1
            }
            worker_sections()
            next
        }
        rx = style == "at" ? "@[A-Za-z_][A-Za-z0-9_]*@" : "\\$\\{[A-Za-z_][A-Za-z0-9_]*\\}"
        skip = style == "at" ? 1 : 2
        out = ""; line = $0
        while (match(line, rx)) {
            name = substr(line, RSTART + skip, RLENGTH - skip - 1)
            if (!(name in ENVIRON) || ENVIRON[name] == "") {
                printf "speechpipe-asterisk: environment variable %s is not set (needed by %s)\n", name, FILENAME > "/dev/stderr"
                bad = 1
            }
            out = out substr(line, 1, RSTART - 1) ENVIRON[name]
            line = substr(line, RSTART + RLENGTH)
        }
        print out line
    }
    END { exit bad }' "$1" > "$2.tmp"; then
        rm -f "$2.tmp"
        exit 1
    fi
    chmod 640 "$2.tmp"
    mv "$2.tmp" "$2"
}

[ -f "$SRC/pjsip.conf" ] || fail "no pjsip.conf in $SRC (give the repository's asterisk/ folder as SRC)"
mkdir -p "$DST"
# Render everything into a scratch folder first: a failed render leaves DST as it was, never half-updated.
STAGE=$(mktemp -d "$DST/.speechpipe-render.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
for src in "$SRC"/*.conf; do
    name=$(basename "$src")
    case "$name" in
        pjsip.conf) render "$src" "$STAGE/$name" dollar ;;
        extensions.conf) render "$src" "$STAGE/$name" at ;;
        *) cp "$src" "$STAGE/$name" ;;
    esac
done
for out in "$STAGE"/*.conf; do
    mv -f "$out" "$DST/$(basename "$out")"
done
echo "speechpipe-asterisk: rendered $TEMPLATES into $DST for $SPEECHPIPE_SIP_WORKERS media worker(s) at" \
     "${SPEECHPIPE_SIP_HOST}:${SPEECHPIPE_SIP_PORT_BASE}.." >&2

[ "$RUN" = 1 ] || exit 0
ASTERISK_BIN=${ASTERISK_BIN:-asterisk}
set --  # Asterisk's own arguments: -C only for a folder other than its built-in one that has asterisk.conf
if [ -n "${ASTERISK_ETC:-}" ] && [ -f "$DST/asterisk.conf" ]; then
    set -- -C "$DST/asterisk.conf"
fi
if id asterisk >/dev/null 2>&1; then
    chown -R asterisk: "$DST" /var/lib/asterisk /var/log/asterisk /var/spool/asterisk /var/run/asterisk 2>/dev/null || true
    exec "$ASTERISK_BIN" "$@" -f -vvv -U asterisk -G asterisk
fi
exec "$ASTERISK_BIN" "$@" -f -vvv
