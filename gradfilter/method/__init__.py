"""The GradFiltering method: the LoRA ensemble, the frozen-prefix cache, the
G-SNR formulas, the data schedule and the baseline selectors."""
