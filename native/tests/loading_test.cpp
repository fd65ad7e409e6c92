// Tests of the load path's native parts without Python, built with ASan/UBSan by
// `make native-test`: safetensors header parsing (valid, malformed, truncated), the
// pin set's budget and page accounting, and the prefetch pool's thread lifecycle.
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

#include "mapped_file.h"
#include "pinning.h"
#include "prefetching.h"
#include "safetensors.h"

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

namespace {

const std::size_t kPage = mlxpool::page_size();

std::string with_header(const std::string& json, const std::string& data) {
  std::string out(8, '\0');
  std::uint64_t n = json.size();
  for (int k = 0; k < 8; ++k) out[k] = static_cast<char>((n >> (8 * k)) & 0xFF);
  return out + json + data;
}

struct TempFile {
  std::string path;
  explicit TempFile(const std::string& bytes) {
    char tmpl[] = "/tmp/mlxpool-st-XXXXXX";
    int fd = mkstemp(tmpl);
    CHECK(fd >= 0);
    close(fd);
    path = tmpl;
    std::ofstream f(path, std::ios::binary);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  ~TempFile() { std::remove(path.c_str()); }
};

// The FormatError message of parsing `bytes`, or "" when it parsed.
std::string parse_error(const std::string& bytes, std::size_t* offset = nullptr) {
  try {
    mlxpool::parse_header(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), bytes.size(), "m.st");
  } catch (const mlxpool::FormatError& e) {
    if (offset != nullptr) *offset = e.offset();
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

void parses_a_valid_file() {
  std::string data(4 * 6 + 2 * 2, '\x01');
  std::string json =
      R"({"__metadata__":{"format":"mlx","k\u00e9":"v"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"( "b" : {"shape":[2],"data_offsets":[24,28],"dtype":"BF16"}, "e":{"dtype":"U8","shape":[0],"data_offsets":[28,28]}}  )";
  TempFile file(with_header(json, data));
  mlxpool::SafetensorsFile f(file.path);
  CHECK(f.tensors().size() == 3);
  const auto& a = f.tensors()[0];
  CHECK(a.name == "a" && a.dtype == "F32" && a.shape == std::vector<std::int64_t>({2, 3}));
  CHECK(a.begin == 8 + json.size() && a.nbytes() == 24);
  CHECK(f.tensors()[1].dtype == "BF16" && f.tensors()[1].begin == 8 + json.size() + 24);
  CHECK(f.metadata().size() == 2 && f.metadata()[0].second == "mlx" && f.metadata()[1].first == "k\xc3\xa9");
  std::vector<unsigned char> dst(24);
  f.copy_to(0, dst.data(), dst.size());
  CHECK(dst[0] == 1 && dst[23] == 1);
  bool threw = false;
  try {
    f.copy_to(0, dst.data(), 23);
  } catch (const std::out_of_range&) {
    threw = true;
  }
  CHECK(threw);
}

void rejects_malformed_headers_naming_the_offset() {
  std::size_t at = 0;
  CHECK(contains(parse_error(std::string("\x05\x00", 2)), "too short"));
  CHECK(contains(parse_error(with_header("", "")), "outside 1.."));
  std::string huge(8, '\xff');
  CHECK(contains(parse_error(huge + "{}"), "header length"));
  // Length says 100 bytes, file holds 2 of them: truncated.
  std::string cut = with_header(std::string(100, ' '), "").substr(0, 10);
  CHECK(contains(parse_error(cut, &at), "runs past the end") && at == 0);
  CHECK(contains(parse_error(with_header("[]", ""), &at), "expected '{'") && at == 8);
  CHECK(contains(parse_error(with_header(R"({"a":)", ""), &at), "unexpected end") && at == 13);
  CHECK(contains(parse_error(with_header(R"({"a" 1})", ""), &at), "expected ':'") && at == 13);
  CHECK(contains(parse_error(with_header(R"({"a":{"dtype":"F32","shape":[1]}})", "")), "needs dtype, shape"));
  CHECK(contains(parse_error(with_header(R"({"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}})", std::string(4, 0)), &at),
                 "unknown dtype 'Q7'") && at == 8 + 14);
  CHECK(contains(parse_error(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", std::string(4, 0))),
                 "4 bytes of data for a F32 shape of 8 bytes"));
  CHECK(contains(parse_error(with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", std::string(3, 0))),
                 "past the end of the file"));
  CHECK(contains(parse_error(with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", std::string(4, 0))),
                 "begin after end"));
  CHECK(contains(parse_error(with_header(R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", "")),
                 "expected an integer"));
  CHECK(contains(parse_error(with_header(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "")),
                 "non-negative integer"));
  CHECK(contains(parse_error(with_header(R"({"a":{"dtype":"F32","shape":[99999999999999999999999],"data_offsets":[0,4]}})", "")),
                 "too large"));
  CHECK(contains(parse_error(with_header(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}})", std::string(4, 0))),
                 "overflows"));
  CHECK(contains(parse_error(with_header(R"({"a":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]}})", "")),
                 "more than 16"));
  CHECK(contains(parse_error(with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}})", std::string(4, 0))),
                 "unexpected or repeated key 'x'"));
  std::string two = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
  CHECK(contains(parse_error(with_header(two, std::string(8, 0))), "appears twice"));
  std::string overlap = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
  CHECK(contains(parse_error(with_header(overlap, std::string(8, 0))), "overlap"));
  CHECK(contains(parse_error(with_header(R"({"__metadata__":{"k":1}})", "")), "must be strings"));
  CHECK(contains(parse_error(with_header(R"({"a\q":1})", "")), "bad escape"));
  CHECK(contains(parse_error(with_header(R"({"\ud800":1})", "")), "unpaired surrogate"));
  CHECK(contains(parse_error(with_header(R"({"ab)", "")), "unterminated string"));
  CHECK(contains(parse_error(with_header("{}x", "")), "trailing bytes"));
  CHECK(contains(parse_error(with_header(std::string("{\"a\x01\":1}"), "")), "control character"));
  CHECK(parse_error(with_header("{}", "")).empty());
  // mx.save_safetensors writes a null __metadata__ when it is given none.
  CHECK(parse_error(with_header(R"({"__metadata__":null,"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                                std::string(4, 0))).empty());
  CHECK(contains(parse_error(with_header(R"({"__metadata__":nul})", "")), "expected '{'"));
}

void truncating_a_valid_file_anywhere_is_an_error_not_a_crash() {
  std::string json = R"({"w":{"dtype":"F16","shape":[3,2],"data_offsets":[0,12]},"__metadata__":{"a":"b"}})";
  std::string whole = with_header(json, std::string(12, '\x02'));
  CHECK(parse_error(whole).empty());
  for (std::size_t n = 0; n < whole.size(); ++n) {
    std::string part = whole.substr(0, n);
    CHECK(!parse_error(part).empty());
    // Also through a real mapping, so ASan sees reads against the file's true end.
    TempFile file(part);
    bool threw = false;
    try {
      mlxpool::SafetensorsFile f(file.path);
    } catch (const mlxpool::FormatError& e) {
      threw = contains(e.what(), file.path);
    }
    CHECK(threw);
  }
}

void pin_set_counts_pages_once_and_keeps_to_its_budget() {
  const std::size_t len = kPage * 4;
  void* mem = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(mem != MAP_FAILED);
  std::memset(mem, 1, len);
  auto* bytes = static_cast<unsigned char*>(mem);
  {
    mlxpool::PinSet pins(kPage * 3);
    CHECK(pins.add(bytes + 10, 20) == 0);  // inside page 0: the whole page is locked
    CHECK(pins.bytes() == kPage);
    CHECK(pins.add(bytes + 100, 50) == 0);  // same page again: nothing new
    CHECK(pins.bytes() == kPage && pins.spans() == 1);
    CHECK(pins.add(bytes + kPage - 1, 2) == 0);  // straddles pages 0 and 1
    CHECK(pins.bytes() == 2 * kPage && pins.spans() == 1);
    CHECK(pins.add(bytes + 2 * kPage, 2 * kPage) == ENOBUFS);  // 2 more pages: over budget
    CHECK(pins.bytes() == 2 * kPage);
    CHECK(pins.add(bytes + 3 * kPage, 1) == 0);  // a disjoint page fits
    CHECK(pins.bytes() == 3 * kPage && pins.spans() == 2);
    CHECK(pins.resident_bytes() == 3 * kPage);
    pins.release();
    CHECK(pins.bytes() == 0 && pins.spans() == 0);
    CHECK(pins.add(bytes, len) == ENOBUFS);
    CHECK(pins.add(bytes, 0) == 0 && pins.bytes() == 0);
  }
  CHECK(mlxpool::resident_bytes(bytes, len) == len);
  ::munmap(mem, len);
}

void prefetcher_pages_ranges_in_and_joins_its_threads() {
  std::string data(kPage * 8, '\x03');
  TempFile file(data);
  auto mapping = std::make_shared<const mlxpool::MappedFile>(file.path);
  mlxpool::Prefetcher pool(3);
  CHECK(pool.threads() == 3 && pool.running() == 3 && !pool.closed());
  for (std::size_t i = 0; i < 8; ++i) pool.submit(mapping, i * kPage, kPage);
  pool.submit(mapping, kPage * 100, kPage);  // past the end: clamped, harmless
  pool.wait();
  CHECK(pool.bytes_done() == kPage * 9);
  CHECK(mapping->resident_pages() == 8);
  pool.close();
  CHECK(pool.closed() && pool.running() == 0 && pool.threads() == 0);
  pool.close();  // idempotent
  bool threw = false;
  try {
    pool.submit(mapping, 0, 1);
  } catch (const std::logic_error&) {
    threw = true;
  }
  CHECK(threw);
  pool.wait();  // returns at once when closed
  for (std::size_t bad : {std::size_t{0}, mlxpool::kMaxPrefetchThreads + 1}) {
    threw = false;
    try {
      mlxpool::Prefetcher p(bad);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    CHECK(threw);
  }
  // Destroyed with work still queued: the destructor drops it and joins.
  {
    mlxpool::Prefetcher busy(2);
    for (int i = 0; i < 1000; ++i) busy.submit(mapping, 0, data.size());
  }
}

}  // namespace

int main() {
  const std::vector<std::pair<const char*, void (*)()>> tests = {
      {"parses_a_valid_file", parses_a_valid_file},
      {"rejects_malformed_headers_naming_the_offset", rejects_malformed_headers_naming_the_offset},
      {"truncating_a_valid_file_anywhere_is_an_error_not_a_crash", truncating_a_valid_file_anywhere_is_an_error_not_a_crash},
      {"pin_set_counts_pages_once_and_keeps_to_its_budget", pin_set_counts_pages_once_and_keeps_to_its_budget},
      {"prefetcher_pages_ranges_in_and_joins_its_threads", prefetcher_pages_ranges_in_and_joins_its_threads},
  };
  for (const auto& [name, test] : tests) {
    test();
    std::printf("ok %s\n", name);
  }
  std::printf("loading_test: %zu passed, 0 failed\n", tests.size());
  return 0;
}
