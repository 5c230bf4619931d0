// The extension module holds no Python functions: importing it runs the
// static registrations of the bnext operator library. Every kernel is
// reached through torch.ops.bnext.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(bnext, m) {}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
