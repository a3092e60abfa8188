/*
 * nsa C example: three sequences, one prefill step and a decode loop on the CPU backend,
 * each layer's output checked against a naive attention this file computes itself.
 *
 * The config makes NSA's three branches checkable by plain loops: every selection block
 * is selected (sel_count * sel_block >= max_seq_len) and the window covers every key
 * (window >= max_seq_len), so the selected and window branches are both full causal
 * attention, and the compressed branch (phi = mean) is attention over block means:
 *     out = g_cmp * Attn(q, mean-pooled K/V) + (g_slc + g_win) * Attn(q, K, V).
 *
 * Build: make (see Makefile); run: ./nsa_example. Exit status 0 when every check passes.
 */
#define _POSIX_C_SOURCE 200112L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nsa.h"
#include "nsa.h" /* the header can be included twice */

#define HQ 4
#define HKV 2
#define DK 32
#define DV 32
#define LAYERS 2
#define SEQS 3
#define MAX_LEN 256
#define DECODE_STEPS 20

/* Stops with the library's message when a call fails. */
#define CHECK(call)                                                                         \
    do {                                                                                    \
        nsa_status st_ = (call);                                                            \
        if (st_ != NSA_STATUS_OK) {                                                         \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #call,        \
                    nsa_status_string(st_), nsa_last_error());                              \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

static uint64_t rng_state = 0x2545F4914F6CDD1DULL;
static float rnd(void) { /* uniform in [-1, 1) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (float)((rng_state * 0x2545F4914F6CDD1DULL) >> 40) / (float)(1 << 23) - 1.0f;
}

static void *alloc(size_t bytes) { /* 64-byte aligned; the engine needs 16 */
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 1) != 0) {
        fprintf(stderr, "out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

/* Keys and values of every layer, sequence and position: the naive reference's copy. */
static float hist_k[LAYERS][SEQS][MAX_LEN][HKV][DK];
static float hist_v[LAYERS][SEQS][MAX_LEN][HKV][DV];

/* softmax(scale * q.K^T) V over n contiguous keys; zero when n == 0. */
static void attend(const float *q, const float *keys, const float *vals, int n, float scale, double *o) {
    double m = -INFINITY, sum = 0.0;
    int i, j;
    for (j = 0; j < DV; j++) o[j] = 0.0;
    for (i = 0; i < n; i++) {
        double s = 0.0;
        for (j = 0; j < DK; j++) s += (double)q[j] * keys[i * DK + j];
        s *= scale;
        if (s > m) { /* rescale what was accumulated under the old maximum */
            double c = exp(m - s);
            sum *= c;
            for (j = 0; j < DV; j++) o[j] *= c;
            m = s;
        }
        sum += exp(s - m);
        for (j = 0; j < DV; j++) o[j] += exp(s - m) * vals[i * DV + j];
    }
    for (j = 0; j < DV; j++) o[j] = n ? o[j] / sum : 0.0;
}

/* Naive NSA output of query head h at position t (see the top of the file). */
static void naive(const nsa_config_t *c, int layer, int seq, int t, int h, const float *q, const float *g,
                  float *out) {
    /* The config's scale 0 (the presets') means 1/sqrt(DK). */
    const float scale = c->scale != 0.0f ? c->scale : 1.0f / sqrtf((float)c->head_dim_qk);
    static float keys[MAX_LEN * DK], vals[MAX_LEN * DV];
    double full[DV], cmp[DV];
    int kv = h / (HQ / HKV), l = (int)c->cmp_block, d = (int)c->cmp_stride, n = 0, i, p, j;
    for (p = 0; p <= t; p++) {
        memcpy(&keys[p * DK], hist_k[layer][seq][p][kv], sizeof(float) * DK);
        memcpy(&vals[p * DV], hist_v[layer][seq][p][kv], sizeof(float) * DV);
    }
    attend(q, keys, vals, t + 1, scale, full);
    for (i = 0; i * d + l - 1 <= t; i++, n++) { /* compressed token i: mean of [i*d, i*d+l) */
        for (j = 0; j < DK; j++) {
            double s = 0.0;
            for (p = i * d; p < i * d + l; p++) s += hist_k[layer][seq][p][kv][j];
            keys[i * DK + j] = (float)(s / l);
        }
        for (j = 0; j < DV; j++) {
            double s = 0.0;
            for (p = i * d; p < i * d + l; p++) s += hist_v[layer][seq][p][kv][j];
            vals[i * DV + j] = (float)(s / l);
        }
    }
    attend(q, keys, vals, n, scale, cmp);
    for (j = 0; j < DV; j++) out[j] = (float)(g[0] * cmp[j] + (g[1] + g[2]) * full[j]);
}

int main(void) {
    const nsa_api_v2 *api = nsa_get_api(NSA_ABI_VERSION);
    nsa_config_t cfg;
    nsa_cache *cache = NULL;
    nsa_cpu_backend *cpu = NULL;
    nsa_cache_stats_t stats;
    size_t arena_bytes = 0, buf_bytes = 0;
    void *arena, *buf;
    float *q, *k, *v, *gates, *out;
    int32_t *selected;
    double max_err = 0.0;
    long checked = 0;
    int step, s, bad_blocks = 0;
    uint32_t lens[SEQS] = {0, 0, 0};
    const uint32_t prompt[SEQS] = {100, 37, 150};

    if (api == NULL || nsa_abi_version() != NSA_ABI_VERSION) {
        fprintf(stderr, "libnsa does not implement ABI %d: %s\n", NSA_ABI_VERSION, nsa_last_error());
        return 1;
    }

    /* Configure: the paper's NSA parameters, a small model shape, f32. */
    cfg.struct_size = sizeof cfg;
    CHECK(nsa_config_preset(NSA_PRESET_PAPER, &cfg));
    cfg.num_q_heads = HQ;
    cfg.num_kv_heads = HKV;
    cfg.head_dim_qk = DK;
    cfg.head_dim_v = DV;
    /* cfg.scale stays 0 (the preset's): the engine uses 1/sqrt(head_dim_qk). */
    cfg.dtype = NSA_DTYPE_F32;
    cfg.num_layers = LAYERS;
    cfg.max_seqs = SEQS;
    cfg.max_step_seqs = SEQS;
    cfg.max_seq_len = MAX_LEN;
    cfg.max_step_tokens = 512;
    cfg.cpu_threads = 4;
    CHECK(nsa_config_fit_pages(&cfg));
    CHECK(nsa_config_validate(&cfg));

    /* The caller owns all memory: ask the sizes, allocate, hand them over. */
    CHECK(nsa_cache_arena_size(&cfg, &arena_bytes));
    CHECK(nsa_cpu_buffer_size(&cfg, &buf_bytes));
    arena = alloc(arena_bytes);
    buf = alloc(buf_bytes);
    CHECK(nsa_cache_init(&cfg, arena, arena_bytes, &cache));
    CHECK(nsa_cpu_backend_create(&cfg, buf, buf_bytes, &cpu));

    printf("nsa C example: libnsa %s (ABI %u), CPU backend, %u threads\n", nsa_version_string(),
           nsa_abi_version(), cfg.cpu_threads);
    printf("config: HQ=%d HKV=%d DK=%d DV=%d f32, l=%u d=%u l'=%u n=%u w=%u, %d layers; arena %zu B, cpu buffer %zu B\n",
           HQ, HKV, DK, DV, cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.sel_count, cfg.window, LAYERS,
           arena_bytes, buf_bytes);

    q = (float *)alloc(sizeof(float) * 512 * HQ * DK);
    k = (float *)alloc(sizeof(float) * 512 * HKV * DK);
    v = (float *)alloc(sizeof(float) * 512 * HKV * DV);
    gates = (float *)alloc(sizeof(float) * 512 * HQ * 3);
    out = (float *)alloc(sizeof(float) * 512 * HQ * DV);
    selected = (int32_t *)alloc(sizeof(int32_t) * 512 * HKV * cfg.sel_count);

    for (s = 0; s < SEQS; s++) CHECK(nsa_cache_add(cache, (uint32_t)s));

    /* Step 0 prefills every prompt at once; then each step decodes one token per sequence. */
    for (step = 0; step <= DECODE_STEPS; step++) {
        nsa_step_seq_t entries[SEQS];
        uint32_t first_row[SEQS], tokens = 0, layer;
        for (s = 0; s < SEQS; s++) { /* rows of the step arrays follow the entries' order */
            entries[s].seq = (uint32_t)s;
            entries[s].tokens = step == 0 ? prompt[s] : 1;
            first_row[s] = tokens;
            tokens += entries[s].tokens;
        }
        CHECK(nsa_cache_plan_step(cache, entries, SEQS)); /* once per step */
        for (layer = 0; layer < LAYERS; layer++) {        /* then every layer */
            nsa_layer_io_t io;
            uint32_t r, i;
            for (i = 0; i < tokens * HQ * DK; i++) q[i] = 2.0f * rnd();
            for (i = 0; i < tokens * HKV * DK; i++) k[i] = rnd();
            for (i = 0; i < tokens * HKV * DV; i++) v[i] = rnd();
            for (i = 0; i < tokens * HQ * 3; i++) gates[i] = 0.5f + 0.5f * rnd();
            for (s = 0; s < SEQS; s++) /* the reference's copy of the new keys and values */
                for (r = 0; r < entries[s].tokens; r++) {
                    size_t row = first_row[s] + r;
                    memcpy(hist_k[layer][s][lens[s] + r], &k[row * HKV * DK], sizeof(float) * HKV * DK);
                    memcpy(hist_v[layer][s][lens[s] + r], &v[row * HKV * DV], sizeof(float) * HKV * DV);
                }
            memset(&io, 0, sizeof io);
            io.struct_size = sizeof io;
            io.dtype = NSA_DTYPE_F32;
            io.tokens = tokens;
            io.q = q;
            io.k = k;
            io.v = v;
            io.gates = gates;
            io.out = out;
            io.selected = selected;
            CHECK(nsa_cpu_run_layer(cpu, cache, layer, &io));

            for (s = 0; s < SEQS; s++) {
                for (r = 0; r < entries[s].tokens; r++) {
                    size_t row = first_row[s] + r;
                    int t = (int)(lens[s] + r), h, j, b;
                    for (h = 0; h < HQ; h++) {
                        float want[DV];
                        const float *got = &out[(row * HQ + h) * DV];
                        naive(&cfg, (int)layer, s, t, h, &q[(row * HQ + h) * DK], &gates[(row * HQ + h) * 3], want);
                        for (j = 0; j < DV; j++) {
                            double e = fabs((double)got[j] - want[j]);
                            if (!(e <= max_err)) max_err = e; /* NaN propagates as a failure */
                        }
                        checked++;
                    }
                    /* Every block 0..t/l' is selected, ascending, then -1 padding. */
                    for (h = 0; h < HKV; h++)
                        for (b = 0; b < (int)cfg.sel_count; b++) {
                            int32_t want_b = b <= t / (int)cfg.sel_block ? b : -1;
                            if (selected[(row * HKV + h) * cfg.sel_count + b] != want_b) bad_blocks++;
                        }
                }
            }
        }
        for (s = 0; s < SEQS; s++) lens[s] += entries[s].tokens;
        if (step == 0) printf("prefill: %d sequences, %u tokens in one step\n", SEQS, tokens);
        if (step == DECODE_STEPS / 2) { /* save sequence 1, end it, restore it: decoding goes on */
            size_t need = 0, used = 0;
            uint32_t ids[SEQS], n = 0;
            void *saved;
            CHECK(nsa_cache_state_size(cache, 1, &need));
            saved = alloc(need);
            CHECK(nsa_cpu_state_export(cpu, cache, 1, saved, need, &used));
            CHECK(nsa_cache_remove(cache, 1));
            CHECK(nsa_cache_sequences(cache, ids, SEQS, &n));
            if (n != 2 || ids[0] != 0 || ids[1] != 2) bad_blocks++;
            CHECK(nsa_cpu_state_import(cpu, cache, 1, saved, used));
            CHECK(nsa_cache_sequences(cache, ids, SEQS, &n));
            if (n != 3) bad_blocks++;
            printf("state: sequence 1 (%u tokens) saved in %zu bytes, removed, restored\n", lens[1], used);
            free(saved);
        }
    }
    printf("decode: %d steps x %d sequences; lengths %u, %u, %u\n", DECODE_STEPS, SEQS, lens[0], lens[1], lens[2]);

    /* A failing call changes nothing and explains itself. */
    {
        nsa_status st = nsa_cache_add(cache, 1);
        printf("expected error: %s: %s\n", nsa_status_string(st), nsa_last_error());
        if (st != NSA_STATUS_SEQUENCE_EXISTS) bad_blocks++;
    }

    stats.struct_size = sizeof stats;
    CHECK(nsa_cache_stats(cache, &stats));
    printf("pages: raw %u of %u in use, compressed %u of %u in use, %u live sequences\n",
           stats.raw_pages - stats.raw_free, stats.raw_pages, stats.cmp_pages - stats.cmp_free, stats.cmp_pages,
           stats.live_seqs);
    printf("checked %ld outputs (token x head x layer) against naive attention: max |err| = %.3g\n", checked, max_err);
    printf("selected blocks wrong: %d\n", bad_blocks);

    nsa_cpu_backend_destroy(cpu); /* joins the worker threads */
    nsa_cache_deinit(cache);
    free(q), free(k), free(v), free(gates), free(out), free(selected);
    free(buf), free(arena);

    if (!(max_err < 1e-4) || bad_blocks != 0) {
        printf("FAIL\n");
        return 1;
    }
    printf("OK\n");
    return 0;
}
