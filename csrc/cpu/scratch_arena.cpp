#include "scratch_arena.h"

#include <algorithm>
#include <cstdlib>
#include <memory>

namespace shvit::cpu {
namespace {

struct Arena {
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte, Free> block;
  size_t capacity = 0, top = 0, wanted = 0;  // wanted: the most ever held at once (or asked for)
};

thread_local Arena arena;

}  // namespace

void* arena_acquire(size_t bytes) {
  Arena& a = arena;
  if (a.top + bytes > kArenaMaxBytes) return nullptr;
  a.wanted = std::max(a.wanted, a.top + bytes);
  if (a.top == 0 && a.capacity < a.wanted) {  // grow only when empty: held pieces must not move
    a.block.reset();
    a.capacity = 0;
    void* p = std::aligned_alloc(64, a.wanted);
    if (!p) return nullptr;
    a.block.reset(static_cast<std::byte*>(p));
    a.capacity = a.wanted;
  }
  if (a.top + bytes > a.capacity) return nullptr;
  void* p = a.block.get() + a.top;
  a.top += bytes;
  return p;
}

void arena_release(size_t bytes) { arena.top -= bytes; }

}  // namespace shvit::cpu
