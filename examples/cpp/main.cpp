// nsa C++ example: prefix sharing and speculative decoding with bf16 activations on the
// CPU backend, through the RAII wrapper in nsa.hpp. Every layer's output is checked
// against a naive attention computed here (see examples/c/nsa_example.c for why the
// config makes NSA checkable with plain loops):
//     out = g_cmp * Attn(q, mean-pooled K/V) + (g_slc + g_win) * Attn(q, K, V).
//
// The host keeps its own copy of each sequence's keys and values for that check; fork
// copies it and truncate shortens it, exactly what the engine does to the cache.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>

#include "nsa.h"
#include "nsa.h"  // the header can be included twice
#include "nsa.hpp"

namespace {

constexpr uint32_t HQ = 8, HKV = 2, DK = 64, DV = 64, LAYERS = 2, MAX_LEN = 384;

using bf16 = uint16_t;
bf16 to_bf16(float f) {  // round to nearest even (inputs here are finite)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<bf16>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
float from_bf16(bf16 h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// The host's copy of one sequence: keys and values per layer, as stored (bf16-rounded).
struct History {
    std::vector<float> k[LAYERS], v[LAYERS];  // [len][HKV][D]
    uint32_t len() const { return static_cast<uint32_t>(k[0].size() / (HKV * DK)); }
    void truncate(uint32_t n) {
        for (uint32_t l = 0; l < LAYERS; l++) k[l].resize(size_t(n) * HKV * DK), v[l].resize(size_t(n) * HKV * DV);
    }
};

// softmax(scale q.K^T) V over the rows idx(0..n) of K/V; zero when n == 0.
template <class Row>
void attend(const float* q, uint32_t n, Row row, float scale, double* o) {
    double m = -INFINITY, sum = 0;
    std::fill(o, o + DV, 0.0);
    std::vector<float> kr(DK), vr(DV);
    for (uint32_t i = 0; i < n; i++) {
        row(i, kr.data(), vr.data());
        double s = 0;
        for (uint32_t j = 0; j < DK; j++) s += double(q[j]) * kr[j];
        s *= scale;
        if (s > m) {
            for (uint32_t j = 0; j < DV; j++) o[j] *= std::exp(m - s);
            sum *= std::exp(m - s);
            m = s;
        }
        sum += std::exp(s - m);
        for (uint32_t j = 0; j < DV; j++) o[j] += std::exp(s - m) * vr[j];
    }
    for (uint32_t j = 0; j < DV; j++) o[j] = n ? o[j] / sum : 0.0;
}

void naive(const nsa_config_t& c, const History& hs, uint32_t layer, uint32_t t, uint32_t h, const float* q,
           const float* g, double* out) {
    const uint32_t kv = h / (HQ / HKV), l = c.cmp_block, d = c.cmp_stride;
    const float* K = hs.k[layer].data();
    const float* V = hs.v[layer].data();
    double full[DV], cmp[DV];
    attend(q, t + 1, [&](uint32_t p, float* kr, float* vr) {
        std::memcpy(kr, &K[(size_t(p) * HKV + kv) * DK], DK * 4);
        std::memcpy(vr, &V[(size_t(p) * HKV + kv) * DV], DV * 4);
    }, c.scale, full);
    const uint32_t ncmp = t + 1 >= l ? (t + 1 - l) / d + 1 : 0;
    attend(q, ncmp, [&](uint32_t i, float* kr, float* vr) {
        for (uint32_t j = 0; j < DK; j++) {
            double s = 0;
            for (uint32_t p = i * d; p < i * d + l; p++) s += K[(size_t(p) * HKV + kv) * DK + j];
            kr[j] = float(s / l);
        }
        for (uint32_t j = 0; j < DV; j++) {
            double s = 0;
            for (uint32_t p = i * d; p < i * d + l; p++) s += V[(size_t(p) * HKV + kv) * DV + j];
            vr[j] = float(s / l);
        }
    }, c.scale, cmp);
    for (uint32_t j = 0; j < DV; j++) out[j] = g[0] * cmp[j] + (g[1] + g[2]) * full[j];
}

struct Host {
    nsa::Engine engine;
    std::map<uint32_t, History> seqs;
    std::mt19937 rng{42};
    double max_err = 0;
    long checked = 0;

    float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

    void fork(uint32_t src, uint32_t dst) {
        engine.fork(src, dst);
        seqs[dst] = seqs.at(src);
    }
    void truncate(uint32_t seq, uint32_t len) {
        engine.truncate(seq, len);
        seqs.at(seq).truncate(len);
    }

    // One step: plan once, then every layer; each layer's rows checked.
    void step(const std::vector<nsa_step_seq_t>& entries) {
        engine.plan(entries);
        uint32_t tokens = 0;
        for (auto& e : entries) tokens += e.tokens;
        std::vector<bf16> q(size_t(tokens) * HQ * DK), k(size_t(tokens) * HKV * DK), v(size_t(tokens) * HKV * DV),
            out(size_t(tokens) * HQ * DV, 0xFFFF);
        std::vector<float> gates(size_t(tokens) * HQ * 3);
        for (uint32_t layer = 0; layer < LAYERS; layer++) {
            for (auto& x : q) x = to_bf16(uniform(-2, 2));
            for (auto& x : k) x = to_bf16(uniform(-1, 1));
            for (auto& x : v) x = to_bf16(uniform(-1, 1));
            for (auto& x : gates) x = uniform(0, 1);
            uint32_t row = 0;
            for (auto& e : entries) {  // the host's copy of the new rows
                History& hs = seqs.at(e.seq);
                for (uint32_t r = 0; r < e.tokens; r++, row++) {
                    for (uint32_t i = 0; i < HKV * DK; i++) hs.k[layer].push_back(from_bf16(k[size_t(row) * HKV * DK + i]));
                    for (uint32_t i = 0; i < HKV * DV; i++) hs.v[layer].push_back(from_bf16(v[size_t(row) * HKV * DV + i]));
                }
            }
            nsa_layer_io_t io{};
            io.tokens = tokens;
            io.q = q.data();
            io.k = k.data();
            io.v = v.data();
            io.gates = gates.data();
            io.out = out.data();
            engine.run_layer(layer, io);

            row = 0;
            for (auto& e : entries) {
                const History& hs = seqs.at(e.seq);
                for (uint32_t r = 0; r < e.tokens; r++, row++) {
                    const uint32_t t = hs.len() - e.tokens + r;
                    for (uint32_t h = 0; h < HQ; h++) {
                        float qf[DK];
                        for (uint32_t j = 0; j < DK; j++) qf[j] = from_bf16(q[(size_t(row) * HQ + h) * DK + j]);
                        double want[DV];
                        naive(engine.config(), hs, layer, t, h, qf, &gates[(size_t(row) * HQ + h) * 3], want);
                        for (uint32_t j = 0; j < DV; j++) {
                            double err = std::fabs(from_bf16(out[(size_t(row) * HQ + h) * DV + j]) - want[j]);
                            if (!(err <= max_err)) max_err = err;  // NaN propagates as a failure
                        }
                        checked++;
                    }
                }
            }
        }
    }
};

}  // namespace

int main() try {
    nsa_config_t cfg = nsa::preset(NSA_PRESET_FLA);  // l = d = l' = 64, phi = mean
    cfg.num_q_heads = HQ;
    cfg.num_kv_heads = HKV;
    cfg.head_dim_qk = DK;
    cfg.head_dim_v = DV;
    cfg.scale = 1.0f / std::sqrt(float(DK));
    cfg.dtype = NSA_DTYPE_BF16;
    cfg.num_layers = LAYERS;
    cfg.max_seqs = 4;
    cfg.max_step_seqs = 4;
    cfg.max_seq_len = MAX_LEN;
    cfg.max_step_tokens = 512;
    cfg.cpu_threads = 3;
    nsa::check(nsa_config_fit_pages(&cfg));

    Host host{nsa::Engine(cfg), {}, {}, 0, 0};
    std::printf("nsa C++ example: libnsa %s (ABI %u), bf16, HQ=%u HKV=%u D=%u, %u layers; arena %zu B, cpu buffer %zu B\n",
                nsa_version_string(), nsa_abi_version(), HQ, HKV, DK, LAYERS, host.engine.arena_bytes(),
                host.engine.buffer_bytes());

    // Prefix sharing: prefill one prompt, fork it into two more requests.
    host.engine.add(0);
    host.seqs[0];
    host.step({{0, 130}});
    host.fork(0, 1);
    host.fork(0, 2);
    auto shared = host.engine.stats();
    std::printf("prompt of 130 tokens prefilled once and forked twice: %u raw pages in use\n",
                shared.raw_pages - shared.raw_free);
    for (int i = 0; i < 8; i++) host.step({{0, 1}, {1, 1}, {2, 1}});

    // Speculative decoding on sequence 1: verify 4 draft tokens in one step, accept 1.
    host.step({{0, 1}, {1, 4}, {2, 1}});
    host.truncate(1, host.engine.len(1) - 3);
    std::printf("speculative step: 4 drafts verified, 3 rejected, sequence 1 back to %u tokens\n", host.engine.len(1));
    for (int i = 0; i < 6; i++) host.step({{0, 1}, {1, 1}, {2, 1}});

    // Request 2 pauses: its state is saved and its slot freed; a new request takes slot 3
    // (and the pages request 2 held).
    auto saved = host.engine.save(2);
    host.engine.remove(2);
    History paused = host.seqs.at(2);
    host.seqs.erase(2);
    host.engine.add(3);
    host.seqs[3];
    host.step({{3, 50}, {0, 1}, {1, 1}});
    for (int i = 0; i < 4; i++) host.step({{0, 1}, {1, 1}, {3, 1}});

    try {
        host.engine.fork(2, 1);
        std::printf("FAIL: forking a removed sequence succeeded\n");
        return 1;
    } catch (const nsa::Error& e) {
        std::printf("expected error: %s\n", e.what());
    }

    // Request 2 resumes from its saved state, in slot 2 again, and decodes on.
    host.engine.restore(2, saved);
    host.seqs[2] = paused;
    const auto live = host.engine.sequences();
    std::printf("request 2 restored from %zu saved bytes: live sequences", saved.size());
    for (uint32_t id : live) std::printf(" %u", id);
    std::printf("\n");
    if (live != std::vector<uint32_t>{0, 1, 2, 3}) {
        std::printf("FAIL: live sequences after the restore\n");
        return 1;
    }
    for (int i = 0; i < 4; i++) host.step({{0, 1}, {1, 1}, {2, 1}, {3, 1}});

    auto s = host.engine.stats();
    std::printf("lengths: seq0 %u, seq1 %u, seq2 %u, seq3 %u; raw pages %u of %u in use, %u live sequences\n",
                host.engine.len(0), host.engine.len(1), host.engine.len(2), host.engine.len(3), s.raw_pages - s.raw_free, s.raw_pages,
                s.live_seqs);
    std::printf("checked %ld outputs (token x head x layer) against naive attention: max |err| = %.3g\n",
                host.checked, host.max_err);
    const bool ok = host.max_err < 2e-2;  // bf16 outputs: about 3 significant digits
    std::printf("%s\n", ok ? "OK" : "FAIL");
    return ok ? 0 : 1;
} catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
}
