"""Pictures: projections and plots of arrays (``plots``, ``projections``), and figures of runs (``figures``).

``plots`` and ``projections`` know nothing of runs and sit below training (the engine draws
``embedding.png`` with them); ``figures`` reads runs and sits above :mod:`metriclab.inference`.
"""
