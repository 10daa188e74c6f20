"""gradfilter: per-example LoRA gradient norms and G-SNR data selection.

``import gradfilter`` needs only torch: no CUDA call, no Triton, no compiled
extension is touched until a backend is used.
"""

from gradfilter.method.ensemble import LoRAEnsemble
from gradfilter.norms.api import per_example_grad_norms

__version__ = "0.1.0"
__all__ = ["LoRAEnsemble", "per_example_grad_norms", "__version__"]
