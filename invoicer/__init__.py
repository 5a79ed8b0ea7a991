"""The invoicer: billing periods, period close, invoice lines and documents."""
