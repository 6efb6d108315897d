"""Validity checks (SPEC 6) and split separation by content (SPEC 2): what a method may never do, and
the probes that watch it."""
