// Thin pybind11 layer over the weight-manager core; blocking calls drop the GIL.
// std::system_error becomes OSError(errno, message), so Python sees PermissionError,
// FileNotFoundError, ... like any other failed system call; a malformed safetensors
// file (FormatError) becomes ValueError naming the file and offset.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <system_error>

#include "mapped_file.h"
#include "pinning.h"
#include "prefetching.h"
#include "safetensors.h"
#include "weight_set.h"

namespace py = pybind11;
using release = py::call_guard<py::gil_scoped_release>;

namespace {

// The bytes of a C-contiguous buffer (an MLX array's memoryview); TypeError otherwise.
py::buffer_info contiguous(const py::buffer& b, bool writable) {
  py::buffer_info info = b.request(writable);
  py::ssize_t expect = info.itemsize;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] != 1 && info.strides[d] != expect) throw py::type_error("buffer is not C-contiguous");
    expect *= info.shape[d];
  }
  return info;
}

std::size_t nbytes(const py::buffer_info& info) { return static_cast<std::size_t>(info.size * info.itemsize); }

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "mlxpool native weight manager (safetensors mmap, prefetch, mlock, mincore)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::system_error& e) {
      PyErr_SetObject(PyExc_OSError, py::make_tuple(e.code().value(), e.what()).ptr());
    } catch (const mlxpool::FormatError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("page_size", &mlxpool::page_size, "The OS page size in bytes.");
  m.attr("MAX_PREFETCH_THREADS") = mlxpool::kMaxPrefetchThreads;
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
  // The buffer protocol exposes the whole mapping read-only (bytes), so numpy can view a
  // tensor in place and MLX copy it once from there; the view keeps the file (and so the
  // mapping) alive.
  py::class_<mlxpool::SafetensorsFile, std::shared_ptr<mlxpool::SafetensorsFile>>(m, "SafetensorsFile",
                                                                                   py::buffer_protocol())
      .def(py::init<const std::string&>(), py::arg("path"), release())
      .def_buffer([](const mlxpool::SafetensorsFile& f) {
        return py::buffer_info(const_cast<unsigned char*>(f.mapping()->data()), 1,
                               py::format_descriptor<unsigned char>::format(), 1,
                               {static_cast<py::ssize_t>(f.size())}, {static_cast<py::ssize_t>(1)}, true);
      })
      .def_property_readonly("path", &mlxpool::SafetensorsFile::path)
      .def_property_readonly("size", &mlxpool::SafetensorsFile::size)
      .def_property_readonly("metadata",
                             [](const mlxpool::SafetensorsFile& f) {
                               py::dict d;
                               for (const auto& [k, v] : f.metadata()) d[py::str(k)] = py::str(v);
                               return d;
                             })
      .def("tensors",
           [](const mlxpool::SafetensorsFile& f) {
             py::list out;
             for (const auto& t : f.tensors())
               out.append(py::make_tuple(t.name, t.dtype, t.shape, t.begin, t.nbytes()));
             return out;
           })
      .def("copy_to",
           [](const mlxpool::SafetensorsFile& f, std::size_t index, const py::buffer& dst) {
             py::buffer_info info = contiguous(dst, true);
             if (info.readonly) throw py::type_error("destination buffer is read-only");
             py::gil_scoped_release unlocked;
             f.copy_to(index, info.ptr, nbytes(info));
           },
           py::arg("index"), py::arg("dst"))
      .def("prefetch_range",
           [](const mlxpool::SafetensorsFile& f, std::size_t offset, std::size_t length) {
             return f.mapping()->prefetch_range(offset, length);
           },
           py::arg("offset"), py::arg("length"), release())
      .def("resident_bytes",
           [](const mlxpool::SafetensorsFile& f) {
             return f.size() == 0 ? 0 : mlxpool::resident_bytes(f.mapping()->data(), f.size());
           },
           release());
  py::class_<mlxpool::Prefetcher>(m, "Prefetcher")
      .def(py::init<std::size_t>(), py::arg("threads"))
      .def("submit",
           [](mlxpool::Prefetcher& p, const std::shared_ptr<mlxpool::SafetensorsFile>& f, std::size_t offset,
              std::size_t length) { p.submit(f->mapping(), offset, length); },
           py::arg("file"), py::arg("offset"), py::arg("length"))
      .def("wait", &mlxpool::Prefetcher::wait, release())
      .def("close", &mlxpool::Prefetcher::close, release())
      .def_property_readonly("threads", &mlxpool::Prefetcher::threads)
      .def_property_readonly("running", &mlxpool::Prefetcher::running)
      .def_property_readonly("bytes_done", &mlxpool::Prefetcher::bytes_done)
      .def_property_readonly("closed", &mlxpool::Prefetcher::closed);
  py::class_<mlxpool::PinSet>(m, "PinSet")
      .def(py::init<std::size_t>(), py::arg("budget_bytes"))
      .def("add",
           [](mlxpool::PinSet& s, const py::buffer& b) {
             py::buffer_info info = contiguous(b, false);
             py::gil_scoped_release unlocked;
             return s.add(info.ptr, nbytes(info));
           },
           py::arg("buffer"))
      .def("release", &mlxpool::PinSet::release, release())
      .def_property_readonly("bytes", &mlxpool::PinSet::bytes)
      .def_property_readonly("budget", &mlxpool::PinSet::budget)
      .def_property_readonly("spans", &mlxpool::PinSet::spans)
      .def("resident_bytes", &mlxpool::PinSet::resident_bytes, release());
  m.def(
      "resident_bytes",
      [](const py::buffer& b) {
        py::buffer_info info = contiguous(b, false);
        py::gil_scoped_release unlocked;
        return mlxpool::resident_bytes(info.ptr, nbytes(info));
      },
      py::arg("buffer"), "Bytes of the buffer's pages in memory now (mincore).");
}
