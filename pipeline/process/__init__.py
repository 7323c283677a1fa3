"""DistPro's distillation process: search alpha per (teacher stage -> student stage) pathway, save it, reuse it.

- :mod:`~pipeline.process.search`: pathways, transform blocks, softmax(alpha), DARTS' unrolled alpha step, the loop.
- :mod:`~pipeline.process.artefact`: the process file (JSON): save, load, check against a pair, ``alpha_at``,
  ``kept_pathways``; what ``train-student --process`` reads.
- :mod:`~pipeline.process.online`: spatial stage maps of torchvision and timm models (online-teacher pathways).
- :mod:`~pipeline.process.batches`: search batches from a feature cache and its source shards, split by key hash.
- :mod:`~pipeline.process.plots`: alpha(t) per pathway (the appendix's Figs. 2-3).
"""
