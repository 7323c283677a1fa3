"""Stage 1 (cache-teacher): the teacher over K views per image into the Zarr feature store. Later stages import
only its artefact modules: ``store`` (the format) and ``join`` (a sample back to its cached row, the source shards,
the recorded teacher)."""
