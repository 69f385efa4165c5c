"""The model: network, checkpoints, the reference-checkpoint importer, preprocessing, card, out-of-scope detector."""
