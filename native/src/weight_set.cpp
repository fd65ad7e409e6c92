#include "weight_set.h"

namespace mlxpool {

WeightSet::WeightSet(const std::vector<std::string>& paths) {
  files_.reserve(paths.size());
  for (const auto& path : paths) files_.push_back(std::make_unique<MappedFile>(path));
}

std::size_t WeightSet::size() const {
  std::size_t total = 0;
  for (const auto& f : files_) total += f->size();
  return total;
}

void WeightSet::prefetch() const {
  for (const auto& f : files_) f->prefetch();
}

std::uint64_t WeightSet::touch() const {
  std::uint64_t sum = 0;
  for (const auto& f : files_) sum += f->touch();
  return sum;
}

void WeightSet::lock() {
  for (std::size_t i = 0; i < files_.size(); ++i) {
    try {
      files_[i]->lock();
    } catch (...) {
      for (std::size_t j = 0; j < i; ++j) files_[j]->unlock();
      throw;
    }
  }
}

void WeightSet::unlock() {
  for (const auto& f : files_) f->unlock();
}

bool WeightSet::locked() const {
  for (const auto& f : files_)
    if (f->size() > 0 && !f->locked()) return false;
  return !files_.empty();
}

double WeightSet::resident_fraction() const {
  std::size_t pages = 0, resident = 0;
  for (const auto& f : files_) {
    pages += f->pages();
    resident += f->resident_pages();
  }
  return pages == 0 ? 1.0 : static_cast<double>(resident) / static_cast<double>(pages);
}

}  // namespace mlxpool
