"""The LungViT web app (``lungvit-app``): predict, explain, fine-tune and manage models.

:func:`lungvit.app.ui.build_app` builds the Gradio Blocks; :func:`lungvit.app.main.main`
parses the command line, checks that the server is safe to expose and launches it.
Handlers are thin: they call :mod:`lungvit.core` for scans, predictions and explanations,
and talk to training only through the store and the job launcher.
"""
