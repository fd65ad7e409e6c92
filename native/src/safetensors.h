// A safetensors file memory-mapped and its header parsed natively: the tensor table
// (name, dtype, shape, byte range) that the loader hands to MLX. Every malformed or
// truncated input throws FormatError naming the file and the byte offset where the
// problem is; nothing past the mapping is ever read. Sizes have limits (header bytes,
// tensors, dimensions, nesting) so a hostile file cannot make us allocate without bound.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mapped_file.h"

namespace mlxpool {

class FormatError : public std::runtime_error {
 public:
  FormatError(const std::string& path, std::size_t offset, const std::string& what);
  std::size_t offset() const { return offset_; }

 private:
  std::size_t offset_;
};

struct TensorInfo {
  std::string name;
  std::string dtype;  // as in the file: F32, BF16, ...
  std::vector<std::int64_t> shape;
  std::size_t begin = 0;  // absolute offsets in the file
  std::size_t end = 0;
  std::size_t nbytes() const { return end - begin; }
};

constexpr std::size_t kMaxHeaderBytes = 100u * 1024u * 1024u;  // the format's own cap
constexpr std::size_t kMaxTensors = 1u << 20;
constexpr std::size_t kMaxDims = 16;

// Bytes per element of a safetensors dtype, 0 when the dtype is unknown.
std::size_t dtype_size(const std::string& dtype);

// Parses a header held in memory (the 8-byte length prefix included) for a file of
// `file_size` bytes; `path` only names the file in errors. Separate from the mapping so
// the sanitizer tests can feed it every malformed shape.
std::vector<TensorInfo> parse_header(const unsigned char* data, std::size_t size, std::size_t file_size,
                                     const std::string& path,
                                     std::vector<std::pair<std::string, std::string>>* metadata = nullptr);

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // throws std::system_error, FormatError

  const std::string& path() const { return file_->path(); }
  std::size_t size() const { return file_->size(); }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::vector<std::pair<std::string, std::string>>& metadata() const { return metadata_; }
  const std::shared_ptr<MappedFile>& mapping() const { return file_; }
  // Copy one tensor's bytes to `dst` (exactly its nbytes); throws std::out_of_range.
  void copy_to(std::size_t index, void* dst, std::size_t dst_size) const;

 private:
  std::shared_ptr<MappedFile> file_;
  std::vector<TensorInfo> tensors_;
  std::vector<std::pair<std::string, std::string>> metadata_;
};

}  // namespace mlxpool
