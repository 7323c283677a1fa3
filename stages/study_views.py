"""`kdep study views` (make study): is a student distilled from k cached views as good as one distilled online?

    make study
    kdep study views --manifest manifests/study-views.yaml
    kdep study views --manifest manifests/study-views-gpu.yaml     # --device cuda, sized for ~10 min on one GPU
    kdep study views --manifest manifests/study-views.yaml --seeds 8 --ks 1,4,16   # finished students are reused
    kdep study-views --out /tmp/study --epochs 4 --views 2 --ks 1,2 --seeds 2 --val-per-class 50   # a quick look

Online KD on fresh views against the first k views of one cache, paired seeds, a random-init and a teacher
reference row; the steps, the table, the intervals and the verdict live in ``studies/views.py``. Writes under OUT
``data/``, ``teacher.pt``, ``cache/``, ``proj.npz``, ``students/``, ``eval/`` and ``study.{json,csv,md,png}``.
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
