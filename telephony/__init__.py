"""Front ends: wire codecs (sans-I/O) and their asyncio adapters, plus the audio path."""
