"""The one exception type for problems a user can fix."""


class MetricLabError(Exception):
    """A user-fixable problem; the message names the problem and the fix.

    The CLI and recipes turn it into one readable line and exit code 2; a traceback
    is shown only with ``--debug``.
    """
