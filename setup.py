"""Build hook.  ``pyproject.toml`` holds all metadata; this file only exists to
build the optional C++ CPU extension from ``csrc/`` when its sources are
present and ``GRADFILTER_BUILD_EXT=1`` is set.  Without it gradfilter runs on
its plain-PyTorch reference backend."""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("GRADFILTER_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "gradfilter._C",
            sources,
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
