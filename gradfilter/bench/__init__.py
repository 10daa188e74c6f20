"""The offline selection-quality benchmark."""
