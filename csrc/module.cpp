// The Python module `shvit_kernels._C`: empty on purpose. Importing it loads this shared library, whose
// static initializers register the `shvit::*` C++ ops with the dispatcher (see csrc/cpu/registration.cpp).
#include <Python.h>

static PyModuleDef shvit_module = {PyModuleDef_HEAD_INIT, "_C",
                                   "Registers the shvit::* C++ kernels with torch.ops on import.", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&shvit_module); }
