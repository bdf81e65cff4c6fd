// The Python module tesloss._C (or, built just in time, the name the build gives it
// in TORCH_EXTENSION_NAME): importing it loads this library, which runs ops.cpp's
// registrations. It holds no functions, only the op's constants (tesloss._ops reads
// them) and how the CPU kernels were compiled.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/DynamicTypes.h>

#include <utility>

#include "kernels.h"
#include "params.h"

#ifndef TESLOSS_CPU_CAPABILITY_NAME
#define TESLOSS_CPU_CAPABILITY_NAME default
#endif
#define TESLOSS_STR_(x) #x
#define TESLOSS_STR(x) TESLOSS_STR_(x)
#define TESLOSS_PYINIT_(name) PyInit_##name
#define TESLOSS_PYINIT(name) TESLOSS_PYINIT_(name)

namespace {

// A tuple of n items, item(i) giving each as a new reference; nullptr, with the
// Python error set, if any of them fails.
template <typename Item>
PyObject* tuple_of(int n, Item&& item) {
  PyObject* tuple = PyTuple_New(n);
  for (int i = 0; tuple != nullptr && i < n; ++i) {
    PyObject* value = item(i);
    if (value == nullptr) {
      Py_CLEAR(tuple);
    } else {
      PyTuple_SET_ITEM(tuple, i, value);
    }
  }
  return tuple;
}

template <size_t N>
PyObject* names(const char* const (&items)[N]) {
  return tuple_of(N, [&](int i) { return PyUnicode_FromString(items[i]); });
}

// ((name, schema type), ...) of the parameters, in schema order.
PyObject* param_table() {
#define TESLOSS_PARAM_ROW(type, name, schema_type, ...) {#name, schema_type},
  constexpr std::pair<const char*, const char*> kRows[] = {
      TESLOSS_FOR_EACH_PARAM(TESLOSS_PARAM_ROW)};
#undef TESLOSS_PARAM_ROW
  return tuple_of(tesloss::kNumParams, [&](int i) {
    return Py_BuildValue("(ss)", kRows[i].first, kRows[i].second);
  });
}

// {logits dtype: value(dtype)} for every dtype the kernels take; value gives a
// new reference.
template <typename Value>
PyObject* by_dtype(Value&& value) {
  PyObject* dict = PyDict_New();
  for (const at::ScalarType t : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
    auto* key = reinterpret_cast<PyObject*>(torch::getTHPDtype(t));
    PyObject* item = value(t);
    if (item == nullptr || (dict != nullptr && PyDict_SetItem(dict, key, item) != 0)) {
      Py_CLEAR(dict);
    }
    Py_XDECREF(item);
  }
  return dict;
}

// {logits dtype: accumulation dtype}.
PyObject* accumulation_dtypes() {
  return by_dtype([](at::ScalarType t) {
    auto* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(tesloss::acc_scalar_type(t)));
    Py_INCREF(dtype);
    return dtype;
  });
}

// {logits dtype: the smallest tau the kernels take}.
PyObject* min_taus() {
  return by_dtype([](at::ScalarType t) { return PyFloat_FromDouble(tesloss::min_tau(t)); });
}

// Adds `value` (a new reference, or nullptr on failure) to the module as `name`.
bool add(PyObject* module, const char* name, PyObject* value) {
  if (value == nullptr) return false;
  if (PyModule_AddObject(module, name, value) != 0) {
    Py_DECREF(value);
    return false;
  }
  return true;
}

}  // namespace

extern "C" PyObject* TESLOSS_PYINIT(TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, TESLOSS_STR(TORCH_EXTENSION_NAME),
                                          nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  const bool ok =
      add(module, "row_stats", names(tesloss::kRowStatNames)) &&
      add(module, "batch_stats", names(tesloss::kBatchStatNames)) &&
      add(module, "reductions", names(tesloss::kReductionNames)) &&
      add(module, "params", param_table()) &&
      add(module, "accumulation_dtypes", accumulation_dtypes()) &&
      add(module, "min_tau", min_taus()) &&
      PyModule_AddStringConstant(module, "cpu_capability",
                                 TESLOSS_STR(TESLOSS_CPU_CAPABILITY_NAME)) == 0;
  if (!ok) Py_CLEAR(module);
  return module;
}
