"""The composition root: the ``meterline`` console script, settings and wiring."""
