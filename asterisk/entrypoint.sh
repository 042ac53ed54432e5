#!/bin/sh
# Speech Pipe - Asterisk container entrypoint: render the configuration, then run Asterisk in the foreground.
#
# Every *.conf in this folder is copied to /etc/asterisk. In pjsip.conf (the only template), each $-brace NAME
# is replaced by the environment variable NAME; a missing or empty one stops the container with a message
# saying which, so a password never silently becomes empty. The other files use ${...} for Asterisk's own
# variables and are copied as they are.
#
#   entrypoint.sh                      render into /etc/asterisk and exec asterisk
#   entrypoint.sh --render SRC DST     only render SRC/*.conf into DST (used by the tests)
set -eu

SRC=$(dirname "$0")
DST=/etc/asterisk
RUN=1
if [ "${1:-}" = "--render" ]; then
    SRC=$2
    DST=$3
    RUN=0
fi
TEMPLATES="pjsip.conf"

render() {  # $1 template, $2 output
    if ! awk '
    {
        out = ""; line = $0
        while (match(line, /\$\{[A-Za-z_][A-Za-z0-9_]*\}/)) {
            name = substr(line, RSTART + 2, RLENGTH - 3)
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

mkdir -p "$DST"
for src in "$SRC"/*.conf; do
    name=$(basename "$src")
    case " $TEMPLATES " in
        *" $name "*) render "$src" "$DST/$name" ;;
        *) cp "$src" "$DST/$name" ;;
    esac
done

[ "$RUN" = 1 ] || exit 0
if id asterisk >/dev/null 2>&1; then
    chown -R asterisk: "$DST" /var/lib/asterisk /var/log/asterisk /var/spool/asterisk /var/run/asterisk 2>/dev/null || true
    exec asterisk -f -vvv -U asterisk -G asterisk
fi
exec asterisk -f -vvv
