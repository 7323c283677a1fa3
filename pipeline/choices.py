"""The names that settings choose from, in one torch-free module.

Stage configs validate against these and the CLI lists them in ``--help`` without importing torch, zarr or dask;
the modules that implement each name import the tuple from here, so a new loss, tap or recipe is named once.
"""

from __future__ import annotations

# pooled feature taps (pipeline.models): which a model has is pipeline.models.supported_taps(model), and
# FeatureTaps refuses the others naming them; stage1..stage6 covers every family's stages (most have 4)
# stageK_pre: stage K before its final ReLU (DistPro's pathways); torchvision ResNets and MobileNetV2 only
TAPS = ("pre_relu", "post_relu", "pooled", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6",
        "stage1_pre", "stage2_pre", "stage3_pre", "stage4_pre", "stage5_pre", "stage6_pre")  # fmt: skip
EVAL_TAPS = ("pre_relu", "post_relu")  # the taps kdep eval extracts (post_relu is pooled for every model)
PROBE_BACKENDS = ("torch", "sklearn")  # kdep eval's logistic-regression solver (pipeline.evaluation.logistic)
# pipeline.student.losses (distpro: a searched process's pathways, pipeline.process)
LOSSES = ("kdep", "cosine", "coss", "coss-bn", "linear-pre", "linear-post", "distpro")
COSS_HEADS = ("mlp", "mlp-bn")  # CoSS student head when D_s != D_t (pipeline.student.losses.CossHead)
VIEW_POLICIES = ("walk", "random")  # how stage 3 picks an image's view per epoch (pipeline.student.pairs)
VIEW_RECIPES = ("paper", "kdep-reference", "coss", "center", "center-coss", "light")  # pipeline.data.views
CENTER_VIEWS = ("center", "center-coss")  # the deterministic centre-view recipes among VIEW_RECIPES
PROJECTION_METHODS = ("svd", "cs-var", "cs-rand", "interp")  # pipeline.projection.fit
PROJECTION_TRANSFORMS = ("pts", "sn", "sm", "sm-linear", "sm-rank", "sm-match", "none")  # projection.fit
AMP_MODES = ("auto", "bf16", "fp16", "off")  # autocast on CUDA (pipeline.runtime); CPU runs float32
DEVICES = ("auto", "cpu", "cuda")  # cuda:N is accepted where a stage takes a device
FEATURE_DTYPES = ("float16", "float32")  # stored feature dtype of the cache
OUT_OF_RANGE = ("error", "skip")  # features the stored dtype cannot hold: stop, or skip the image (counted)
# pipeline.student.training.lr_at: step (KDEP), per-epoch cosine, or cosine-coss (CoSS's reference code: the lr
# flat for 5 epochs, then the cosine)
LR_SCHEDULES = ("step", "cosine", "cosine-coss")
SEARCH_MODES = ("cached", "online")  # pathways over cached pooled taps, or over live spatial maps
PATHWAY_SETS = ("paper", "reference")  # pipeline.process.artefact.pathway_pairs
# auto: mlp (cached) or conv-reference (online, the official connector); conv: a lighter two-conv block
SEARCH_TRANSFORMS = ("auto", "mlp", "linear", "conv-reference", "conv")
# pipeline.process.blocks: the official hierarchical context loss, or plain MSE
PATHWAY_LOSSES = ("hcl", "mse")
STAGE_FEATURES = ("output", "pre_relu")  # pathways between stage outputs, or stages before their final ReLU
HYPERGRADIENTS = ("exact", "finite-difference")  # the alpha gradient: double backward, or DARTS' difference
# a retrain's pathway weights (pipeline.process.artefact.weight_rows): searched softmax, or the official scale
PROCESS_WEIGHTS = ("softmax", "reference")
SEARCH_OBJECTIVES = ("auto", "ce", "regress")  # auto: ce when the shards have 'cls' labels, else regress
SEARCH_LR_SCHEDULES = ("constant", "cosine", "step")  # network lr over the search steps (alpha's is constant)
# `kdep bench --scale-only`: the ImageNet-scale benches (benchmarks/scale_suite.py lists the module of each)
SCALE_BENCHES = ("cache", "eval", "make-shards", "startup", "neighbours")
