"""Experiments run with focal_cuda's losses (``python -m focal_cuda.experiments.<name>``)."""
