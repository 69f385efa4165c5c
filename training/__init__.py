"""LungViT training: datasets from labelled folders, patient-level splits, a preprocessing
cache, the Lightning module and data module, Ray Train jobs and the SQLite run store.

It reuses :mod:`lungvit.core`'s decoding, preprocessing and model; nothing here is imported
by ``lungvit.core``.
"""
