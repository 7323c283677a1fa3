"""Stage 2 (fit-svd): projections fitted from the cache; its artefact module is `artefact`."""
