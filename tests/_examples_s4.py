"""Sample calls of the s4 ops (format: tests/_examples.py)."""
