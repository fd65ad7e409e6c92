// Tests of the weight-manager core without Python; built with sanitizers by `make native-test`.
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/capability.h>
#include <sys/syscall.h>
#endif

#include "mapped_file.h"
#include "pinning.h"
#include "prefetching.h"
#include "weight_set.h"

// Unlike assert, stays on in release builds.
#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

namespace {

const std::size_t kPage = mlxpool::page_size();

struct TempFile {
  std::string path;
  explicit TempFile(std::size_t bytes, char value = 1) {
    char tmpl[] = "/tmp/mlxpool-weights-XXXXXX";
    int fd = mkstemp(tmpl);
    CHECK(fd >= 0);
    close(fd);
    path = tmpl;
    std::ofstream f(path, std::ios::binary);
    for (std::size_t i = 0; i < bytes; ++i) f.put(value);
  }
  ~TempFile() { std::remove(path.c_str()); }
};

template <typename F>
int expect_errno(F&& f) {
  try {
    f();
  } catch (const std::system_error& e) {
    return e.code().value();
  }
  return 0;
}

// Runs `body` in a child that may not lock more than `limit` bytes: RLIMIT_MEMLOCK
// lowered and, when run as root, CAP_IPC_LOCK dropped (root ignores the limit otherwise).
bool in_child_with_memlock_limit(rlim_t limit, const std::function<void()>& body) {
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    struct rlimit rl {limit, limit};
    if (setrlimit(RLIMIT_MEMLOCK, &rl) != 0) _exit(2);
#ifdef __linux__
    __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[2]{};
    if (syscall(SYS_capget, &header, data) != 0) _exit(3);
    data[CAP_IPC_LOCK / 32].effective &= ~(1u << (CAP_IPC_LOCK % 32));
    data[CAP_IPC_LOCK / 32].permitted &= ~(1u << (CAP_IPC_LOCK % 32));
    if (syscall(SYS_capset, &header, data) != 0) _exit(4);
#endif
    body();
    _exit(0);
  }
  int status = 0;
  CHECK(waitpid(pid, &status, 0) == pid);
  if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
    std::fprintf(stderr, "child failed: status=%d exit=%d\n", status, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

void mapped_file_maps_prefetches_and_touches() {
  TempFile file(kPage * 3 + 17);
  mlxpool::MappedFile mf(file.path);
  CHECK(mf.size() == kPage * 3 + 17);
  CHECK(mf.pages() == 4);
  mf.prefetch();
  CHECK(mf.touch() == 4);  // one byte of value 1 per page, 4 pages
  CHECK(mf.resident_pages() == 4);
}

void missing_file_throws_enoent() {
  CHECK(expect_errno([] { mlxpool::MappedFile missing("/nonexistent/mlxpool-weights"); }) == ENOENT);
}

void lock_and_unlock_round_trip() {
  TempFile file(kPage * 2);
  mlxpool::MappedFile mf(file.path);
  CHECK(!mf.locked());
  mf.lock();
  CHECK(mf.locked());
  CHECK(mf.resident_pages() == 2);  // mlock faults every page in
  mf.lock();                        // idempotent
  mf.unlock();
  CHECK(!mf.locked());
  mf.unlock();  // idempotent
}

void empty_file_is_a_no_op() {
  TempFile file(0);
  mlxpool::MappedFile mf(file.path);
  CHECK(mf.size() == 0 && mf.pages() == 0 && mf.resident_pages() == 0);
  mf.prefetch();
  CHECK(mf.touch() == 0);
  mf.lock();
  CHECK(!mf.locked());
}

void weight_set_aggregates_files() {
  TempFile a(kPage * 2, 2), b(kPage + 1, 3), empty(0);
  mlxpool::WeightSet set({a.path, b.path, empty.path});
  CHECK(set.files() == 3);
  CHECK(set.size() == kPage * 3 + 1);
  set.prefetch();
  CHECK(set.touch() == 2 * 2 + 3 * 2);
  CHECK(set.resident_fraction() == 1.0);
  set.lock();
  CHECK(set.locked());
  set.unlock();
  CHECK(!set.locked());
  CHECK(mlxpool::WeightSet({}).resident_fraction() == 1.0);
}

void weight_set_with_a_missing_file_throws() {
  TempFile a(kPage);
  CHECK(expect_errno([&] { mlxpool::WeightSet set({a.path, "/nonexistent/w.safetensors"}); }) == ENOENT);
}

void lock_beyond_the_limit_fails_and_leaves_nothing_locked() {
  TempFile small(kPage), big(kPage * 4);
  bool ok = in_child_with_memlock_limit(kPage * 2, [&] {
    mlxpool::WeightSet set({small.path, big.path});  // small fits, big does not
    int err = expect_errno([&] { set.lock(); });
    if (err != ENOMEM && err != EPERM) _exit(10);
    if (set.locked()) _exit(11);
    // All-or-nothing: `small` was unlocked again, so its page is free to lock anew.
    mlxpool::WeightSet fits({small.path, small.path});
    try {
      fits.lock();
    } catch (const std::system_error&) {
      _exit(12);
    }
    if (!fits.locked()) _exit(13);
  });
  CHECK(ok);
}

// The fallback when the OS refuses: the pin set keeps what it pinned, reports the
// errno (the loader turns it into the RLIMIT_MEMLOCK warning) and stays usable; release
// gives the locked pages back (the limit's room can be used again).
void pin_set_refused_by_the_os_keeps_what_it_pinned() {
  bool ok = in_child_with_memlock_limit(kPage * 2, [&] {
    const std::size_t len = kPage * 8;
    void* mem = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) _exit(20);
    std::memset(mem, 1, len);
    auto* bytes = static_cast<unsigned char*>(mem);
    mlxpool::PinSet pins(len);  // the budget allows all of it: the OS is what refuses
    if (pins.add(bytes, kPage) != 0) _exit(21);
    int err = pins.add(bytes + 2 * kPage, 4 * kPage);  // 1 + 4 pages > the 2-page limit
    if (err != ENOMEM && err != EPERM && err != EAGAIN) _exit(22);
    if (pins.bytes() != kPage || pins.spans() != 1) _exit(23);  // nothing half-counted
    if (pins.resident_bytes() != kPage) _exit(24);
    if (pins.add(bytes + 7 * kPage, kPage) != 0 || pins.bytes() != 2 * kPage) _exit(25);  // still usable
    pins.release();
    if (pins.bytes() != 0 || pins.spans() != 0) _exit(26);
    mlxpool::PinSet again(len);
    if (again.add(bytes, 2 * kPage) != 0) _exit(27);  // the released pages' room is free again
    again.release();
    ::munmap(mem, len);
  });
  CHECK(ok);
}

// Submitters racing close(), and a waiter blocked while the pool closes: every submit
// either queues or throws logic_error, wait() returns, all threads are joined (ASan
// sees any use of a freed job or mapping).
void prefetcher_close_races_submitters_and_waiters() {
  TempFile file(kPage * 16);
  auto mapping = std::make_shared<const mlxpool::MappedFile>(file.path);
  for (int round = 0; round < 20; ++round) {
    auto pool = std::make_unique<mlxpool::Prefetcher>(3);
    std::atomic<int> refused{0}, queued{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> submitters;
    for (int t = 0; t < 4; ++t) {
      submitters.emplace_back([&] {
        while (!go.load()) std::this_thread::yield();
        for (int i = 0; i < 200; ++i) {
          try {
            pool->submit(mapping, static_cast<std::size_t>(i % 16) * kPage, kPage);
            queued.fetch_add(1);
          } catch (const std::logic_error&) {
            refused.fetch_add(1);
          }
        }
      });
    }
    std::thread waiter([&] {
      while (!go.load()) std::this_thread::yield();
      pool->wait();
    });
    go.store(true);
    std::this_thread::sleep_for(std::chrono::microseconds(50 * round));
    pool->close();
    for (auto& t : submitters) t.join();
    waiter.join();
    CHECK(queued.load() + refused.load() == 800);
    CHECK(pool->closed() && pool->running() == 0 && pool->threads() == 0);
    pool.reset();  // destroyed after close: nothing left to join
  }
  CHECK(mapping.use_count() == 1);  // no job kept a reference to the mapping
}

}  // namespace

int main() {
  const std::vector<std::pair<const char*, void (*)()>> tests = {
      {"mapped_file_maps_prefetches_and_touches", mapped_file_maps_prefetches_and_touches},
      {"missing_file_throws_enoent", missing_file_throws_enoent},
      {"lock_and_unlock_round_trip", lock_and_unlock_round_trip},
      {"empty_file_is_a_no_op", empty_file_is_a_no_op},
      {"weight_set_aggregates_files", weight_set_aggregates_files},
      {"weight_set_with_a_missing_file_throws", weight_set_with_a_missing_file_throws},
      {"lock_beyond_the_limit_fails_and_leaves_nothing_locked", lock_beyond_the_limit_fails_and_leaves_nothing_locked},
      {"pin_set_refused_by_the_os_keeps_what_it_pinned", pin_set_refused_by_the_os_keeps_what_it_pinned},
      {"prefetcher_close_races_submitters_and_waiters", prefetcher_close_races_submitters_and_waiters},
  };
  for (const auto& [name, test] : tests) {
    test();
    std::printf("ok %s\n", name);
  }
  std::printf("weights_test: %zu passed, 0 failed\n", tests.size());
  return 0;
}
