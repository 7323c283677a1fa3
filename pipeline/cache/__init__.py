"""Stage 1 (cache-teacher): the teacher over K views per image into the Zarr feature store; its artefact module is `store`."""
