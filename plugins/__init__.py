"""metriclab built-in plugins: encoders, losses, miners, datasets, optimizers and schedulers.

Installed as the package ``metriclab_plugins`` and loaded through the same entry point a
third-party plugin uses (``[project.entry-points."metriclab.plugins"]`` in pyproject.toml):
importing the submodules runs their ``@register_*`` decorators.
"""

from metriclab_plugins import datasets, encoders, losses, miners, optimizers, schedulers  # noqa: F401
