"""Synthetic data and reference code for tests, benchmarks and the demo: phantom scans
(:mod:`~lungvit.synthetic.phantoms`), phantom files in every format LungViT reads
(:mod:`~lungvit.synthetic.phantom_files`), the DICOM and JPEG-lossless writers they use, and
the reference-design model (:mod:`~lungvit.synthetic.reference_model`).

Nothing here serves a user's scans: ``lungvit demo-data`` writes phantoms with it, and the
tests and benchmarks use it. It imports ``lungvit.core``; core never imports it.
"""
