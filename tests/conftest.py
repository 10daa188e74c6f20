"""Shared pytest configuration."""

import os

# Never contact the Hugging Face Hub from the tests; must be set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
