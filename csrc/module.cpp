// Python module stub for the gradfilter C++ extension.
//
// The ops register themselves with the torch dispatcher (TORCH_LIBRARY) when
// the shared library is loaded and are called through torch.ops.gradfilter_cpp;
// this file only gives the library the PyInit_<name> entry point that
// `import` needs, so that the extension loads as a Python module without
// pybind11.  TORCH_EXTENSION_NAME is set by the build: "gradfilter_cpp" for the
// just-in-time build (gradfilter/_ext.py), "_C" for setup.py's gradfilter._C.

#include <Python.h>

#ifndef TORCH_EXTENSION_NAME
#error "TORCH_EXTENSION_NAME must be defined by the build"
#endif

#define GF_STR_(x) #x
#define GF_STR(x) GF_STR_(x)
#define GF_CAT_(a, b) a##b
#define GF_CAT(a, b) GF_CAT_(a, b)

PyMODINIT_FUNC GF_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      GF_STR(TORCH_EXTENSION_NAME),
      "gradfilter C++ CPU ops; call them through torch.ops.gradfilter_cpp.",
      -1,       // m_size: no per-module state
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module_def);
}
