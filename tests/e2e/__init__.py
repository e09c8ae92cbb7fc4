"""Every role as its own process, end to end (marked slow)."""
