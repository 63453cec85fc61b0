"""Pieces every component shares: errors, tokens, the HTTP service frame."""
