#include "safetensors.h"

#include <algorithm>
#include <cstring>
#include <set>

namespace mlxpool {

FormatError::FormatError(const std::string& path, std::size_t offset, const std::string& what)
    : std::runtime_error(path + ": offset " + std::to_string(offset) + ": " + what), offset_(offset) {}

std::size_t dtype_size(const std::string& d) {
  if (d == "BOOL" || d == "U8" || d == "I8" || d == "F8_E4M3" || d == "F8_E5M2") return 1;
  if (d == "I16" || d == "U16" || d == "F16" || d == "BF16") return 2;
  if (d == "I32" || d == "U32" || d == "F32") return 4;
  if (d == "I64" || d == "U64" || d == "F64" || d == "C64") return 8;
  return 0;
}

namespace {

// A strict reader of the header's JSON: just what the format uses (objects, arrays,
// strings, non-negative integers), positions reported as absolute file offsets.
class Reader {
 public:
  Reader(const unsigned char* p, std::size_t n, std::size_t base, const std::string& path)
      : p_(p), n_(n), base_(base), path_(path) {}

  [[noreturn]] void fail(const std::string& what) const { throw FormatError(path_, base_ + i_, what); }
  [[noreturn]] void fail_at(std::size_t at, const std::string& what) const { throw FormatError(path_, at, what); }
  std::size_t where() const { return base_ + i_; }

  void ws() {
    while (i_ < n_ && (p_[i_] == ' ' || p_[i_] == '\t' || p_[i_] == '\n' || p_[i_] == '\r')) ++i_;
  }
  bool at_end() {
    ws();
    return i_ >= n_;
  }
  char peek() {
    ws();
    if (i_ >= n_) fail("unexpected end of header");
    return static_cast<char>(p_[i_]);
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  bool accept(char c) {
    if (peek() != c) return false;
    ++i_;
    return true;
  }
  // A bare JSON word such as `null`; false (nothing consumed) if it is not next.
  bool accept_word(const char* word) {
    ws();
    std::size_t len = std::char_traits<char>::length(word);
    if (n_ - i_ < len || std::memcmp(p_ + i_, word, len) != 0) return false;
    i_ += len;
    return true;
  }

  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      if (i_ >= n_) fail("unterminated string");
      unsigned char c = p_[i_++];
      if (c == '"') return out;
      if (c < 0x20) fail("control character in string");
      if (c != '\\') {
        out.push_back(static_cast<char>(c));
        continue;
      }
      if (i_ >= n_) fail("unterminated escape");
      char e = static_cast<char>(p_[i_++]);
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': utf8(out, codepoint()); break;
        default: fail(std::string("bad escape '\\") + e + "'");
      }
    }
  }

  std::uint64_t integer() {
    ws();
    std::size_t start = i_;
    if (i_ >= n_ || p_[i_] < '0' || p_[i_] > '9') fail("expected a non-negative integer");
    std::uint64_t v = 0;
    while (i_ < n_ && p_[i_] >= '0' && p_[i_] <= '9') {
      unsigned d = p_[i_] - '0';
      if (v > (UINT64_MAX - d) / 10) fail_at(base_ + start, "integer too large");
      v = v * 10 + d;
      ++i_;
    }
    if (i_ < n_ && (p_[i_] == '.' || p_[i_] == 'e' || p_[i_] == 'E')) fail_at(base_ + start, "expected an integer");
    return v;
  }

  // An array of at most `max` non-negative integers (shape, data_offsets).
  std::vector<std::uint64_t> integers(std::size_t max, const char* what) {
    std::vector<std::uint64_t> out;
    expect('[');
    if (accept(']')) return out;
    do {
      if (out.size() == max) fail(std::string(what) + ": more than " + std::to_string(max) + " items");
      out.push_back(integer());
    } while (accept(','));
    expect(']');
    return out;
  }

 private:
  unsigned hex4() {
    if (n_ - i_ < 4) fail("truncated \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      unsigned char c = p_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("bad hex digit in \\u escape");
    }
    return v;
  }
  unsigned codepoint() {
    unsigned hi = hex4();
    if (hi < 0xD800 || hi > 0xDFFF) return hi;
    if (hi > 0xDBFF || n_ - i_ < 2 || p_[i_] != '\\' || p_[i_ + 1] != 'u') fail("unpaired surrogate");
    i_ += 2;
    unsigned lo = hex4();
    if (lo < 0xDC00 || lo > 0xDFFF) fail("unpaired surrogate");
    return 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
  }
  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  const unsigned char* p_;
  std::size_t n_, i_ = 0, base_;
  const std::string& path_;
};

TensorInfo parse_tensor(Reader& r, std::string name, std::size_t data_start, std::size_t data_size) {
  const std::size_t at = r.where();
  TensorInfo t;
  t.name = std::move(name);
  bool has_dtype = false, has_shape = false, has_offsets = false;
  std::uint64_t b = 0, e = 0;
  std::size_t offsets_at = at;
  r.expect('{');
  if (!r.accept('}')) {
    do {
      std::size_t key_at = r.where();
      std::string key = r.string();
      r.expect(':');
      if (key == "dtype" && !has_dtype) {
        std::size_t dtype_at = r.where();
        t.dtype = r.string();
        if (dtype_size(t.dtype) == 0) r.fail_at(dtype_at, "tensor '" + t.name + "': unknown dtype '" + t.dtype + "'");
        has_dtype = true;
      } else if (key == "shape" && !has_shape) {
        for (auto d : r.integers(kMaxDims, "shape")) {
          if (d > static_cast<std::uint64_t>(INT64_MAX)) r.fail("dimension too large");
          t.shape.push_back(static_cast<std::int64_t>(d));
        }
        has_shape = true;
      } else if (key == "data_offsets" && !has_offsets) {
        offsets_at = r.where();
        auto v = r.integers(2, "data_offsets");
        if (v.size() != 2) r.fail_at(offsets_at, "data_offsets must hold [begin, end]");
        b = v[0];
        e = v[1];
        has_offsets = true;
      } else {
        r.fail_at(key_at, "tensor '" + t.name + "': unexpected or repeated key '" + key + "'");
      }
    } while (r.accept(','));
    r.expect('}');
  }
  if (!has_dtype || !has_shape || !has_offsets)
    r.fail_at(at, "tensor '" + t.name + "': needs dtype, shape and data_offsets");
  if (b > e) r.fail_at(offsets_at, "tensor '" + t.name + "': data_offsets begin after end");
  if (e > data_size)
    r.fail_at(offsets_at, "tensor '" + t.name + "': data ends at " + std::to_string(data_start + e) +
                              ", past the end of the file (" + std::to_string(data_start + data_size) +
                              " bytes): truncated?");
  std::uint64_t bytes = dtype_size(t.dtype);
  for (auto d : t.shape) {
    auto ud = static_cast<std::uint64_t>(d);
    if (ud != 0 && bytes > UINT64_MAX / ud) r.fail_at(offsets_at, "tensor '" + t.name + "': shape overflows");
    bytes *= ud;
  }
  if (bytes != e - b)
    r.fail_at(offsets_at, "tensor '" + t.name + "': " + std::to_string(e - b) + " bytes of data for a " +
                              t.dtype + " shape of " + std::to_string(bytes) + " bytes");
  t.begin = data_start + static_cast<std::size_t>(b);
  t.end = data_start + static_cast<std::size_t>(e);
  return t;
}

}  // namespace

std::vector<TensorInfo> parse_header(const unsigned char* data, std::size_t size, std::size_t file_size,
                                     const std::string& path,
                                     std::vector<std::pair<std::string, std::string>>* metadata) {
  if (size < 8 || file_size < 8)
    throw FormatError(path, 0, "file of " + std::to_string(file_size) + " bytes is too short for a safetensors header");
  std::uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | data[k];  // little-endian, whatever the host
  if (n == 0 || n > kMaxHeaderBytes)
    throw FormatError(path, 0, "header length " + std::to_string(n) + " is outside 1.." + std::to_string(kMaxHeaderBytes));
  if (n > file_size - 8 || n > size - 8)
    throw FormatError(path, 0, "header of " + std::to_string(n) + " bytes runs past the end of the file (" +
                                   std::to_string(file_size) + " bytes): truncated?");
  const std::size_t data_start = 8 + static_cast<std::size_t>(n);
  const std::size_t data_size = file_size - data_start;
  Reader r(data + 8, static_cast<std::size_t>(n), 8, path);
  std::vector<TensorInfo> out;
  std::set<std::string> names;
  bool seen_meta = false;
  r.expect('{');
  if (!r.accept('}')) {
    do {
      std::size_t key_at = r.where();
      std::string name = r.string();
      r.expect(':');
      if (name == "__metadata__") {
        if (seen_meta) r.fail_at(key_at, "repeated __metadata__");
        seen_meta = true;
        if (r.accept_word("null")) continue;  // mx.save_safetensors writes null when given no metadata
        r.expect('{');
        if (!r.accept('}')) {
          do {
            std::string k = r.string();
            r.expect(':');
            if (r.peek() != '"') r.fail("__metadata__ values must be strings");
            std::string v = r.string();
            if (metadata != nullptr) metadata->emplace_back(std::move(k), std::move(v));
          } while (r.accept(','));
          r.expect('}');
        }
        continue;
      }
      if (!names.insert(name).second) r.fail_at(key_at, "tensor '" + name + "' appears twice");
      if (out.size() == kMaxTensors) r.fail_at(key_at, "more than " + std::to_string(kMaxTensors) + " tensors");
      out.push_back(parse_tensor(r, std::move(name), data_start, data_size));
    } while (r.accept(','));
    r.expect('}');
  }
  if (!r.at_end()) r.fail("trailing bytes after the header object");
  // Tensors may not share bytes: a crafted file could otherwise alias two weights.
  std::vector<const TensorInfo*> sorted;
  for (const auto& t : out) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (std::size_t k = 1; k < sorted.size(); ++k)
    if (sorted[k]->begin < sorted[k - 1]->end && sorted[k]->nbytes() > 0)
      throw FormatError(path, sorted[k]->begin,
                        "tensors '" + sorted[k - 1]->name + "' and '" + sorted[k]->name + "' overlap");
  return out;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(std::make_shared<MappedFile>(path)) {
  tensors_ = parse_header(file_->data(), file_->size(), file_->size(), path, &metadata_);
}

void SafetensorsFile::copy_to(std::size_t index, void* dst, std::size_t dst_size) const {
  if (index >= tensors_.size()) throw std::out_of_range("tensor index " + std::to_string(index) + " out of range");
  const TensorInfo& t = tensors_[index];
  if (dst_size != t.nbytes())
    throw std::out_of_range("tensor '" + t.name + "' has " + std::to_string(t.nbytes()) + " bytes, destination " +
                            std::to_string(dst_size));
  if (t.nbytes() > 0) std::memcpy(dst, file_->data() + t.begin, t.nbytes());
}

}  // namespace mlxpool
