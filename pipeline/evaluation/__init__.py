"""Stage 4 (eval): frozen-backbone features, probes, k-NN, fine-tuning and agreement."""
