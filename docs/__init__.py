"""The documentation: hand-written pages and the generator of their tables of figures (`python -m docs.generate`)."""
