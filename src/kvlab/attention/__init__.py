"""Attention techniques, one file each. Every non-underscore file here registers a technique
(spec + module + cache layer + planner rule); ``kvlab.registry`` imports them all on first use."""
