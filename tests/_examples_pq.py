"""Sample calls of the pq ops (format: tests/_examples.py)."""
