"""Learning: the Lightning module, the fit pipeline, optimizer groups, metrics, calibration,
transfer, comparison, the OOD fit."""
