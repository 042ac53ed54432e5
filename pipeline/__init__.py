"""The speech pipeline both transports share: VAD, STT, endpointing, barge-in, TTS, recording."""

from speechpipe.extras import require_server

require_server(__name__, ("numpy", "soxr"))
