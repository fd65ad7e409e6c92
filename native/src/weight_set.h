// The files of one model as a unit: map them together, prefetch, touch, pin and
// measure residency across all of them. Pinning is all-or-nothing: if any file
// cannot be locked, the ones already locked are unlocked before the error is thrown.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mapped_file.h"

namespace mlxpool {

class WeightSet {
 public:
  explicit WeightSet(const std::vector<std::string>& paths);  // throws std::system_error

  std::size_t size() const;  // bytes over all files
  std::size_t files() const { return files_.size(); }
  void prefetch() const;
  std::uint64_t touch() const;
  void lock();
  void unlock();
  bool locked() const;
  // Resident pages / total pages over all files (1.0 for a set of empty files).
  double resident_fraction() const;

 private:
  std::vector<std::unique_ptr<MappedFile>> files_;
};

}  // namespace mlxpool
