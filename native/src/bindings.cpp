// Thin pybind11 layer over the weight-manager core; blocking calls drop the GIL.
// std::system_error becomes OSError(errno, message), so Python sees PermissionError,
// FileNotFoundError, ... like any other failed system call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <system_error>

#include "mapped_file.h"
#include "weight_set.h"

namespace py = pybind11;
using release = py::call_guard<py::gil_scoped_release>;

PYBIND11_MODULE(_native, m) {
  m.doc() = "mlxpool native weight manager (mmap, prefetch, mlock, mincore)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::system_error& e) {
      PyErr_SetObject(PyExc_OSError, py::make_tuple(e.code().value(), e.what()).ptr());
    }
  });
  m.def("page_size", &mlxpool::page_size, "The OS page size in bytes.");
  py::class_<mlxpool::MappedFile>(m, "MappedFile")
      .def(py::init<const std::string&>(), py::arg("path"), release())
      .def_property_readonly("size", &mlxpool::MappedFile::size)
      .def_property_readonly("path", &mlxpool::MappedFile::path)
      .def_property_readonly("locked", &mlxpool::MappedFile::locked)
      .def("prefetch", &mlxpool::MappedFile::prefetch, release())
      .def("touch", &mlxpool::MappedFile::touch, release())
      .def("lock", &mlxpool::MappedFile::lock, release())
      .def("unlock", &mlxpool::MappedFile::unlock, release())
      .def("pages", &mlxpool::MappedFile::pages)
      .def("resident_pages", &mlxpool::MappedFile::resident_pages, release());
  py::class_<mlxpool::WeightSet>(m, "WeightSet")
      .def(py::init<const std::vector<std::string>&>(), py::arg("paths"), release())
      .def_property_readonly("size", &mlxpool::WeightSet::size)
      .def_property_readonly("files", &mlxpool::WeightSet::files)
      .def_property_readonly("locked", &mlxpool::WeightSet::locked)
      .def("prefetch", &mlxpool::WeightSet::prefetch, release())
      .def("touch", &mlxpool::WeightSet::touch, release())
      .def("lock", &mlxpool::WeightSet::lock, release())
      .def("unlock", &mlxpool::WeightSet::unlock, release())
      .def("resident_fraction", &mlxpool::WeightSet::resident_fraction, release());
}
