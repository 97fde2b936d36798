// A block's shared-memory array as the tile and map programs index it (SArr), and the
// race checker of the checked CPU build.
//
// Normal builds: SArr is a bare pointer with operator[]. Built with CONVLORA_CHECKED (the
// CPU kernels only, tests/test_stencil_kernels.py), every index is bounds-checked and every
// read and write of a 4-byte word of the block's shared memory is recorded with the thread
// and the phase (the stretch between two barriers) that made it: two threads touching one
// word in one phase, one of them writing, throws, naming the array, the index and both
// threads. That is what a missing barrier would make a race on the GPU; the CPU runs a
// block's threads one after another, so the check is the only way it can show there.
// When the cost model asks (smem_trace.h), the same hooks count each phase's accesses.
#pragma once

#include <stdint.h>
#include <type_traits>

#include "convlora_math.h"

#if defined(CONVLORA_CHECKED)
#include <stdexcept>
#include <string>
#include <vector>

#include "smem_trace.h"
#endif

namespace convlora {
namespace tile {

// Four consecutive elements of a shared array, as SArr::load4 returns them.
template <typename T>
struct V4 {
  T v[4];
};

// n / d for a positive divisor d known per call (the rank): one 32-bit unsigned division
// where it is made (on the host, into the kernel's arguments), then a multiply and a shift
// an item, where the division by a runtime int is ~25 instructions on the GPU.
// m = ceil(2^32 / d) = (2^32 + e) / d with e < d, so n m / 2^32 = n / d + n e / (2^32 d),
// whose error term stays under 1 / d while n (d - 1) < 2^32 (every n < 2^16 for d <= 2^16).
// A divisor below 1 is taken as 1 where m is made (no division by zero; ranks are >= 1).
struct SmallDiv {
  uint64_t m = uint64_t(1) << 32;
  int d = 1;
  SmallDiv() = default;
  CONVLORA_HD explicit SmallDiv(int d_)
      : m(uint64_t(0xFFFFFFFFu / static_cast<unsigned>(d_ > 0 ? d_ : 1)) + 1), d(d_) {}
  CONVLORA_HD int operator()(int n) const {
#if defined(CONVLORA_CHECKED)
    if (n < 0 || d < 1 ||
        static_cast<uint64_t>(n) * static_cast<uint64_t>(d - 1) >= (uint64_t(1) << 32))
      throw std::out_of_range("stencil (checked build): SmallDiv of " + std::to_string(n) +
                              " by " + std::to_string(d) + " (want n >= 0, n (d - 1) < 2^32)");
#endif
    return static_cast<int>((static_cast<uint64_t>(n) * m) >> 32);
  }
};


#if defined(CONVLORA_CHECKED)
[[noreturn]] inline void smem_out_of_range(const char* name, int i, int n) {
  throw std::out_of_range(std::string("stencil (checked build): shared array ") + name +
                          " index " + std::to_string(i) + " outside [0, " + std::to_string(n) +
                          ")");
}

// Race detection of the checked build. For every 4-byte word of the block's shared memory:
// the thread that last wrote it and the thread(s) that last read it, with their phase. Two
// threads touching one word in the same phase, one of them writing, is what a missing
// barrier would make a race on the GPU; the CPU runs threads one after another, so the
// check is the only way it can show. The executor sets `phase` (advanced at each barrier)
// and `tid`; reads between phases run as tid -1 in a phase of their own.
struct Shadow {
  const unsigned char* base = nullptr;
  int64_t words = 0;
  std::vector<int> wtid, wphase, rtid, rphase;
  int phase = 0, tid = -1;
  Trace* trace = nullptr;  // the cost model's count of this block's accesses, when asked
  void attach(const unsigned char* smem, int bytes) {
    base = smem;
    words = bytes / 4;
    wtid.assign(words, -1);
    wphase.assign(words, -1);
    rtid.assign(words, -1);
    rphase.assign(words, -1);
  }
};
inline thread_local Shadow* g_shadow = nullptr;

[[noreturn]] inline void smem_race(const char* name, int i, const char* what, int other,
                                   int tid) {
  throw std::logic_error(std::string("stencil (checked build): shared array ") + name +
                         " index " + std::to_string(i) + " " + what + " thread " +
                         std::to_string(other) + " and thread " + std::to_string(tid) +
                         " in one phase (a missing barrier)");
}

template <typename T>
struct SArr;

// A checked element: reads and writes go through the race check.
// Its operators are always inlined, so that the hooks (never inlined) see the kernel's own
// code as their caller: the return address names the access's place in the program, which
// the cost model's count aligns the lanes of a warp by (smem_trace.h).
#define CONVLORA_SITE __attribute__((always_inline)) inline
#define CONVLORA_HOOK __attribute__((noinline))
template <typename T>
struct SRef {
  const SArr<T>* a;
  int i;
  CONVLORA_SITE operator T() const {
    a->on_read(i);
    return a->p[i];
  }
  CONVLORA_SITE SRef& operator=(T v) {
    a->on_write(i);
    a->p[i] = v;
    return *this;
  }
  CONVLORA_SITE SRef& operator=(const SRef& o) {
    const T v = o;
    return *this = v;
  }
  CONVLORA_SITE SRef& operator+=(T v) {
    a->on_read(i);
    a->on_write(i);
    a->p[i] += v;
    return *this;
  }
};

template <typename T>
struct SArr {
  T* p;
  int n;
  const char* name;
  // A global-memory array whose loads and stores the cost model counts (as instructions,
  // with no shared-memory wavefronts): global_view.
  bool global = false;
  SRef<T> operator[](int i) const {
    if (i < 0 || i >= n) smem_out_of_range(name, i, n);
    return SRef<T>{this, i};
  }
  int64_t word(int i) const {  // -1: not in the block's shared memory (a global array)
    const Shadow* s = g_shadow;
    if (s == nullptr || s->base == nullptr) return -1;
    const auto off = reinterpret_cast<const unsigned char*>(p + i) - s->base;
    return off >= 0 && off / 4 < s->words ? off / 4 : -1;
  }
  // A 128-bit access at index i: in bounds, i a multiple of 4 at a 16-byte aligned address.
  void check_vector(int i, const char* what) const {
    if (i < 0 || i + 3 >= n) smem_out_of_range(name, i < 0 ? i : i + 3, n);
    if (i % 4 != 0 || reinterpret_cast<uintptr_t>(p + i) % 16 != 0)
      throw std::logic_error(std::string("stencil (checked build): shared array ") + name +
                             " vector " + what + " at index " + std::to_string(i) +
                             " not 16-byte aligned");
  }
  // Four consecutive elements from index i, a multiple of 4 at a 16-byte aligned address
  // (checked: the GPU build reads them with one 128-bit load); counted as one access.
  CONVLORA_SITE V4<T> load4(int i) const {
    check_vector(i, "load");
    on_read4(i);
    return V4<T>{{p[i], p[i + 1], p[i + 2], p[i + 3]}};
  }
  CONVLORA_HOOK void on_read4(int i) const {
    const void* site = __builtin_return_address(0);
    const int64_t w = word(i);
    Shadow* s = g_shadow;
    if ((w >= 0 || global) && s != nullptr && s->trace != nullptr && s->tid >= 0)
      s->trace->reads[s->tid].push_back(  // 4 elements: sizeof(T) words
          {site, name, global ? -1 : w, static_cast<int64_t>(sizeof(T))});
    for (int k = 0; k < 4; ++k) check_read(i + k);
  }
  // Two consecutive elements from index i, a multiple of 2 at an aligned address (one
  // 64-bit load on the GPU); counted as one access.
  CONVLORA_SITE void load2(int i, T (&out)[2]) const {
    if (i < 0 || i + 1 >= n) smem_out_of_range(name, i < 0 ? i : i + 1, n);
    if (i % 2 != 0 || reinterpret_cast<uintptr_t>(p + i) % (2 * sizeof(T)) != 0)
      throw std::logic_error(std::string("stencil (checked build): shared array ") + name +
                             " pair load at index " + std::to_string(i) + " not aligned");
    on_read2(i);
    out[0] = p[i];
    out[1] = p[i + 1];
  }
  CONVLORA_HOOK void on_read2(int i) const {
    const void* site = __builtin_return_address(0);
    const int64_t w = word(i);
    Shadow* s = g_shadow;
    if ((w >= 0 || global) && s != nullptr && s->trace != nullptr && s->tid >= 0)
      s->trace->reads[s->tid].push_back(
          {site, name, global ? -1 : w, static_cast<int64_t>(sizeof(T)) / 2});
    for (int k = 0; k < 2; ++k) check_read(i + k);
  }
  CONVLORA_HOOK void on_read(int i) const {
    const void* site = __builtin_return_address(0);  // the access's place in the kernel
    const int64_t w = word(i);
    if (w < 0 && !global) return;
    Shadow* s = g_shadow;  // a counted global array's load: counted, not race-checked
    if (s != nullptr && s->trace != nullptr && s->tid >= 0)
      s->trace->reads[s->tid].push_back({site, name, global ? -1 : w, 1});
    if (w >= 0) check_read(i);
  }
  // Loads of a global view (CONVLORA_GLOBAL_VIEW) that the GPU build takes through the
  // read-only path (ldg: one element, ldg2: two, ldg4: four, aligned as load2 and load4
  // require): here the same counted loads. Being inlined here, on both builds the access's
  // place is its caller's line, which is how the cost model pairs the machine code's loads
  // with these counts.
  CONVLORA_SITE T ldg(int i) const { return (*this)[i]; }
  CONVLORA_SITE void ldg2(int i, T (&out)[2]) const { load2(i, out); }
  CONVLORA_SITE V4<T> ldg4(int i) const { return load4(i); }
  // A store of two elements to a global view that the next kernel reads (stcg2: streamed
  // past L1 on the GPU, one 64-bit store): here store2, counted.
  CONVLORA_SITE void stcg2(int i, const T (&v)[2]) const { store2(i, v); }
  // The race check of a read of element i (its first word).
  void check_read(int i) const {
    const int64_t w = word(i);
    if (w < 0) return;
    Shadow& s = *g_shadow;
    if (s.wphase[w] == s.phase && s.wtid[w] != s.tid)
      smem_race(name, i, "written by", s.wtid[w], s.tid);
    if (s.rphase[w] != s.phase) {
      s.rphase[w] = s.phase;
      s.rtid[w] = s.tid;
    } else if (s.rtid[w] != s.tid) {
      s.rtid[w] = -2;  // read by several threads
    }
  }
  // Four elements from index i, as load4 takes them: one 128-bit store on the GPU.
  CONVLORA_SITE void store4(int i, const V4<T>& v) const {
    check_vector(i, "store");
    on_write4(i);
    for (int k = 0; k < 4; ++k) p[i + k] = v.v[k];
  }
  CONVLORA_HOOK void on_write4(int i) const {
    const void* site = __builtin_return_address(0);
    const int64_t w = word(i);
    Shadow* s = g_shadow;
    if ((w >= 0 || global) && s != nullptr && s->trace != nullptr && s->tid >= 0)
      s->trace->writes[s->tid].push_back(
          {site, name, global ? -1 : w, static_cast<int64_t>(sizeof(T))});
    for (int k = 0; k < 4; ++k) check_write(i + k);
  }
  // Two elements from index i, as load2 takes them: one 64-bit store on the GPU.
  CONVLORA_SITE void store2(int i, const T (&v)[2]) const {
    if (i < 0 || i + 1 >= n) smem_out_of_range(name, i < 0 ? i : i + 1, n);
    if (i % 2 != 0 || reinterpret_cast<uintptr_t>(p + i) % (2 * sizeof(T)) != 0)
      throw std::logic_error(std::string("stencil (checked build): shared array ") + name +
                             " pair store at index " + std::to_string(i) + " not aligned");
    on_write2(i);
    p[i] = v[0];
    p[i + 1] = v[1];
  }
  CONVLORA_HOOK void on_write2(int i) const {
    const void* site = __builtin_return_address(0);
    const int64_t w = word(i);
    Shadow* s = g_shadow;
    if ((w >= 0 || global) && s != nullptr && s->trace != nullptr && s->tid >= 0)
      s->trace->writes[s->tid].push_back(
          {site, name, global ? -1 : w, static_cast<int64_t>(sizeof(T)) / 2});
    for (int k = 0; k < 2; ++k) check_write(i + k);
  }
  CONVLORA_HOOK void on_write(int i) const {
    const void* site = __builtin_return_address(0);
    const int64_t w = word(i);
    if (w < 0 && !global) return;
    Shadow* s = g_shadow;  // a counted global array's store: counted, not race-checked
    if (s != nullptr && s->trace != nullptr && s->tid >= 0)
      s->trace->writes[s->tid].push_back({site, name, global ? -1 : w, 1});
    if (w >= 0) check_write(i);
  }
  // The race check of a write of element i (its first word).
  void check_write(int i) const {
    const int64_t w = word(i);
    if (w < 0) return;
    Shadow& s = *g_shadow;
    if (s.wphase[w] == s.phase && s.wtid[w] != s.tid)
      smem_race(name, i, "written by", s.wtid[w], s.tid);
    if (s.rphase[w] == s.phase && s.rtid[w] != s.tid)
      smem_race(name, i, "read by", s.rtid[w], s.tid);
    s.wphase[w] = s.phase;
    s.wtid[w] = s.tid;
  }
};
#define CONVLORA_SARR(T, base, off, count, nm) \
  SArr<T> { reinterpret_cast<T*>((base) + (off)), (count), nm }
// A global array read or written through SArr: bounds-checked, its loads and stores counted
// for the cost model.
#define CONVLORA_GLOBAL_VIEW(T, ptr, count, nm) \
  SArr<T> { const_cast<T*>(ptr), (count), nm, true }
#else
template <typename T>
struct SArr {
  T* p;
  CONVLORA_HD T& operator[](int i) const { return p[i]; }
  // Four consecutive elements from index i, a multiple of 4 at a 16-byte aligned address
  // (the checked build checks it): one 128-bit load on the GPU.
  CONVLORA_HD V4<T> load4(int i) const {
#if defined(__CUDA_ARCH__)
    if constexpr (sizeof(T) == 4 && std::is_integral<T>::value) {
      const int4 f = *reinterpret_cast<const int4*>(p + i);
      return V4<T>{{f.x, f.y, f.z, f.w}};
    } else if constexpr (sizeof(T) == 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + i);
      return V4<T>{{f.x, f.y, f.z, f.w}};
    } else
#endif
    {
      return V4<T>{{p[i], p[i + 1], p[i + 2], p[i + 3]}};
    }
  }
  // Two consecutive elements from index i (aligned to both): one 64-bit load on the GPU.
  CONVLORA_HD void load2(int i, T (&out)[2]) const {
#if defined(__CUDA_ARCH__)
    if constexpr (sizeof(T) == 4 && !std::is_integral<T>::value) {
      const float2 f = *reinterpret_cast<const float2*>(p + i);
      out[0] = f.x;
      out[1] = f.y;
      return;
    }
#endif
    out[0] = p[i];
    out[1] = p[i + 1];
  }
  // Loads of a global view through the read-only path (the checked build counts them).
  CONVLORA_HD T ldg(int i) const {
#if defined(__CUDA_ARCH__)
    return __ldg(p + i);
#else
    return p[i];
#endif
  }
  CONVLORA_HD void ldg2(int i, T (&out)[2]) const {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<T, float>) {
      const float2 f = __ldg(reinterpret_cast<const float2*>(p + i));
      out[0] = f.x;
      out[1] = f.y;
      return;
    }
#endif
    load2(i, out);
  }
  CONVLORA_HD V4<T> ldg4(int i) const {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<T, float>) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(p + i));
      return V4<T>{{f.x, f.y, f.z, f.w}};
    }
#endif
    return load4(i);
  }
  // Two elements from index i (8-byte aligned) to a global view that the next kernel reads:
  // st.global.cg on the GPU, one 64-bit store (a float2 store of the C++ may be split).
  CONVLORA_HD void stcg2(int i, const T (&v)[2]) const {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<T, float>) {
      __stcg(reinterpret_cast<float2*>(p + i), make_float2(v[0], v[1]));
      return;
    }
#endif
    store2(i, v);
  }
  CONVLORA_HD void store2(int i, const T (&v)[2]) const {
#if defined(__CUDA_ARCH__)
    if constexpr (sizeof(T) == 4 && !std::is_integral<T>::value) {
      *reinterpret_cast<float2*>(p + i) = make_float2(v[0], v[1]);
      return;
    }
#endif
    p[i] = v[0];
    p[i + 1] = v[1];
  }
  CONVLORA_HD void store4(int i, const V4<T>& v) const {
#if defined(__CUDA_ARCH__)
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(p + i) = make_float4(v.v[0], v.v[1], v.v[2], v.v[3]);
    } else
#endif
    {
      for (int k = 0; k < 4; ++k) p[i + k] = v.v[k];
    }
  }
};
#define CONVLORA_SARR(T, base, off, count, nm) \
  SArr<T> { reinterpret_cast<T*>((base) + (off)) }
#define CONVLORA_GLOBAL_VIEW(T, ptr, count, nm) \
  SArr<T> { const_cast<T*>(ptr) }
#endif

}  // namespace tile
}  // namespace convlora
