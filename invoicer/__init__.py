"""The invoicer: billing periods, period close, invoice lines and documents.

See ``invoicer/README.md`` for what it owns and the rules it implements.
"""
