"""Web sessions: the client WebSocket edge, the browser SDK and the test page."""
