// Tests of the weight-manager core without Python; built with sanitizers by `make native-test`.
#include <cstdio>
#include <fstream>
#include <string>
#include <system_error>
#include <unistd.h>
#include <cstdlib>

#include "mapped_file.h"

// Unlike assert, stays on in release builds.
#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                   \
    }                                                                 \
  } while (0)

int main() {
  char tmpl[] = "/tmp/mlxpool-weights-XXXXXX";
  int fd = mkstemp(tmpl);
  CHECK(fd >= 0);
  close(fd);
  const std::size_t n = mlxpool::page_size() * 3 + 17;
  {
    std::ofstream f(tmpl, std::ios::binary);
    for (std::size_t i = 0; i < n; ++i) f.put(static_cast<char>(1));
  }
  {
    mlxpool::MappedFile mf(tmpl);
    CHECK(mf.size() == n);
    mf.prefetch();
    CHECK(mf.touch() == 4);  // one byte of value 1 per page, 4 pages
  }
  bool threw = false;
  try {
    mlxpool::MappedFile missing("/nonexistent/mlxpool-weights");
  } catch (const std::system_error&) {
    threw = true;
  }
  CHECK(threw);
  std::remove(tmpl);
  std::puts("weights_test: 2 passed, 0 failed");
  return 0;
}
