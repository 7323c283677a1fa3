"""Shards, the tar reader, the one decoder, view parameters and the one replay function: what every stage reads."""
