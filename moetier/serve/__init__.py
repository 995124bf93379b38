"""OpenAI-compatible HTTP server: `moetier serve` (see app.py)."""
