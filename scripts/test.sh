#!/usr/bin/env bash
# Installs what the tests need (system packages, .venv with the dev extras), makes sure the local
# PostgreSQL and Redis are up, then runs ruff and the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh --dev

# The tests use the machine's PostgreSQL (127.0.0.1:5432, database "test") and Redis (127.0.0.1:6379).
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  echo "PostgreSQL is not answering on 127.0.0.1:5432; starting the local cluster"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "Redis is not answering on 127.0.0.1:6379; starting it"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi

.venv/bin/ruff check .
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
