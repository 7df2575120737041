"""Experiment configs: `get_config(arg)` in each file returns a locked ConfigDict."""
