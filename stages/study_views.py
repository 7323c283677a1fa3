"""`kdep study views` (make study): how many cached views per image match a fresh view every epoch?

    make study
    kdep study views --manifest manifests/study-views.yaml
    kdep study views --manifest manifests/study-views.yaml --seeds 5 --ks 1,4,8 --threads 1
    kdep study-views --out /tmp/study --epochs 4 --ks 1,2 --seeds 1 --val-per-class 50   # the same command

The study's steps, its table and its intervals live in ``studies/views.py``; it writes everything under OUT
(``data/``, ``teacher.pt``, ``cache/``, ``proj.npz``, ``students/``, ``eval/``, ``study.{json,csv,md,png}``).
"""

from __future__ import annotations

from stages.config import StudyViewsConfig


def run(config: StudyViewsConfig) -> dict:
    """The whole study (each finished step reused); returns the summary also written to OUT/study.json."""
    from studies import views

    return views.run(config)


def report(config: StudyViewsConfig, summary: dict) -> None:
    from studies import views

    views.report(config, summary)
