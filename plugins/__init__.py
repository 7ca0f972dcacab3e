"""metriclab built-in plugins: encoders, losses, miners, datasets, optimizers, samplers, transforms and schedulers.

Installed as the package ``metriclab_plugins`` and loaded through the same entry-point group a
third-party plugin uses (``[project.entry-points."metriclab.plugins"]`` in pyproject.toml): one entry
point per module, named after the kind it registers (``encoders = "metriclab_plugins.encoders"``), so a
kind's module is imported, running its ``@register_*`` decorators, when that kind is first looked up.
Rebuilding a trained encoder (``metriclab embed``) thus never imports pytorch-metric-learning for the losses.
"""
