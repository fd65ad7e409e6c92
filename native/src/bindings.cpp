// Thin pybind11 layer over the weight-manager core; blocking calls drop the GIL.
#include <pybind11/pybind11.h>

#include "mapped_file.h"

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  m.doc() = "mlxpool native weight manager (mmap core)";
  m.def("page_size", &mlxpool::page_size, "The OS page size in bytes.");
  py::class_<mlxpool::MappedFile>(m, "MappedFile")
      .def(py::init<const std::string&>(), py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("size", &mlxpool::MappedFile::size)
      .def_property_readonly("path", &mlxpool::MappedFile::path)
      .def("prefetch", &mlxpool::MappedFile::prefetch, py::call_guard<py::gil_scoped_release>())
      .def("touch", &mlxpool::MappedFile::touch, py::call_guard<py::gil_scoped_release>());
}
