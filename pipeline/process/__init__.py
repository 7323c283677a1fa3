"""DistPro's distillation process: search alpha per (teacher stage -> student stage) pathway, save it, reuse it.

- :mod:`~pipeline.process.search`: the search model (student stages, blocks, softmax(alpha)), the architect, the loop.
- :mod:`~pipeline.process.blocks`: transform blocks (the official connector among them) and pathway losses (hcl, mse).
- :mod:`~pipeline.process.unrolled`: the alpha gradient through the virtual SGD step, exact or finite-difference.
- :mod:`~pipeline.process.artefact`: the process file (JSON): save, load, check against a pair, ``alpha_at``,
  ``kept_pathways``; what ``train-student --process`` reads.
- :mod:`~pipeline.process.online`: spatial stage maps of torchvision and timm models (online-teacher pathways).
- :mod:`~pipeline.process.batches`: search batches from a feature cache and its source shards, split by key hash.
- :mod:`~pipeline.process.plots`: alpha(t) per pathway (the appendix's Figs. 2-3).
"""
