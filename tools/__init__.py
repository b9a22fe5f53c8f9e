"""Development tooling of the kdfast checkout (not part of the wheel: setup.py packages only
``kdfast``). Run from the checkout root, e.g. ``python -m tools.gpu.report``."""
