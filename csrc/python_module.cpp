// The Python extension module transformer_kernels._C. Importing it loads this shared library,
// whose static TORCH_LIBRARY registrations make the ops available as torch.ops.tk_C.*; the module
// itself only carries CUDA_ARCHS, the architectures it was compiled for (e.g. ["8.0", "9.0"]).
// Not part of the CMake library, which is loaded with torch.ops.load_library instead.

#include <Python.h>

// setup.py passes -DTK_CUDA_ARCHS=8.0,9.0 (a comma list, so it survives the shell unquoted).
#define TK_STRINGIFY(...) #__VA_ARGS__
#define TK_EXPAND_STRINGIFY(...) TK_STRINGIFY(__VA_ARGS__)
#ifdef TK_CUDA_ARCHS
#define TK_CUDA_ARCHS_STRING TK_EXPAND_STRINGIFY(TK_CUDA_ARCHS)
#else
#define TK_CUDA_ARCHS_STRING ""
#endif

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                                // m_name
      "Registers the transformer_kernels CUDA ops under torch.ops.tk_C.",  // m_doc
      -1,                                                                  // m_size
      nullptr,                                                             // m_methods
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyObject* archs = nullptr;
  if (TK_CUDA_ARCHS_STRING[0] == '\0') {
    archs = PyList_New(0);
  } else {
    PyObject* joined = PyUnicode_FromString(TK_CUDA_ARCHS_STRING);
    PyObject* comma = PyUnicode_FromString(",");
    if (joined != nullptr && comma != nullptr) archs = PyUnicode_Split(joined, comma, -1);
    Py_XDECREF(joined);
    Py_XDECREF(comma);
  }
  // PyModule_AddObject steals the reference only on success.
  if (archs == nullptr || PyModule_AddObject(module, "CUDA_ARCHS", archs) < 0) {
    Py_XDECREF(archs);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
