/*
 * NSA attention as a ggml custom operation, inside the ggml graph of a toy two-layer
 * decoder, with ggml's own threads driving the engine.
 *
 * Model (random weights, f32): per layer
 *     h = rms_norm(x)
 *     q = Wq h, k = Wk h, v = Wv h, gates = sigmoid(Wg h)      (ggml_mul_mat)
 *     a = NSA(q, k, v, gates) over the layer's paged KV cache  (ggml_custom_4d)
 *     x = x + Wo a
 * Two sequences: one step prefills both prompts (different lengths, one graph), then
 * decode steps give each sequence one token per step. Before each graph the host plans
 * the step (nsa_cache_plan_step); inside the graph the NSA node of layer l calls
 * nsa_cpu_run_layer_part(..., ith, nth) once per ggml thread: each thread appends and
 * attends whole (sequence, KV head) pairs, so the node needs no barrier of its own, and
 * the engine, made by nsa_cpu_backend_create_hosted, starts no thread.
 *
 * Checks, with the same inputs through the engine's C API without ggml:
 *  1. every NSA node's output equals, bit for bit, nsa_cpu_run_layer (the engine's own
 *     worker threads) on the node's own q, k, v and gates, on a second cache;
 *  2. the decoder's final hidden states equal a plain C forward pass of the same model
 *     (naive matrix products, the engine called directly, a third cache) within
 *     max|diff| <= 1e-4 * max(1, max|x|): the two differ only in the matrix products'
 *     float summation order.
 * Exits 0 and prints "ggml example: all checks passed" on success.
 */
#define _POSIX_C_SOURCE 200112L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-cpu.h"
#include "ggml.h"
#include "nsa.h"

#define D_MODEL 128
#define HQ 8
#define HKV 2
#define DK 32
#define DV 32
#define LAYERS 2
#define SEQS 2
#define THREADS 3
#define DECODE_STEPS 24
#define RMS_EPS 1e-5f
#define TOLERANCE 1e-4

static const uint32_t PROMPT[SEQS] = {300, 173};

#define CHECK(call)                                                                       \
    do {                                                                                  \
        nsa_status st_ = (call);                                                          \
        if (st_ != NSA_STATUS_OK) {                                                       \
            fprintf(stderr, "%s:%d: %s failed: %s (%s)\n", __FILE__, __LINE__, #call,     \
                    nsa_status_string(st_), nsa_last_error());                            \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

static void *xmalloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) / 64 * 64);
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

/* xorshift64*: deterministic inputs. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float uniform(void) { /* [-1, 1) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (float)((rng_state * 0x2545F4914F6CDD1Dull) >> 40) / (float)(1u << 23) - 1.0f;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* One engine: a cache and a CPU backend in memory this program owns. */
typedef struct {
    void *arena, *buf;
    nsa_cache *cache;
    nsa_cpu_backend *cpu;
} engine;

static engine engine_new(const nsa_config_t *cfg, int hosted) {
    engine e;
    size_t arena_bytes, buf_bytes;
    CHECK(nsa_cache_arena_size(cfg, &arena_bytes));
    CHECK(nsa_cpu_buffer_size(cfg, &buf_bytes));
    e.arena = xmalloc(arena_bytes);
    e.buf = xmalloc(buf_bytes);
    CHECK(nsa_cache_init(cfg, e.arena, arena_bytes, &e.cache));
    if (hosted)
        CHECK(nsa_cpu_backend_create_hosted(cfg, e.buf, buf_bytes, &e.cpu));
    else
        CHECK(nsa_cpu_backend_create(cfg, e.buf, buf_bytes, &e.cpu));
    for (uint32_t s = 0; s < SEQS; s++) CHECK(nsa_cache_add(e.cache, s));
    return e;
}

static void engine_free(engine *e) {
    nsa_cpu_backend_destroy(e->cpu);
    nsa_cache_deinit(e->cache);
    free(e->buf);
    free(e->arena);
}

static nsa_layer_io_t layer_io(uint32_t tokens, const float *q, const float *k, const float *v,
                               const float *gates, float *out) {
    nsa_layer_io_t io;
    memset(&io, 0, sizeof io);
    io.struct_size = sizeof io;
    io.dtype = NSA_DTYPE_F32;
    io.tokens = tokens;
    io.q = q;
    io.k = k;
    io.v = v;
    io.gates = gates;
    io.out = out;
    return io; /* phi = mean: no weights */
}

/* ---- the custom operation ---------------------------------------------------------- */

typedef struct {
    engine *e;
    uint32_t layer;
    volatile int failed;
    int nth; /* as ggml called it (written by thread 0) */
} nsa_op_ctx;

/* dst = NSA(src[0] = q [HQ*DK, T], src[1] = k [HKV*DK, T], src[2] = v [HKV*DV, T],
 * src[3] = gates [HQ*3, T]) -> [HQ*DV, T]. ggml's layout [ne0 fastest] is the engine's
 * row-major [tokens][heads][dim]. Called by every ggml thread with (ith, nth). */
static void nsa_op(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    nsa_op_ctx *c = userdata;
    if (ith == 0) c->nth = nth;
    const struct ggml_tensor *q = dst->src[0], *k = dst->src[1], *v = dst->src[2], *g = dst->src[3];
    nsa_layer_io_t io = layer_io((uint32_t)dst->ne[1], q->data, k->data, v->data, g->data, dst->data);
    nsa_status st = nsa_cpu_run_layer_part(c->e->cpu, c->e->cache, c->layer, &io, (uint32_t)ith, (uint32_t)nth);
    if (st != NSA_STATUS_OK) {
        fprintf(stderr, "nsa_cpu_run_layer_part (layer %u, thread %d/%d): %s\n", c->layer, ith, nth, nsa_last_error());
        c->failed = 1;
    }
}

/* ---- the model ------------------------------------------------------------------------ */

typedef struct {
    float *wq, *wk, *wv, *wg, *wo; /* row-major [out][in] */
} layer_weights;

static float *random_matrix(int rows, int cols) {
    float *w = xmalloc(sizeof(float) * rows * cols);
    float s = 1.0f / sqrtf((float)cols);
    for (int i = 0; i < rows * cols; i++) w[i] = s * uniform();
    return w;
}

/* A weight [rows][cols] as a ggml tensor ne = [cols, rows], so that
 * ggml_mul_mat(w, h [cols, T]) = [rows, T]. */
static struct ggml_tensor *weight(struct ggml_context *ctx, const float *w, int rows, int cols) {
    struct ggml_tensor *t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cols, rows);
    memcpy(t->data, w, sizeof(float) * rows * cols);
    return t;
}

typedef struct {
    struct ggml_tensor *q, *k, *v, *g, *attn;
} layer_nodes;

/* ---- the plain C forward pass --------------------------------------------------------- */

static void matmul(const float *w, const float *x, float *y, int rows, int cols, int tokens) {
    for (int t = 0; t < tokens; t++)
        for (int r = 0; r < rows; r++) {
            float s = 0;
            for (int c = 0; c < cols; c++) s += w[r * cols + c] * x[t * cols + c];
            y[t * rows + r] = s;
        }
}

static void rms_norm(const float *x, float *y, int tokens) {
    for (int t = 0; t < tokens; t++) {
        double ss = 0;
        for (int i = 0; i < D_MODEL; i++) ss += (double)x[t * D_MODEL + i] * x[t * D_MODEL + i];
        float scale = 1.0f / sqrtf((float)(ss / D_MODEL) + RMS_EPS);
        for (int i = 0; i < D_MODEL; i++) y[t * D_MODEL + i] = x[t * D_MODEL + i] * scale;
    }
}

/* x [tokens][D_MODEL] through both layers, the engine called directly. */
static void forward_plain(engine *e, const layer_weights *lw, float *x, uint32_t tokens) {
    float *h = xmalloc(sizeof(float) * tokens * D_MODEL), *q = xmalloc(sizeof(float) * tokens * HQ * DK),
          *k = xmalloc(sizeof(float) * tokens * HKV * DK), *v = xmalloc(sizeof(float) * tokens * HKV * DV),
          *g = xmalloc(sizeof(float) * tokens * HQ * 3), *a = xmalloc(sizeof(float) * tokens * HQ * DV),
          *o = xmalloc(sizeof(float) * tokens * D_MODEL);
    for (uint32_t l = 0; l < LAYERS; l++) {
        rms_norm(x, h, (int)tokens);
        matmul(lw[l].wq, h, q, HQ * DK, D_MODEL, (int)tokens);
        matmul(lw[l].wk, h, k, HKV * DK, D_MODEL, (int)tokens);
        matmul(lw[l].wv, h, v, HKV * DV, D_MODEL, (int)tokens);
        matmul(lw[l].wg, h, g, HQ * 3, D_MODEL, (int)tokens);
        for (uint32_t i = 0; i < tokens * HQ * 3; i++) g[i] = 1.0f / (1.0f + expf(-g[i]));
        nsa_layer_io_t io = layer_io(tokens, q, k, v, g, a);
        CHECK(nsa_cpu_run_layer(e->cpu, e->cache, l, &io));
        matmul(lw[l].wo, a, o, D_MODEL, HQ * DV, (int)tokens);
        for (uint32_t i = 0; i < tokens * D_MODEL; i++) x[i] += o[i];
    }
    free(h), free(q), free(k), free(v), free(g), free(a), free(o);
}

int main(void) {
    nsa_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.struct_size = sizeof cfg;
    CHECK(nsa_config_preset(NSA_PRESET_PAPER, &cfg)); /* l = 32, d = 16, l' = 64 */
    cfg.num_q_heads = HQ;
    cfg.num_kv_heads = HKV;
    cfg.head_dim_qk = DK;
    cfg.head_dim_v = DV;
    cfg.scale = 1.0f / sqrtf((float)DK);
    cfg.dtype = NSA_DTYPE_F32;
    cfg.window = 64; /* short enough that the compressed and selected branches matter */
    cfg.sel_count = 6;
    cfg.num_layers = LAYERS;
    cfg.max_seqs = SEQS;
    cfg.max_step_seqs = SEQS;
    cfg.max_seq_len = 512;
    cfg.max_step_tokens = 512;
    cfg.cpu_threads = THREADS; /* scratch slots: ggml's thread count */
    CHECK(nsa_config_fit_pages(&cfg));

    engine in_graph = engine_new(&cfg, 1); /* driven by ggml's threads */
    engine per_node = engine_new(&cfg, 0); /* check 1: the engine's own runner */
    engine plain = engine_new(&cfg, 0);    /* check 2: plain C forward pass */

    layer_weights lw[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        lw[l].wq = random_matrix(HQ * DK, D_MODEL);
        lw[l].wk = random_matrix(HKV * DK, D_MODEL);
        lw[l].wv = random_matrix(HKV * DV, D_MODEL);
        lw[l].wg = random_matrix(HQ * 3, D_MODEL);
        lw[l].wo = random_matrix(D_MODEL, HQ * DV);
    }

    uint32_t len[SEQS] = {0};
    double worst = 0, graph_s = 0;
    unsigned long nodes_checked = 0, tokens_total = 0;
    for (int step = 0; step <= DECODE_STEPS; step++) {
        nsa_step_seq_t entries[SEQS];
        uint32_t tokens = 0;
        for (uint32_t s = 0; s < SEQS; s++) {
            entries[s].seq = s;
            entries[s].tokens = step == 0 ? PROMPT[s] : 1;
            tokens += entries[s].tokens;
        }
        CHECK(nsa_cache_plan_step(in_graph.cache, entries, SEQS));
        CHECK(nsa_cache_plan_step(per_node.cache, entries, SEQS));
        CHECK(nsa_cache_plan_step(plain.cache, entries, SEQS));

        /* This step's input embeddings, rows in plan order. */
        float *x0 = xmalloc(sizeof(float) * tokens * D_MODEL);
        for (uint32_t i = 0; i < tokens * D_MODEL; i++) x0[i] = uniform();

        /* The graph: a fresh context per step (the token count changes). */
        struct ggml_init_params params = {64u << 20, NULL, false};
        struct ggml_context *ctx = ggml_init(params);
        if (!ctx) {
            fprintf(stderr, "ggml_init failed\n");
            return 1;
        }
        struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, D_MODEL, tokens);
        memcpy(x->data, x0, sizeof(float) * tokens * D_MODEL);
        layer_nodes nodes[LAYERS];
        nsa_op_ctx op[LAYERS];
        for (uint32_t l = 0; l < LAYERS; l++) {
            struct ggml_tensor *h = ggml_rms_norm(ctx, x, RMS_EPS);
            layer_nodes *n = &nodes[l];
            n->q = ggml_mul_mat(ctx, weight(ctx, lw[l].wq, HQ * DK, D_MODEL), h);
            n->k = ggml_mul_mat(ctx, weight(ctx, lw[l].wk, HKV * DK, D_MODEL), h);
            n->v = ggml_mul_mat(ctx, weight(ctx, lw[l].wv, HKV * DV, D_MODEL), h);
            n->g = ggml_sigmoid(ctx, ggml_mul_mat(ctx, weight(ctx, lw[l].wg, HQ * 3, D_MODEL), h));
            op[l].e = &in_graph;
            op[l].layer = l;
            op[l].failed = 0;
            op[l].nth = 0;
            struct ggml_tensor *args[4] = {n->q, n->k, n->v, n->g};
            n->attn = ggml_custom_4d(ctx, GGML_TYPE_F32, HQ * DV, tokens, 1, 1, args, 4, nsa_op, GGML_N_TASKS_MAX, &op[l]);
            x = ggml_add(ctx, x, ggml_mul_mat(ctx, weight(ctx, lw[l].wo, D_MODEL, HQ * DV), n->attn));
        }
        struct ggml_cgraph *gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, x);
        double t0 = now();
        if (ggml_graph_compute_with_ctx(ctx, gf, THREADS) != GGML_STATUS_SUCCESS) {
            fprintf(stderr, "ggml_graph_compute_with_ctx failed\n");
            return 1;
        }
        graph_s += now() - t0;
        for (int l = 0; l < LAYERS; l++) {
            if (op[l].failed) return 1;
            if (op[l].nth != THREADS) {
                fprintf(stderr, "step %d layer %d: ggml ran the NSA node on %d threads, not %d\n", step, l, op[l].nth, THREADS);
                return 1;
            }
        }

        /* Check 1: each NSA node against the engine's own runner on the node's inputs. */
        float *want = xmalloc(sizeof(float) * tokens * HQ * DV);
        for (uint32_t l = 0; l < LAYERS; l++) {
            layer_nodes *n = &nodes[l];
            nsa_layer_io_t io = layer_io(tokens, n->q->data, n->k->data, n->v->data, n->g->data, want);
            CHECK(nsa_cpu_run_layer(per_node.cpu, per_node.cache, l, &io));
            if (memcmp(want, n->attn->data, sizeof(float) * tokens * HQ * DV) != 0) {
                fprintf(stderr, "step %d layer %u: the NSA node differs from nsa_cpu_run_layer\n", step, l);
                return 1;
            }
            nodes_checked++;
        }
        free(want);

        /* Check 2: the decoder's output against the plain forward pass. */
        forward_plain(&plain, lw, x0, tokens);
        double diff = 0, mag = 1;
        const float *got = x->data;
        for (uint32_t i = 0; i < tokens * D_MODEL; i++) {
            diff = fmax(diff, fabs((double)got[i] - x0[i]));
            mag = fmax(mag, fabs((double)x0[i]));
        }
        worst = fmax(worst, diff / mag);
        if (!(diff <= TOLERANCE * mag)) {
            fprintf(stderr, "step %d: decoder output differs from the plain forward pass by %g (max |x| %g)\n", step, diff, mag);
            return 1;
        }
        for (uint32_t s = 0; s < SEQS; s++) len[s] += entries[s].tokens;
        tokens_total += tokens;
        ggml_free(ctx);
        free(x0);
    }
    for (uint32_t s = 0; s < SEQS; s++) {
        uint32_t l;
        CHECK(nsa_cache_len(in_graph.cache, s, &l));
        if (l != len[s]) {
            fprintf(stderr, "sequence %u: length %u, expected %u\n", s, l, len[s]);
            return 1;
        }
    }
    printf("ggml example: %d-layer decoder, %d sequences (prompts %u and %u tokens, then %d decode steps), "
           "%d ggml threads driving the engine\n",
           LAYERS, SEQS, PROMPT[0], PROMPT[1], DECODE_STEPS, THREADS);
    printf("  check 1: %lu NSA nodes equal nsa_cpu_run_layer bit for bit\n", nodes_checked);
    printf("  check 2: decoder output vs plain C forward pass: max |diff| / max(1, max |x|) = %.2e (tolerance %.0e)\n", worst,
           TOLERANCE);
    printf("  ggml graph compute: %.1f ms over %lu tokens\n", graph_s * 1e3, tokens_total);
    for (int l = 0; l < LAYERS; l++) free(lw[l].wq), free(lw[l].wk), free(lw[l].wv), free(lw[l].wg), free(lw[l].wo);
    engine_free(&in_graph);
    engine_free(&per_node);
    engine_free(&plain);
    printf("ggml example: all checks passed\n");
    return 0;
}
