"""``python -m metriclab``: the ``metriclab`` command line."""

from metriclab.cli import app

if __name__ == "__main__":
    app(prog_name="metriclab")
