// Shared-memory traffic of one block, counted by the checked CPU build for the cost model
// (benchmarks/cost_model.py). Checked builds only (shared_array.h includes it there).
//
// Every 4-byte read and write of the block's shared memory is recorded per thread and
// phase. At the end of a phase the threads are grouped into warps of 32, and the i-th read
// (or write) of each lane of a warp is taken as one warp-level access instruction: the
// block's threads run the same code, so the i-th access of one lane is the one its
// neighbours make at the same instruction (lanes that make fewer accesses are idle for the
// rest). An access needs as many wavefronts as the most distinct words any one of the 32
// banks holds among its lanes' words (lanes reading one word share it).
#pragma once

#include <stdint.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace convlora {
namespace tile {

struct PhaseTraffic {
  std::string name;
  int64_t runs = 0;             // times the phase ran in the block (rounds)
  int64_t lane_accesses = 0;    // 4-byte reads and writes, summed over the threads
  int64_t warp_accesses = 0;    // warp-level access instructions
  int64_t wavefronts = 0;       // 32-bank wavefronts those need
  int64_t busiest_warp = 0;     // the access instructions of the phase's busiest warp
};

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
  std::vector<std::vector<int64_t>> reads, writes;  // per thread, this phase's words
  std::vector<PhaseTraffic> phases;                 // by name, in order of first run
  PhaseTraffic* current = nullptr;

  explicit Trace(int nthreads) : threads(nthreads), reads(nthreads), writes(nthreads) {}

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
  }

  // Counts one direction (reads or writes) of the phase; returns each warp's access
  // instructions.
  std::vector<int64_t> count(const std::vector<std::vector<int64_t>>& per_thread) {
    std::vector<int64_t> words, per_warp;
    for (int w0 = 0; w0 < threads; w0 += 32) {
      size_t most = 0;
      for (int l = w0; l < w0 + 32 && l < threads; ++l) most = std::max(most, per_thread[l].size());
      for (size_t i = 0; i < most; ++i) {
        words.clear();
        for (int l = w0; l < w0 + 32 && l < threads; ++l)
          if (i < per_thread[l].size()) words.push_back(per_thread[l][i]);
        current->lane_accesses += static_cast<int64_t>(words.size());
        current->warp_accesses += 1;
        current->wavefronts += wavefronts_of(words);
      }
      per_warp.push_back(static_cast<int64_t>(most));
    }
    return per_warp;
  }

  void end() {
    current->runs += 1;
    const auto r = count(reads), w = count(writes);
    int64_t busiest = 0;
    for (size_t i = 0; i < r.size(); ++i) busiest = std::max(busiest, r[i] + w[i]);
    current->busiest_warp += busiest;
    current = nullptr;
  }
};

// What the cost model asked for: whether stencil calls count, and their counts so far
// (phases summed over the blocks of each call; a "call" line per block-program launch).
struct TraceRequest {
  std::mutex mutex;
  bool on = false;
  std::vector<std::string> calls;      // "call <blocks> <shared bytes per block>"
  std::vector<PhaseTraffic> phases;    // of the latest call
  std::ostringstream done;             // the report of the calls before it

  void flush() {
    for (const auto& p : phases)
      done << p.name << ' ' << p.runs << ' ' << p.lane_accesses << ' ' << p.warp_accesses
           << ' ' << p.wavefronts << ' ' << p.busiest_warp << '\n';
    phases.clear();
  }
  void start(bool enable) {
    std::lock_guard<std::mutex> lock(mutex);
    on = enable;
    phases.clear();
    done.str("");
  }
  void begin_call(int64_t blocks, int bytes) {
    std::lock_guard<std::mutex> lock(mutex);
    flush();
    done << "call " << blocks << ' ' << bytes << '\n';
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
    }
  }
};
inline TraceRequest& trace_request() {
  static TraceRequest r;
  return r;
}

// Per call: a line "call <blocks> <shared bytes per block>", then one line per phase:
// name runs lane_accesses warp_accesses wavefronts busiest_warp (summed over the call's
// blocks; runs counts the phase once per block and round).
inline std::string trace_report() {
  auto& req = trace_request();
  std::lock_guard<std::mutex> lock(req.mutex);
  req.flush();
  return req.done.str();
}

}  // namespace tile
}  // namespace convlora
