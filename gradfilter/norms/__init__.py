"""The per-example gradient-norm engine.

``api.per_example_grad_norms`` is the entry point: one forward and one backward
give every example's gradient norm.  ``engine`` records layer inputs and output
gradients, ``layers`` holds the per-layer rules, ``ops`` is the one seam that
picks the backend and the route (Triton in ``gradfilter.kernels``, C++ via
``_ext``, or the plain-PyTorch twins in ``reference``), ``fused`` computes the
norms inside a training backward, and ``oracles`` holds the independent
per-example implementations (loop, ``torch.func``, Opacus, the last from
``oracles_opacus``) used as test oracles and benchmark baselines.  ``cli`` holds
the ``demo`` and ``norms`` commands.
"""
