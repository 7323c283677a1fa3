"""Studies: experiments that run the stages many times and answer one question with seed intervals.

``views`` (``kdep study views``): cached views vs online distillation; ``layers`` (``kdep study layers``):
single-tap vs multi-layer KDEP vs DistPro; ``common``: the steps they share; ``views_table`` and ``arm_table``:
their tables and plots. The entry points are ``stages/study_views.py`` and ``stages/study_layers.py``.
"""
