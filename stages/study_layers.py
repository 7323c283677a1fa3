"""`kdep study layers` (make study-layers): does multi-layer KD (KDEP Table 7), or a searched DistPro process, beat
single-tap KDEP?

    make study-layers
    kdep study-layers --manifest manifests/study-layers.yaml
    kdep study-layers --manifest manifests/study-layers.yaml --seeds 5 --threads 1
    kdep study-layers --out /tmp/layers --epochs 2 --seeds 1 --val-per-class 5 --classes 4   # a quick look

The study's steps, its table and its intervals live in ``studies/layers.py``; it writes everything under OUT
(``data/``, ``teacher.pt``, ``cache/``, projections, ``process/``, ``students/``, ``eval/``, ``study.*``).
"""

from __future__ import annotations

from stages.config import StudyLayersConfig


def run(config: StudyLayersConfig) -> dict:
    """The whole study (each finished step reused); returns the summary also written to OUT/study.json."""
    from studies import layers

    return layers.run(config)


def report(config: StudyLayersConfig, summary: dict) -> None:
    from studies import layers

    layers.report(config, summary)
