"""Benchmarks: the papers' accuracy tables and serving speed (``mnemo bench``)."""
