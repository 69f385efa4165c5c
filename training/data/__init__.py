"""Training data: discovering labelled scans, patient-level splits, the decode cache, augmentation, the data module."""
