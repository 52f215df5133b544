// Per-thread scratch memory that outlives a call. The kernels' temporaries are large (hundreds of KiB per task),
// and glibc malloc hands blocks that large back to the kernel on free, so a buffer allocated per call is
// page-faulted and zero-filled again on every call: in a plain script that costs as much as the kernel's work.
// Each thread keeps one grow-only block instead and hands out pieces of it in stack order.
#pragma once

#include <cstddef>

namespace shvit::cpu {

// The largest block a thread keeps (per thread, for the life of the thread); larger requests are not served.
constexpr size_t kArenaMaxBytes = size_t(64) << 20;

// `bytes` (a positive multiple of 64) of this thread's block, 64-byte aligned, or nullptr when it cannot serve them now
// (over kArenaMaxBytes, or an outer piece is still held and the rest of the block is too small: the block then
// grows the next time it is empty). Pieces must be released in reverse order, by the thread that took them.
void* arena_acquire(size_t bytes);
void arena_release(size_t bytes);

}  // namespace shvit::cpu
