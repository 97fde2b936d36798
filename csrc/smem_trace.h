// Shared-memory traffic of one block, counted by the checked CPU build for the cost model
// (benchmarks/cost_model.py). Checked builds only (shared_array.h includes it there).
//
// Every read and write of the block's shared memory is recorded per thread and phase with
// its site (the place in the kernel's code that made it, from the hook's return address)
// and its words (one 4-byte word, or the four of a 128-bit vector load: one access). At
// the end of a phase the threads are grouped into warps of 32, and the lanes' accesses
// are aligned as a warp executes them: the k-th access one lane makes at a site
// and the k-th its neighbours make there are one warp-level instruction, and a lane that
// skipped the site (a branch not taken, a loop run fewer times) is idle for it. An access
// needs as many wavefronts as the most distinct words any one of the 32 banks holds among
// its lanes' words (lanes reading one word share it). How a GPU schedules a 128-bit access
// is not published; the count above takes the warp's words together, so 32 lanes reading
// one vector cost one wavefront. A second count (quarter_wavefronts) takes each quarter
// warp's (8 lanes') words apart, as 128-bit accesses are often described: at least a
// wavefront per quarter with an active lane, so that broadcast costs four. The cost model
// prints both; a GPU's counters tell which is right. A loop the GPU build unrolls is one
// site here, so a lane that skips an iteration (a conv tap outside the map) pairs its
// later accesses there with its neighbours' next ones, where on a GPU each unrolled copy
// is an instruction of its own: that overstates the conflicts of warps with such lanes.
#pragma once

#include <dlfcn.h>
#include <stdint.h>

#include <algorithm>
#include <array>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace convlora {
namespace tile {

struct PhaseTraffic {
  std::string name;
  int64_t runs = 0;             // times the phase ran in the block (rounds)
  int64_t lane_accesses = 0;    // 4-byte words read and written, summed over the threads
  int64_t warp_accesses = 0;    // warp-level access instructions
  int64_t wavefronts = 0;       // 32-bank wavefronts those need
  int64_t ideal = 0;            // the fewest they could need: distinct words / 32, rounded up
  int64_t busiest_warp = 0;     // the access instructions of the phase's busiest warp
  int64_t quarter_wavefronts = 0;  // wavefronts if 128-bit accesses go by quarter warps
  int64_t global_accesses = 0;  // warp-level loads of counted global arrays (SArr::global)
  int64_t mma_ops = 0;          // warp-level MMAs (tile_mma.h: mma_tf32)
  int64_t busiest_mma = 0;      // the MMAs of the phase's warp with the most of them
};

// One site's share of a phase (its reads or its writes): what `smem_sites` reports, so a
// conflicted phase can be traced to its line (benchmarks/cost_model.py --sites).
struct SiteTraffic {
  int64_t warp_accesses = 0, wavefronts = 0, ideal = 0;
};
struct SiteKey {
  std::string phase;
  const void* site;
  const char* array;
  char rw;  // 'r' or 'w', or 'g': a counted global array's load (no wavefronts)
  bool operator<(const SiteKey& o) const {
    return std::tie(phase, site, array, rw) < std::tie(o.phase, o.site, o.array, o.rw);
  }
};
using SiteTable = std::map<SiteKey, SiteTraffic>;

// Wavefronts of one warp-level access to the given words (one per active lane).
inline int64_t wavefronts_of(std::vector<int64_t>& words) {
  std::sort(words.begin(), words.end());
  words.erase(std::unique(words.begin(), words.end()), words.end());
  std::array<int, 32> per_bank{};
  int most = 0;
  for (const int64_t w : words) most = std::max(most, ++per_bank[static_cast<int>(w & 31)]);
  return most;
}

struct Trace {
  int threads = 0;
  struct Access {
    const void* site;
    const char* array;  // the shared array's name
    int64_t word;   // the first 4-byte word; -1: a counted global array's (no banks)
    int64_t words;  // consecutive words from it: 1, or 2 or 4 for a vector load (load2, load4)
  };
  std::vector<std::vector<Access>> reads, writes;  // per thread, this phase's accesses
  std::vector<int64_t> mmas;                        // per warp, this phase's MMAs
  std::vector<PhaseTraffic> phases;                 // by name, in order of first run
  SiteTable sites;                                  // the same counts by site
  PhaseTraffic* current = nullptr;

  explicit Trace(int nthreads)
      : threads(nthreads), reads(nthreads), writes(nthreads), mmas((nthreads + 31) / 32) {}

  // One warp-level MMA of the warp of thread tid (the CPU's mma_tf32 runs once a warp).
  void mma(int tid) {
    if (current == nullptr || tid < 0) return;
    current->mma_ops += 1;
    mmas[tid / 32] += 1;
  }

  void begin(const char* name) {
    current = nullptr;
    for (auto& p : phases)
      if (p.name == name) current = &p;
    if (current == nullptr) {
      phases.push_back(PhaseTraffic{name});
      current = &phases.back();
    }
    for (auto& v : reads) v.clear();
    for (auto& v : writes) v.clear();
    std::fill(mmas.begin(), mmas.end(), 0);
  }

  // Counts one direction (reads or writes) of the phase; returns each warp's access
  // instructions.
  struct Group {
    std::vector<int64_t> words;                   // the warp's
    std::array<std::vector<int64_t>, 4> quarter;  // each quarter warp's
    bool wide = false;                            // 128-bit accesses
  };

  std::vector<int64_t> count(const std::vector<std::vector<Access>>& per_thread, char rw) {
    std::vector<int64_t> per_warp;
    std::map<std::pair<const void*, int64_t>, Group> groups;
    std::map<const void*, const char*> arrays;
    std::map<const void*, int64_t> seen;
    for (int w0 = 0; w0 < threads; w0 += 32) {
      groups.clear();
      for (int l = w0; l < w0 + 32 && l < threads; ++l) {
        seen.clear();
        for (const Access& a : per_thread[l]) {
          Group& g = groups[{a.site, seen[a.site]++}];
          arrays[a.site] = a.array;
          g.wide = g.wide || a.words > 1;
          for (int64_t k = 0; k < a.words; ++k) {
            g.words.push_back(a.word + k);
            g.quarter[(l - w0) / 8].push_back(a.word + k);
          }
        }
      }
      int64_t global = 0;
      for (auto& [key, g] : groups) {
        auto& words = g.words;
        if (!words.empty() && words.front() < 0) {  // a global array's: no wavefronts
          ++global;  // by site too ('g' a load, 'G' a store), for the cost model's count
          const char grw = rw == 'r' ? 'g' : 'G';  // of instructions
          sites[SiteKey{current->name, key.first, arrays[key.first], grw}].warp_accesses += 1;
          continue;
        }
        current->lane_accesses += static_cast<int64_t>(words.size());
        const int64_t wf = wavefronts_of(words);  // leaves the distinct words
        const int64_t ideal = std::max<int64_t>(1, (static_cast<int64_t>(words.size()) + 31) / 32);
        int64_t qwf = g.wide ? 0 : wf;
        if (g.wide)
          for (auto& q : g.quarter) qwf += q.empty() ? 0 : wavefronts_of(q);
        current->wavefronts += wf;
        current->quarter_wavefronts += qwf;
        current->ideal += ideal;
        SiteTraffic& st = sites[SiteKey{current->name, key.first, arrays[key.first], rw}];
        st.warp_accesses += 1;
        st.wavefronts += wf;
        st.ideal += ideal;
      }
      current->warp_accesses += static_cast<int64_t>(groups.size()) - global;
      current->global_accesses += global;
      per_warp.push_back(static_cast<int64_t>(groups.size()));
    }
    return per_warp;
  }

  void end() {
    current->runs += 1;
    const auto r = count(reads, 'r'), w = count(writes, 'w');
    int64_t busiest = 0;
    for (size_t i = 0; i < r.size(); ++i) busiest = std::max(busiest, r[i] + w[i]);
    current->busiest_warp += busiest;
    current->busiest_mma += *std::max_element(mmas.begin(), mmas.end());
    current = nullptr;
  }
};

// What the cost model asked for: whether stencil calls count, and their counts so far
// (phases summed over the blocks of each call; a "call" line per block-program launch).
struct TraceRequest {
  std::mutex mutex;
  bool on = false;
  std::vector<PhaseTraffic> phases;    // of the latest call
  SiteTable sites;                     // of the latest call, by site
  std::ostringstream done;             // the report of the calls before it
  std::ostringstream done_sites;       // the same by site (smem_sites)

  void flush() {
    for (const auto& p : phases)
      done << p.name << ' ' << p.runs << ' ' << p.lane_accesses << ' ' << p.warp_accesses
           << ' ' << p.wavefronts << ' ' << p.busiest_warp << ' ' << p.ideal << ' '
           << p.quarter_wavefronts << ' ' << p.global_accesses << ' ' << p.mma_ops << ' '
           << p.busiest_mma << '\n';
    phases.clear();
    for (const auto& [k, t] : sites) {
      // the site as an offset into the shared object that holds it (addr2line reads it)
      Dl_info info{};
      const auto off = dladdr(k.site, &info) != 0 && info.dli_fbase != nullptr
                           ? reinterpret_cast<uintptr_t>(k.site) -
                                 reinterpret_cast<uintptr_t>(info.dli_fbase)
                           : reinterpret_cast<uintptr_t>(k.site);
      done_sites << k.phase << ' ' << k.rw << " 0x" << std::hex << off << std::dec << ' '
                 << t.warp_accesses << ' ' << t.wavefronts << ' ' << t.ideal << ' ' << k.array
                 << '\n';
    }
    sites.clear();
  }
  void start(bool enable) {
    std::lock_guard<std::mutex> lock(mutex);
    on = enable;
    phases.clear();
    sites.clear();
    done.str("");
    done_sites.str("");
  }
  void begin_call(int64_t blocks, int bytes) {
    std::lock_guard<std::mutex> lock(mutex);
    flush();
    done << "call " << blocks << ' ' << bytes << '\n';
    done_sites << "call " << blocks << ' ' << bytes << '\n';
  }
  void add(const Trace& t) {  // one worker's blocks
    std::lock_guard<std::mutex> lock(mutex);
    for (const auto& p : t.phases) {
      PhaseTraffic* into = nullptr;
      for (auto& q : phases)
        if (q.name == p.name) into = &q;
      if (into == nullptr) {
        phases.push_back(PhaseTraffic{p.name});
        into = &phases.back();
      }
      into->runs += p.runs;
      into->lane_accesses += p.lane_accesses;
      into->warp_accesses += p.warp_accesses;
      into->wavefronts += p.wavefronts;
      into->busiest_warp += p.busiest_warp;
      into->ideal += p.ideal;
      into->quarter_wavefronts += p.quarter_wavefronts;
      into->global_accesses += p.global_accesses;
      into->mma_ops += p.mma_ops;
      into->busiest_mma += p.busiest_mma;
    }
    for (const auto& [k, c] : t.sites) {
      SiteTraffic& into = sites[k];
      into.warp_accesses += c.warp_accesses;
      into.wavefronts += c.wavefronts;
      into.ideal += c.ideal;
    }
  }
};
inline TraceRequest& trace_request() {
  static TraceRequest r;
  return r;
}

// Per call: a line "call <blocks> <shared bytes per block>", then one line per phase:
// name runs lane_accesses warp_accesses wavefronts busiest_warp ideal quarter_wavefronts
// global_accesses mma_ops busiest_mma (summed over the call's blocks; runs counts the phase
// once per block and round; busiest_warp counts the global loads too, not the MMAs).
inline std::string trace_report() {
  auto& req = trace_request();
  std::lock_guard<std::mutex> lock(req.mutex);
  req.flush();
  return req.done.str();
}

// The same counts by site: a "library <path>" line (the shared object the offsets are
// in), then per call a "call" line, then per (phase, site) of the calls'
// reads (r) and writes (w): phase r|w 0x<offset in the shared object> warp_accesses
// wavefronts ideal array (the array's name, which may hold spaces).
inline std::string trace_sites() {
  auto& req = trace_request();
  std::lock_guard<std::mutex> lock(req.mutex);
  req.flush();
  Dl_info info{};  // the shared object these counts' offsets are in, for addr2line
  const bool found = dladdr(reinterpret_cast<const void*>(&trace_sites), &info) != 0 &&
                     info.dli_fname != nullptr;
  return std::string("library ") + (found ? info.dli_fname : "?") + '\n' + req.done_sites.str();
}

}  // namespace tile
}  // namespace convlora
