"""Metrics and the access log, fed from the finished `Call` at stage boundaries; never called by a stage's
logic."""
