"""kdep-cache library, laid out as the data flows (README "Code layout").

``data/`` (shards, tar reader, decoder, view parameters, the one replay) feeds every stage; ``cache/`` is stage 1
(its artefact modules ``store`` and ``join`` are what later stages read), ``projection/`` stage 2 (artefact:
``artefact``), ``student/`` stage 3, ``evaluation/`` stage 4, ``demo/`` the embedded demo. The top-level modules
are shared: errors, manifest, choices, provenance, models, runtime (torch.distributed + AMP), files (atomic
writes, hashing) and progress. A stage package imports only ``data/``, the shared modules and an earlier stage's
artefact modules (tests/test_layout.py checks it).
"""

__version__ = "0.1.0"
