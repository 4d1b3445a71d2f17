// The Python module `fastl2r._C`: importing it loads this library, whose static initialisers
// declare the fastl2r:: operators (csrc/<op>/schema.cpp, with their Meta kernels) and register
// their CPU kernels (csrc/<op>/cpu.cpp).  The CUDA kernels live in `fastl2r._C_cuda`
// (cuda_module.cpp).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "The fastl2r:: operators (CPU kernels).", -1,
                               nullptr};
  return PyModule_Create(&module);
}
