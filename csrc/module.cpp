// The Python module eit_fast._C: importing it loads this library, whose static initialisers register the
// ops (TORCH_LIBRARY). No pybind: the ops are reached through torch.ops.eit_fast. The module also says what
// the build contains (with_cuda, build_note), from the header setup.py writes.
#include <Python.h>

#include "eit_fast_build_info.h"

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "eit_fast's compiled ops", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddObjectRef(m, "with_cuda", EIT_FAST_BUILT_WITH_CUDA ? Py_True : Py_False) < 0 ||
      PyModule_AddStringConstant(m, "build_note", EIT_FAST_BUILD_NOTE) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
