"""Rows in and out (formats, statuses), prompts and masking, and model loading."""
