"""The embedded demo: procedural labelled shards and a small labelled teacher (no download)."""
