"""Reliability suite: bad input, faults (kill, Ctrl-C, NaN, a failing process) and what is trusted."""
