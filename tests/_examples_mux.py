"""Sample calls of the mux ops (format: tests/_examples.py)."""
