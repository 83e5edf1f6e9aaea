"""Shards: write (prepare), list and stream. Ranks and seeds arrive as arguments."""
