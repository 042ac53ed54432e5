"""Speech Pipe: give any text-only agent a voice, on the phone and in the browser."""
