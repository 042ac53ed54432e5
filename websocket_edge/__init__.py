"""Web sessions: the client WebSocket edge, the browser SDK and the test page."""

from speechpipe.extras import require_server

require_server(__name__, ("numpy", "prometheus_client", "sqlalchemy"))
