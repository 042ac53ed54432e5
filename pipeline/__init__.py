"""The speech pipeline both transports share: VAD, STT, endpointing, barge-in, TTS, recording."""
