"""Speech-to-text engines behind one interface."""
