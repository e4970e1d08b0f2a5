"""Entry points of itop_dist: command-line tools, configuration and launch helpers."""
