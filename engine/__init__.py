"""Speech-to-text engines behind one interface (see engine.base)."""
