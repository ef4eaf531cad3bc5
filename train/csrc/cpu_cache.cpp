// A caching allocator for torch's CPU tensors (train/cpu_cache.py loads it; docs/training.md says why).
//
// A training step allocates and frees the same tensors in the same order every step. glibc's heap serves them from
// one arena in which long-lived blocks (the saved activations) and short-lived ones (the step's temporaries)
// interleave, so freed holes rarely fit the next request and the heap grows to about 1.6 times what is live. This
// allocator keeps every freed block of 64 KiB or more in a free list of its size class (eight classes per power of
// two) and hands it out again to the next request of that class: after the first step the step's memory is the sum
// over size classes of the blocks in use at once, it is never returned and retaken (no page faults), and glibc sees
// no frees to fragment on. Smaller requests go straight to torch's own CPU allocation (c10::alloc_cpu).
//
// Enabled, it is torch's CPU allocator (c10::SetCPUAllocator) until disabled: disabling frees the idle blocks and
// puts the previous allocator back; a block still in use is freed when its tensor goes. Thread-safe (one mutex).

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kSmallest = size_t(1) << 16;  // requests below this are not cached
constexpr uint8_t kPriority = 255;              // c10's registration priority (the default CPU allocator's is 0)

// n rounded up to its size class: eight classes per power of two, so a block is at most 12.5% larger than asked.
size_t size_class(size_t n) {
  const int log2 = 63 - __builtin_clzll(n);
  const size_t step = size_t(1) << (log2 - 3);
  return (n + step - 1) / step * step;
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kSmallest) {
      void* p = c10::alloc_cpu(n);
      return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
    }
    const size_t size = size_class(n);
    void* p = take_idle(size, n);
    if (p == nullptr) {
      p = c10::alloc_cpu(size);
      std::lock_guard<std::mutex> lock(mutex_);
      block_size_[p] = size;
      reserved_ += size;
      count_in_use(p, size, n);
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  // Make this torch's CPU allocator (remembering the one it replaces), or, at the last of nested disables, put that
  // one back and free the idle blocks.
  bool enable() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (depth_++ == 0) {
      c10::Allocator* current = c10::GetCPUAllocator();
      if (current != this) previous_ = current;
      c10::SetCPUAllocator(this, kPriority);
      caching_ = true;
    }
    return c10::GetCPUAllocator() == this;
  }

  void disable() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (depth_ == 0 || --depth_ > 0) return;
    if (previous_ != nullptr) c10::SetCPUAllocator(previous_, kPriority);
    caching_ = false;
    free_idle_locked();
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mutex_);
    free_idle_locked();
  }

  // reserved (blocks held, in use or idle), in use, peak in use since the last call, and the bytes requested of the
  // blocks in use (at most their size); bytes.
  void stats(uint64_t* out) {
    std::lock_guard<std::mutex> lock(mutex_);
    out[0] = reserved_;
    out[1] = in_use_;
    out[2] = peak_;
    out[3] = requested_;
    peak_ = in_use_;
  }

 private:
  static void release(void* p);

  // An idle block of the smallest class from `size` to a quarter more, or nullptr.
  void* take_idle(size_t size, size_t requested) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = idle_.lower_bound(size); it != idle_.end() && it->first <= size + size / 4; ++it) {
      if (it->second.empty()) continue;
      void* p = it->second.back();
      it->second.pop_back();
      count_in_use(p, it->first, requested);
      return p;
    }
    return nullptr;
  }

  void count_in_use(void* p, size_t size, size_t requested) {
    in_use_ += size;
    requested_ += requested;
    requested_of_[p] = requested;
    if (in_use_ > peak_) peak_ = in_use_;
  }

  void give_back(void* p) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = block_size_.find(p);
      if (it != block_size_.end()) {
        in_use_ -= it->second;
        requested_ -= requested_of_[p];
        if (caching_) {
          idle_[it->second].push_back(p);
          return;
        }
        reserved_ -= it->second;
        block_size_.erase(it);
        requested_of_.erase(p);
      }
    }
    c10::free_cpu(p);  // a small block, or a cached one once caching is off
  }

  void free_idle_locked() {
    for (auto& [size, blocks] : idle_) {
      for (void* p : blocks) {
        block_size_.erase(p);
        requested_of_.erase(p);
        reserved_ -= size;
        c10::free_cpu(p);
      }
      blocks.clear();
    }
  }

  std::mutex mutex_;
  bool caching_ = false;
  int depth_ = 0;  // enables not yet disabled (nested `caching()` blocks)
  c10::Allocator* previous_ = nullptr;
  std::map<size_t, std::vector<void*>> idle_;            // size class -> blocks not in use
  std::unordered_map<void*, size_t> block_size_;         // every cached-size block made here -> its size class
  std::unordered_map<void*, size_t> requested_of_;       // a block in use -> the bytes asked for
  size_t reserved_ = 0, in_use_ = 0, peak_ = 0, requested_ = 0;
};

CachingCPUAllocator* the_allocator() {
  static CachingCPUAllocator* allocator = new CachingCPUAllocator();  // never destroyed: tensors may outlive exit
  return allocator;
}

void CachingCPUAllocator::release(void* p) { the_allocator()->give_back(p); }

}  // namespace

extern "C" {
int muse_cpu_cache_enable() { return the_allocator()->enable() ? 1 : 0; }
void muse_cpu_cache_disable() { the_allocator()->disable(); }
void muse_cpu_cache_empty() { the_allocator()->empty(); }
void muse_cpu_cache_stats(uint64_t* out) { the_allocator()->stats(out); }
}
