"""kdep-cache library: shards, views and replay, models and taps, the feature store, projections, losses, training."""

__version__ = "0.1.0"
