// nsa.hpp: a small RAII wrapper over the C ABI (nsa.h), C++17, header-only.
//
// Errors become nsa::Error exceptions carrying the status and nsa_last_error(). Memory
// the engine needs is owned by std::unique_ptr with free() as deleter, and the handles
// living in it by std::unique_ptr with nsa_cache_deinit / nsa_cpu_backend_destroy as
// deleters; members are declared so that handles go before the memory under them.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "nsa.h"

namespace nsa {

class Error : public std::runtime_error {
  public:
    // nsa_last_error() already names the failed function.
    explicit Error(nsa_status status)
        : std::runtime_error(std::string(nsa_status_string(status)) + ": " + nsa_last_error()), status(status) {}
    nsa_status status;
};

inline void check(nsa_status status) {
    if (status != NSA_STATUS_OK) throw Error(status);
}

struct FreeDeleter {
    void operator()(void* p) const noexcept { std::free(p); }
};
struct CacheDeleter {
    void operator()(nsa_cache* c) const noexcept { nsa_cache_deinit(c); }
};
struct CpuBackendDeleter {
    void operator()(nsa_cpu_backend* b) const noexcept { nsa_cpu_backend_destroy(b); }
};

using Memory = std::unique_ptr<void, FreeDeleter>;
using CachePtr = std::unique_ptr<nsa_cache, CacheDeleter>;
using CpuBackendPtr = std::unique_ptr<nsa_cpu_backend, CpuBackendDeleter>;

// 64-byte aligned memory (the engine needs 16).
inline Memory allocate(size_t bytes) {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return Memory(p);
}

inline nsa_config_t preset(nsa_preset which) {
    nsa_config_t c{};
    c.struct_size = sizeof c;
    check(nsa_config_preset(which, &c));
    return c;
}

// A paged NSA cache and a CPU backend over memory this object owns. Not copyable; one
// thread at a time (nsa.h "Thread safety").
class Engine {
  public:
    explicit Engine(const nsa_config_t& cfg) : cfg_(cfg) {
        check(nsa_config_validate(&cfg_));
        check(nsa_cache_arena_size(&cfg_, &arena_bytes_));
        check(nsa_cpu_buffer_size(&cfg_, &buffer_bytes_));
        arena_ = allocate(arena_bytes_);
        buffer_ = allocate(buffer_bytes_);
        nsa_cache* cache = nullptr;
        check(nsa_cache_init(&cfg_, arena_.get(), arena_bytes_, &cache));
        cache_.reset(cache);
        nsa_cpu_backend* cpu = nullptr;
        check(nsa_cpu_backend_create(&cfg_, buffer_.get(), buffer_bytes_, &cpu));
        cpu_.reset(cpu);
    }

    const nsa_config_t& config() const { return cfg_; }
    size_t arena_bytes() const { return arena_bytes_; }
    size_t buffer_bytes() const { return buffer_bytes_; }

    void add(uint32_t seq) { check(nsa_cache_add(cache_.get(), seq)); }
    void fork(uint32_t src, uint32_t dst) { check(nsa_cache_fork(cache_.get(), src, dst)); }
    void truncate(uint32_t seq, uint32_t len) { check(nsa_cache_truncate(cache_.get(), seq, len)); }
    void remove(uint32_t seq) { check(nsa_cache_remove(cache_.get(), seq)); }
    uint32_t len(uint32_t seq) const {
        uint32_t n = 0;
        check(nsa_cache_len(cache_.get(), seq, &n));
        return n;
    }
    nsa_cache_stats_t stats() const {
        nsa_cache_stats_t s{};
        s.struct_size = sizeof s;
        check(nsa_cache_stats(cache_.get(), &s));
        return s;
    }

    // The live sequence ids, ascending.
    std::vector<uint32_t> sequences() const {
        uint32_t n = 0;
        check(nsa_cache_sequences(cache_.get(), nullptr, 0, &n));
        std::vector<uint32_t> ids(n);
        check(nsa_cache_sequences(cache_.get(), ids.data(), n, &n));
        return ids;
    }

    // One sequence's state (length, K/V rows, compressed tokens of every layer), to keep
    // and restore later into any free slot of an engine with the same config.
    std::vector<unsigned char> save(uint32_t seq) {
        size_t need = 0, used = 0;
        check(nsa_cache_state_size(cache_.get(), seq, &need));
        std::vector<unsigned char> state(need);
        check(nsa_cpu_state_export(cpu_.get(), cache_.get(), seq, state.data(), state.size(), &used));
        state.resize(used);
        return state;
    }
    void restore(uint32_t seq, const std::vector<unsigned char>& state) {
        check(nsa_cpu_state_import(cpu_.get(), cache_.get(), seq, state.data(), state.size()));
    }

    // Once per step, before its layers.
    void plan(const std::vector<nsa_step_seq_t>& entries) {
        check(nsa_cache_plan_step(cache_.get(), entries.data(), static_cast<uint32_t>(entries.size())));
    }

    // Once per layer and step. Fills io.struct_size and io.dtype.
    void run_layer(uint32_t layer, nsa_layer_io_t io) {
        io.struct_size = sizeof io;
        io.dtype = cfg_.dtype;
        check(nsa_cpu_run_layer(cpu_.get(), cache_.get(), layer, &io));
    }

  private:
    nsa_config_t cfg_;
    size_t arena_bytes_ = 0, buffer_bytes_ = 0;
    Memory arena_, buffer_;  // destroyed after the handles below
    CachePtr cache_;
    CpuBackendPtr cpu_;
};

}  // namespace nsa
