"""`ldm-serve`: the web page and the A1111-compatible HTTP API over one loaded model (see cli.py)."""
