/* axial_attention_cpu.c - fused CPU kernels of position-sensitive axial attention (float32).

   What it computes: for every (sequence, head, query row) of an axial attention layer, the
   three similarity terms (q.k, q.r^q, k.r^k) from compact relative tables, a softmax in log2
   units (exp2, with log2(e) folded into the scales by the caller) and both retrievals
   (sv = sum a v, sve = sum a r^v), while a block of four rows sits in L1 cache; and the
   training backward of that, recomputing each row's attention from its saved log-sum-exp.

   Built by axial_deeplab/layers/cpu_kernel.py: compiled on first use with the system C
   compiler (-O3 -fno-math-errno -fno-trapping-math -shared -fPIC, with -march=native when the
   compiler takes it, and first with -fopenmp, linked against the OpenMP runtime torch has loaded:
   see the *_shares entry points at the end) into a cached shared library, called through ctypes.
   C with GCC / Clang
   vector extensions (8-float vectors); AVX and AVX-512 paths are chosen by the predefined
   macros of the target. -DAXIAL_PROFILE adds cycle counters per phase (x86).

   Layout of this file:
     - vector helpers (load/store, lane max, horizontal sums) and a 2^x polynomial;
     - AxialArgs: the forward's operands; its fields and order must match _Args in
       cpu_kernel.py field for field;
     - the forward, in offset ("skewed") coordinates u = p - o: per block of query rows the
       logits, softmax and retrievals, and the loads of a sequence-head into scratch;
     - AxialBackArgs (matches _BackArgs in cpu_kernel.py) and the backward passes;
     - the similarity-BN moments of a global span (Gram matrices of [q, k]) and their backward.
   Exported entry points (everything else is static):
     int64_t axial_attention_scratch_floats(const AxialArgs*)
     int     axial_attention_rows_f32(const AxialArgs*, int64_t r0, int64_t r1, float* scratch)
     int64_t axial_attention_backward_scratch_floats(const AxialBackArgs*)
     int     axial_attention_backward_f32(const AxialBackArgs*, int64_t nh0, int64_t nh1, float* scratch,
                                          float* g_rqe, float* g_rke, float* g_rvT, float* g_scale)
     int     axial_moments_f32(...), axial_moments_backward_f32(...)   (signatures at their definitions)
     int     axial_openmp(void), axial_*_shares(...): the same split into shares on OpenMP threads
   Each call handles a share of the rows (or sequence-heads) with its own scratch, so the
   caller runs shares on several threads; a nonzero return means the operands were refused
   and the caller falls back to its PyTorch implementation. */

/* Position-sensitive axial attention, eval forward, fused per block of query rows (float32).
   For query row o of sequence-head (n, h), in log2 units (scales folded by the caller):
     z_p = qqk_o . k_p + qqr_o . rq[p-o] + k_p . rk_h[p-o]   for p in the span of o
         = k_p . (qqk_o + rk_h[p-o]) + qqr_o . rq[p-o]
     a_p = 2^(z_p - max z) / sum
     sv  = sum_p a_p v_p,   sve = sum_p a_p rv[p-o]
   Tables are pre-gathered over offsets -(L-1)..(L-1) (clipped to the reach by the caller). */
#include <stdint.h>
#include <string.h>

typedef float v8sf __attribute__((vector_size(32)));
typedef int32_t v8si __attribute__((vector_size(32)));
typedef uint32_t v8su __attribute__((vector_size(32)));

static inline v8sf load8(const float* p) { v8sf r; memcpy(&r, p, 32); return r; }
static inline void store8(float* p, v8sf v) { memcpy(p, &v, 32); }
static inline void store_n(float* p, v8sf v, int64_t n) {
    if (n >= 8) { memcpy(p, &v, 32); return; }
    for (int64_t i = 0; i < n; i++) p[i] = v[i];
}
static inline v8sf splat8(float x) { return (v8sf){x, x, x, x, x, x, x, x}; }
static inline v8sf select8(v8si mask, v8sf a, v8sf b) {
    return (v8sf)(((v8si)a & mask) | ((v8si)b & ~mask));
}
#if defined(__AVX__)
static inline v8sf max8(v8sf a, v8sf b) { return __builtin_ia32_maxps256(a, b); }
#else
static inline v8sf max8(v8sf a, v8sf b) { return select8(a > b, a, b); }
#endif
static inline float hsum8(v8sf v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}
/* 2^x lane-wise for x <= 0, about 2 ulp; lanes far below -127 (masked-out keys at -1e30 among
   them) give exactly 0. */
#if defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
/* 2^floor(x) * P(x - floor(x)), P of degree 5 fitted to 2^f on [0, 1) (relative error 1.6e-7):
   the fraction and the scaling are one instruction each (vreduceps, vscalefps) */
static inline v8sf exp2_8z(v8sf x) {
    const v8sf f = (v8sf)_mm256_reduce_ps((__m256)x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    v8sf p = splat8(1.867130515165627e-3f);
    p = p * f + splat8(9.017028845846653e-3f);
    p = p * f + splat8(5.579991266131401e-2f);
    p = p * f + splat8(2.401644438505173e-1f);
    p = p * f + splat8(6.931512951850891e-1f);
    p = p * f + splat8(1.0f);
    return (v8sf)_mm256_scalef_ps((__m256)p, (__m256)x);
}
#else
/* 2^round(x) * P(x - round(x)), P of degree 5 fitted to 2^f on [-1/2, 1/2] (relative error
   1.9e-7) */
static inline v8sf exp2_8z(v8sf x) {
    const v8sf magic = splat8(12582912.0f);
    x = max8(x, splat8(-127.0f));
    const v8sf t = x + magic;
    const v8sf f = x - (t - magic);
    v8sf p = splat8(1.326472731307149e-3f);
    p = p * f + splat8(9.671512991189957e-3f);
    p = p * f + splat8(5.550733581185341e-2f);
    p = p * f + splat8(2.402224242687225e-1f);
    p = p * f + splat8(6.931470036506653e-1f);
    p = p * f + splat8(1.0f);
    /* bits(t) = bits(magic) + round(x): shifted into the exponent field (mod 2^32) with
       (127 - bits(magic)) << 23 added, they give the bits of 2^round(x) (0 at -127) */
    const v8su e = ((v8su)t << 23) + ((127u - 0x4B400000u) << 23);
    return p * (v8sf)e;
}
#endif

/* Forward, in skewed coordinates: a block of R query rows o_j shares the offset range
   u = p - o in [U0, U1), so the offset tables rq, rk, rv are loaded once per block and only
   the keys (and values) are read at a per-row shift. Scratch per sequence-head: keys as
   zero-padded rows (dk, Lk), values as zero-padded position-major rows (Lk, dvp), queries
   (dk, L). */
typedef struct {
    int64_t Lq, L, qstep, radius, dk, dv, heads;
    int64_t nseq, n_inner;   /* sequence n = nb * n_inner + ni                                        */
    const float* qkv;        /* element (n, h, ch, p) at qkv[nb*s_b + ni*s_n + h*s_h + ch*s_c + p*s_p];  */
    int64_t s_b, s_n, s_h, s_c, s_p; /* channels per head: q 0..dk-1, k dk..2dk-1, v 2dk..; with     */
                             /* s_c == 1, 8 floats readable past a head's q and k channels          */
    const float* scale;      /* (2, heads) log2-unit multipliers of q.k and q.r^q (0 for a term off)     */
    const float* rqe;        /* (dk, Jp) q.r^q table over offsets -(L-1)..L-1, zero-padded              */
    const float* rke;        /* (heads, dk, Jp) k.r^k table, pre-multiplied by the head's scale         */
    int64_t Jp;
    const float* rvt;        /* (2L-1, dvp) per head at rvt + h*rv_hs (rv_hs may be 0); zeros if off     */
    int64_t rv_hs;
    float *out, *out2;       /* element (n, h, i, c) at out[nb*o_bs + ni*o_ns + h*o_hs + i*o_rs + c];   */
    int64_t o_bs, o_ns, o_hs, o_rs; /* out2 NULL: out = sv + sve (+ beta); else sv -> out, sve -> out2 */
    const float* beta;       /* (heads, dvp) added to out, or NULL                                      */
    float* lse;              /* (nseq*heads, Lq) log2-sum-exp2 of each row, or NULL                     */
    const float* bias;       /* (heads, 2dk+dv) added to qkv as it is loaded (eval: the folded          */
                             /* projection's bias), or NULL                                             */
} AxialArgs;

#define MAXDK 256
#define MAXR 4
#ifdef AXIAL_PROFILE /* cycle counts per phase: loads, logits, softmax, retrievals */
#include <x86intrin.h>
uint64_t axial_profile[4];
uint64_t axial_bprofile[6]; /* backward: row inputs, pass 1, key pass 2, value pass 2, sequence-head in, out */
#define PROF_START(t) const uint64_t t = __rdtsc()
#define PROF_ADD(k, t) axial_profile[k] += __rdtsc() - t
#define PROF_ADD_B(k, t) axial_bprofile[k] += __rdtsc() - t
#else
#define PROF_ADD_B(k, t)
#define PROF_START(t)
#define PROF_ADD(k, t)
#endif
#define AI static inline __attribute__((always_inline))
#if defined(__GNUC__) && defined(__AVX__)
/* keeps a reused table vector in a register instead of re-reading it as a memory operand */
#define KEEP_IN_REGISTER(x) __asm__("" : "+v"(x))
#else
#define KEEP_IN_REGISTER(x) (void)0
#endif
#if defined(__AVX512VL__) /* 32 vector registers: 4x4 register blocks; else 4x2 */
#define WIDE 4
#else
#define WIDE 2
#endif

typedef struct {
    int64_t L, Lk, pad, Zs, dvp, rad, slot, head_group;
    const float *kt, *vt, *q, *rke, *rvt, *beta; /* q: the sequence's queries, (dk, L) */
    float *out, *out2;
    int64_t n, h;
} Seq;

static int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

#define HEAD_GROUP_FLOATS (96 * 1024)

static int64_t round16(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* Scratch layout (floats, sections 64-byte aligned when the scratch is): MAXR logit rows of
   Zs, then per loaded sequence a slot of keys (dk, Lk), values (Lk, dvp) and queries (dk, L). */
static void geometry(const AxialArgs* a, Seq* s) {
    s->L = a->L;
    s->pad = (MAXR - 1) * a->qstep;
    s->Lk = round16(a->L + 2 * s->pad + 8);
    s->Zs = round16(a->L + s->pad + 8);
    s->dvp = (a->dv + 7) & ~(int64_t)7;
    s->slot = a->dk * s->Lk + s->Lk * s->dvp + round16(a->dk * a->L);
    /* position-major: every head of a sequence loaded in one pass over its positions, when their
       slots fit in half of a typical L2 */
    s->head_group = (a->s_c == 1 && a->heads > 1 && a->heads * s->slot <= HEAD_GROUP_FLOATS) ? a->heads : 1;
    s->rad = a->radius < 0 ? a->L - 1 : imin(a->radius, a->L - 1);
}

int64_t axial_attention_scratch_floats(const AxialArgs* a) {
    Seq s;
    geometry(a, &s);
    return MAXR * s.Zs + s.head_group * s.slot;
}

/* Asks for the lines of sequence-head data at base (read later) while the current one is
   processed: a sequence-head's channels are strided, so the hardware prefetchers miss them. */
static void prefetch_sequence(const AxialArgs* a, const float* base) {
    const int64_t c2h = 2 * a->dk + a->dv;
    if (a->s_c == 1) {
        for (int64_t p = 0; p < a->L; p++)
            for (int64_t c = 0; c < c2h; c += 16) __builtin_prefetch(base + p * a->s_p + c);
    } else if (a->s_p == 1) {
        for (int64_t c = 0; c < c2h; c++)
            for (int64_t p = 0; p < a->L; p += 16) __builtin_prefetch(base + c * a->s_c + p);
    }
}

#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (v8si){__VA_ARGS__})
#endif

/* The maximum of v's lanes in every lane. */
static inline v8sf allmax8(v8sf v) {
    v = max8(v, SHUF(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
    v = max8(v, SHUF(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
    return max8(v, SHUF(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
}

/* In place: r[i][g] -> r[g][i]. */
static inline void transpose8(v8sf* r) {
    v8sf t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = SHUF(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = SHUF(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = SHUF(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 1] = SHUF(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[i + 2] = SHUF(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 3] = SHUF(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = SHUF(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        r[i + 4] = SHUF(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

/* x[i * xs + g] for i < n, g < ng (n, ng <= 8) -> dst[g][i]: whole 8x8 blocks by transposes
   in registers. Reads 8 floats at each x + i * xs (so the caller leaves 8 - ng readable after
   them). */
static inline void scatter8(const float* x, int64_t xs, int n, int ng, float* const* dst) {
    if (n == 8 && ng == 8) {
        v8sf r[8];
        for (int i = 0; i < 8; i++) r[i] = load8(x + i * xs);
        transpose8(r);
        for (int g = 0; g < 8; g++) store8(dst[g], r[g]);
    } else {
        for (int i = 0; i < n; i++) {
            const v8sf v = load8(x + i * xs);
            for (int g = 0; g < ng; g++) dst[g][i] = v[g];
        }
    }
}

/* Position-major layout (s_c == 1): positions [p, p + 8) of one sequence-head into its slot. */
static void load_positions(const AxialArgs* a, const Seq* s, const float* base, float* slot, int64_t p) {
    const int64_t L = a->L, dk = a->dk, dv = a->dv, Lk = s->Lk, pad = s->pad, dvp = s->dvp, sp = a->s_p;
    float* kt = slot;
    float* vt = kt + dk * Lk;
    float* qs = vt + Lk * dvp;
    const int n = L - p < 8 ? (int)(L - p) : 8;
    for (int64_t c = 0; c < 2 * dk; c += 8) {  /* q and k channels, 8 at a time */
        const int ng = 2 * dk - c < 8 ? (int)(2 * dk - c) : 8;
        float* dst[8];
        for (int g = 0; g < ng; g++)
            dst[g] = c + g < dk ? qs + (c + g) * L + p : kt + (c + g - dk) * Lk + pad + p;
        scatter8(base + p * sp + c, sp, n, ng, dst);
    }
    for (int i = 0; i < n; i++) {
        const float* src = base + (p + i) * sp + 2 * dk;
        float* row = vt + (pad + p + i) * dvp;
        int64_t c = 0;
        for (; c + 8 <= dv; c += 8) store8(row + c, load8(src + c));
        for (; c < dv; c++) row[c] = src[c];
    }
}

/* Every head of the sequence at base (position-major) into slots h = 0..heads-1: each block of
   eight positions is read once for all heads while it sits in L1. */
static void load_heads(const AxialArgs* a, const Seq* s, const float* base, float* slots) {
    for (int64_t p = 0; p < a->L; p += 8)
        for (int64_t h = 0; h < a->heads; h++) load_positions(a, s, base + h * a->s_h, slots + h * s->slot, p);
}

/* Copies sequence-head (n, h) into a slot: keys (dk, Lk), values (Lk, dvp), queries (dk, L);
   each loop reads the source along its unit stride. Only the positions [pad, pad + L) and the
   channels below dv are written: the padding stays as zeroed once per call. */
static void load_one(const AxialArgs* a, const Seq* s, const float* base, float* slot) {
    const int64_t L = a->L, dk = a->dk, dv = a->dv, Lk = s->Lk, pad = s->pad, dvp = s->dvp;
    const int64_t sc = a->s_c, sp = a->s_p;
    float* kt = slot;
    float* vt = kt + dk * Lk;
    float* qs = vt + Lk * dvp;
    if (sc == 1) {  /* position-major: one head's channels are contiguous at each position */
        for (int64_t p = 0; p < L; p += 8) load_positions(a, s, base, slot, p);
    } else if (sp == 1) {  /* channel-major along the sequence: rows of L positions */
        for (int64_t c = 0; c < dk; c++) {
            memcpy(qs + c * L, base + c * sc, sizeof(float) * L);
            memcpy(kt + c * Lk + pad, base + (dk + c) * sc, sizeof(float) * L);
        }
        const int64_t L8 = L & ~(int64_t)7;  /* whole blocks only: nothing is read past a row */
        for (int64_t c = 0; c < dv; c += 8) {
            const int n = dv - c < 8 ? (int)(dv - c) : 8;
            for (int64_t p = 0; p < L8; p += 8) {
                float* dst[8];
                for (int g = 0; g < 8; g++) dst[g] = vt + (pad + p + g) * dvp + c;
                scatter8(base + (2 * dk + c) * sc + p, sc, n, 8, dst);
            }
            for (int i = 0; i < n; i++)
                for (int64_t p = L8; p < L; p++) vt[(pad + p) * dvp + c + i] = base[(2 * dk + c + i) * sc + p];
        }
    } else {
        for (int64_t c = 0; c < dk; c++)
            for (int64_t p = 0; p < L; p++) {
                qs[c * L + p] = base[c * sc + p * sp];
                kt[c * Lk + pad + p] = base[(dk + c) * sc + p * sp];
            }
        for (int64_t c = 0; c < dv; c++)
            for (int64_t p = 0; p < L; p++) vt[(pad + p) * dvp + c] = base[(2 * dk + c) * sc + p * sp];
    }
}

/* Head h's projection bias (q, k, v channels) added to its loaded slot, valid positions only
   (the zero padding stays zero). Eval passes the folded bias here rather than in qkv: the matrix
   product then writes qkv without a first pass copying the bias into it. */
static void add_bias(const AxialArgs* a, const Seq* s, float* slot, int64_t h) {
    const int64_t L = a->L, dk = a->dk, dv = a->dv, Lk = s->Lk, pad = s->pad, dvp = s->dvp;
    const float* b = a->bias + h * (2 * dk + dv);
    float* kt = slot;
    float* vt = kt + dk * Lk;
    float* qs = vt + Lk * dvp;
    for (int64_t c = 0; c < dk; c++) {
        const float bq = b[c], bk = b[dk + c];
        float* qr = qs + c * L;
        float* kr = kt + c * Lk + pad;
        for (int64_t p = 0; p < L; p++) qr[p] += bq;
        for (int64_t p = 0; p < L; p++) kr[p] += bk;
    }
    const float* bv = b + 2 * dk;
    for (int64_t p = 0; p < L; p++) {
        float* row = vt + (pad + p) * dvp;
        for (int64_t c = 0; c < dv; c++) row[c] += bv[c];
    }
}

/* Points s at sequence-head (n, h), whose copy is in slot. */
static void use_sequence(const AxialArgs* a, Seq* s, int64_t n, int64_t h, const float* slot) {
    const int64_t nb = n / a->n_inner, ni = n % a->n_inner;
    s->n = n;
    s->h = h;
    s->kt = slot;
    s->vt = slot + a->dk * s->Lk;
    s->q = s->vt + s->Lk * s->dvp;
    s->rke = a->rke + h * a->dk * a->Jp;
    s->rvt = a->rvt + h * a->rv_hs;
    s->beta = a->beta ? a->beta + h * s->dvp : 0;
    s->out = a->out + nb * a->o_bs + ni * a->o_ns + h * a->o_hs;
    s->out2 = a->out2 ? a->out2 + nb * a->o_bs + ni * a->o_ns + h * a->o_hs : 0;
}

/* acc[j][v] = sum_c k_j[c][m0 + 8v + .] (qa[j][c] + ck rk[c][.]) + qb[j][c] rq[c][.]: the logits of
   R rows over 8*NK offsets (key row j read at its own shift kb[j], rows ks apart; qa, qb rows MAXDK
   apart), each table vector loaded once for all the rows. The forward's logits and the backward's
   recomputation share it. */
AI void logit_sums(const int R, const int NK, int64_t dk, int64_t Jp, int64_t ks, const float* rq,
                   const float* rk, v8sf ck, const float* const* kb, const float* qa, const float* qb,
                   int64_t m0, v8sf acc[][4]) {
    for (int j = 0; j < R; j++)
        for (int v = 0; v < NK; v++) acc[j][v] = splat8(0.0f);
    for (int64_t c = 0; c < dk; c++) {
        v8sf tq[4], tk[4];
        for (int v = 0; v < NK; v++) {
            tq[v] = load8(rq + c * Jp + m0 + 8 * v);
            tk[v] = ck * load8(rk + c * Jp + m0 + 8 * v);
            KEEP_IN_REGISTER(tq[v]);
            KEEP_IN_REGISTER(tk[v]);
        }
        for (int j = 0; j < R; j++) {
            const v8sf sa = splat8(qa[j * MAXDK + c]), sb = splat8(qb[j * MAXDK + c]);
            for (int v = 0; v < NK; v++) {
                acc[j][v] += load8(kb[j] + c * ks + m0 + 8 * v) * (sa + tk[v]);
                acc[j][v] += sb * tq[v];
            }
        }
    }
}

/* z[j][m] for m in [m0, m0 + 8*NK): similarity of row j with offset U0 + m, -1e30 outside the
   row's offsets [first_j, end_j) (so exactly 0 after exp2), and the lane-wise running maximum
   mv[j]. Only vectors that reach below max_j first_j or above min_j end_j are masked. */
AI void logits(const int R, const int NK, int64_t dk, int64_t Jp, int64_t Lk, const float* rq,
               const float* rk, const float* const* kb, float qa[][MAXDK], float qb[][MAXDK],
               float* z, int64_t Zs, int64_t m0, const int64_t* first, const int64_t* end,
               int64_t first_max, int64_t end_min, v8sf* mv) {
    v8sf acc[MAXR][4];
    logit_sums(R, NK, dk, Jp, Lk, rq, rk, splat8(1.0f), kb, qa[0], qb[0], m0, acc);
    const v8si lane = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int v = 0; v < NK; v++) {
        const int64_t at = m0 + 8 * v;
        if (at < first_max || at + 8 > end_min) {
            const v8si idx = lane + (int32_t)at;
            for (int j = 0; j < R; j++)
                acc[j][v] = select8((idx >= (int32_t)first[j]) & (idx < (int32_t)end[j]), acc[j][v], splat8(-1e30f));
        }
        for (int j = 0; j < R; j++) {
            store8(z + j * Zs + at, acc[j][v]);
            mv[j] = max8(mv[j], acc[j][v]);
        }
    }
}

/* Logits of the block over the window [0, W8), in chunks of 8*NK offsets. */
AI void all_logits(const int R, const int64_t dk, int64_t Jp, int64_t Lk, const float* rq, const float* rk,
                   const float* const* kb, float qa[][MAXDK], float qb[][MAXDK], float* z, int64_t Zs,
                   int64_t W8, const int64_t* first, const int64_t* end, int64_t first_max, int64_t end_min,
                   v8sf* mv) {
    int64_t m = 0;
    if (WIDE == 4)
        for (; m + 32 <= W8; m += 32)
            logits(R, WIDE, dk, Jp, Lk, rq, rk, kb, qa, qb, z, Zs, m, first, end, first_max, end_min, mv);
    for (; m + 16 <= W8; m += 16)
        logits(R, 2, dk, Jp, Lk, rq, rk, kb, qa, qb, z, Zs, m, first, end, first_max, end_min, mv);
    if (m < W8) logits(R, 1, dk, Jp, Lk, rq, rk, kb, qa, qb, z, Zs, m, first, end, first_max, end_min, mv);
}

/* Channels [c8, c8 + 8*NV) of sum_m z[j][m] (v[o_j + U0 + m] + rv[U0 + m]) (fused) or of the
   two sums apart, normalised by inv[j] and stored. */
AI void retrieve(const int R, const int NV, const int fused, const Seq* s, const float* const* vb,
                 const float* rb, const float* z, int64_t W, const float* inv, int64_t i0, int64_t o_rs,
                 int64_t dv, int64_t c8) {
    const int64_t dvp = s->dvp, Zs = s->Zs;
    v8sf acc[MAXR][4], acc2[MAXR][4];
    for (int j = 0; j < R; j++)
        for (int v = 0; v < NV; v++) acc[j][v] = acc2[j][v] = splat8(0.0f);
    for (int64_t m = 0; m < W; m++) {
        v8sf tr[4];
        for (int v = 0; v < NV; v++) {
            tr[v] = load8(rb + m * dvp + c8 + 8 * v);
            KEEP_IN_REGISTER(tr[v]);
        }
        for (int j = 0; j < R; j++) {
            const v8sf w = splat8(z[j * Zs + m]);
            for (int v = 0; v < NV; v++) {
                const v8sf vv = load8(vb[j] + m * dvp + c8 + 8 * v);
                if (fused) acc[j][v] += w * (vv + tr[v]);
                else { acc[j][v] += w * vv; acc2[j][v] += w * tr[v]; }
            }
        }
    }
    for (int j = 0; j < R; j++) {
        float* dst = s->out + (i0 + j) * o_rs + c8;
        for (int v = 0; v < NV; v++) {
            const int64_t width = dv - c8 - 8 * v;
            if (width <= 0) break;
            v8sf r = acc[j][v] * splat8(inv[j]);
            if (s->beta) r += load8(s->beta + c8 + 8 * v);
            store_n(dst + 8 * v, r, width);
            if (!fused) store_n(s->out2 + (i0 + j) * o_rs + c8 + 8 * v, acc2[j][v] * splat8(inv[j]), width);
        }
    }
}

/* One offset m of the fused retrieval for four rows whose value rows are r0..r3. */
AI void window_step(const int NV, v8sf (*acc)[4], const v8sf* r0, const v8sf* r1, const v8sf* r2,
                    const v8sf* r3, const float* rb, const float* z, int64_t Zs, int64_t m) {
    const v8sf w0 = splat8(z[m]), w1 = splat8(z[Zs + m]), w2 = splat8(z[2 * Zs + m]), w3 = splat8(z[3 * Zs + m]);
    for (int v = 0; v < NV; v++) {
        v8sf t = load8(rb + 8 * v);
        KEEP_IN_REGISTER(t);
        acc[0][v] += w0 * (r0[v] + t);
        acc[1][v] += w1 * (r1[v] + t);
        acc[2][v] += w2 * (r2[v] + t);
        acc[3][v] += w3 * (r3[v] + t);
    }
}

/* Fused retrieval of channels [c8, c8 + 8*NV) for four consecutive query rows at query step 1:
   row j at offset m reads value row m + j of vb0, so each offset loads one new value row and
   a window of four rows rotates through registers. */
AI void retrieve_window(const int NV, const Seq* s, const float* vb0, const float* rb, const float* z,
                        int64_t W, const float* inv, int64_t i0, int64_t o_rs, int64_t dv, int64_t c8) {
    const int64_t dvp = s->dvp, Zs = s->Zs;
    /* with one vector of channels the four rows' chains of dependent multiply-adds are too few
       to hide their latency: odd offsets go to a second set of accumulators */
    v8sf acc[MAXR][4], acc_odd[MAXR][4], A[2], B[2], C[2], D[2];
    v8sf (*const odd)[4] = NV == 1 ? acc_odd : acc;
    const float* vr = vb0 + c8;
    const float* tb = rb + c8;
    for (int j = 0; j < 4; j++)
        for (int v = 0; v < NV; v++) acc[j][v] = acc_odd[j][v] = splat8(0.0f);
    for (int v = 0; v < NV; v++) {
        A[v] = load8(vr + 8 * v);
        B[v] = load8(vr + dvp + 8 * v);
        C[v] = load8(vr + 2 * dvp + 8 * v);
    }
    int64_t m = 0;
    for (; m + 4 <= W; m += 4) {
        for (int v = 0; v < NV; v++) D[v] = load8(vr + (m + 3) * dvp + 8 * v);
        window_step(NV, acc, A, B, C, D, tb + m * dvp, z, Zs, m);
        for (int v = 0; v < NV; v++) A[v] = load8(vr + (m + 4) * dvp + 8 * v);
        window_step(NV, odd, B, C, D, A, tb + (m + 1) * dvp, z, Zs, m + 1);
        for (int v = 0; v < NV; v++) B[v] = load8(vr + (m + 5) * dvp + 8 * v);
        window_step(NV, acc, C, D, A, B, tb + (m + 2) * dvp, z, Zs, m + 2);
        for (int v = 0; v < NV; v++) C[v] = load8(vr + (m + 6) * dvp + 8 * v);
        window_step(NV, odd, D, A, B, C, tb + (m + 3) * dvp, z, Zs, m + 3);
    }
    if (NV == 1)
        for (int j = 0; j < 4; j++) acc[j][0] += acc_odd[j][0];
    for (; m < W; m++)
        for (int j = 0; j < 4; j++) {
            const v8sf w = splat8(z[j * Zs + m]);
            for (int v = 0; v < NV; v++)
                acc[j][v] += w * (load8(vr + (m + j) * dvp + 8 * v) + load8(tb + m * dvp + 8 * v));
        }
    for (int j = 0; j < 4; j++) {
        float* dst = s->out + (i0 + j) * o_rs + c8;
        for (int v = 0; v < NV; v++) {
            const int64_t width = dv - c8 - 8 * v;
            if (width <= 0) break;
            v8sf r = acc[j][v] * splat8(inv[j]);
            if (s->beta) r += load8(s->beta + c8 + 8 * v);
            store_n(dst + 8 * v, r, width);
        }
    }
}

AI void rows_block(const int R, const AxialArgs* a, const Seq* s, int64_t i0, float* z) {
    const int64_t L = a->L, dk = a->dk, Jp = a->Jp, Zs = s->Zs, dvp = s->dvp, rad = s->rad;
    int64_t o[MAXR], lo[MAXR], hi[MAXR];
    for (int j = 0; j < R; j++) {
        o[j] = (i0 + j) * a->qstep;
        lo[j] = imax(-o[j], -rad);
        hi[j] = imin(L - o[j], rad + 1);
    }
    const int64_t U0 = lo[R - 1], W = hi[0] - U0, W8 = (W + 7) & ~(int64_t)7;
    float qa[MAXR][MAXDK], qb[MAXR][MAXDK];
    {
        const float s0 = a->scale[s->h], s1 = a->scale[a->heads + s->h];
        for (int64_t c = 0; c < dk; c++)
            for (int j = 0; j < R; j++) {
                const float qv = s->q[c * a->L + o[j]];
                qa[j][c] = qv * s0;
                qb[j][c] = qv * s1;
            }
    }
    const float* kb[MAXR];
    const float* vb[MAXR];
    for (int j = 0; j < R; j++) {
        kb[j] = s->kt + s->pad + o[j] + U0;
        vb[j] = s->vt + (s->pad + o[j] + U0) * dvp;
    }
    const float* rq = a->rqe + (L - 1 + U0);
    const float* rk = s->rke + (L - 1 + U0);
    PROF_START(t1);
    /* row j's offsets are [first_j, end_j) of the window [0, W8) */
    int64_t first[MAXR], end[MAXR], first_max = 0, end_min = W8;
    v8sf mv[MAXR], sum[MAXR];
    for (int j = 0; j < R; j++) {
        first[j] = lo[j] - U0;
        end[j] = hi[j] - U0;
        first_max = imax(first_max, first[j]);
        end_min = imin(end_min, end[j]);
        mv[j] = splat8(-1e30f);
        sum[j] = splat8(0.0f);
    }
    /* the small depths of Axial-ResNets' first stages as constants: loops over channels unrolled */
    if (dk == 4) all_logits(R, 4, Jp, s->Lk, rq, rk, kb, qa, qb, z, Zs, W8, first, end, first_max, end_min, mv);
    else if (dk == 8) all_logits(R, 8, Jp, s->Lk, rq, rk, kb, qa, qb, z, Zs, W8, first, end, first_max, end_min, mv);
    else all_logits(R, dk, Jp, s->Lk, rq, rk, kb, qa, qb, z, Zs, W8, first, end, first_max, end_min, mv);
    PROF_ADD(1, t1);
    PROF_START(t2);
    float inv[MAXR];
    {
        for (int j = 0; j < R; j++) mv[j] = allmax8(mv[j]);
        for (int64_t p = 0; p < W8; p += 8)
            for (int j = 0; j < R; j++) {
                const v8sf e = exp2_8z(load8(z + j * Zs + p) - mv[j]);
                store8(z + j * Zs + p, e);
                sum[j] += e;
            }
        for (int j = 0; j < R; j++) {
            const float tot = hsum8(sum[j]);
            inv[j] = 1.0f / tot;
            if (a->lse) a->lse[(s->n * a->heads + s->h) * a->Lq + i0 + j] = mv[j][0] + __builtin_log2f(tot);
        }
    }
    PROF_ADD(2, t2);
    PROF_START(t3);
    const float* rb = s->rvt + (L - 1 + U0) * dvp;
    const int64_t dv = a->dv;
    if (R == 4 && a->qstep == 1 && !s->out2) {
        int64_t c8 = 0;
        for (; c8 + 16 <= dvp; c8 += 16) retrieve_window(2, s, vb[0], rb, z, W, inv, i0, a->o_rs, dv, c8);
        if (c8 < dvp) retrieve_window(1, s, vb[0], rb, z, W, inv, i0, a->o_rs, dv, c8);
    } else
    for (int64_t c8 = 0; c8 < dvp;) {
        const int64_t left = (dvp - c8) / 8;
        if (WIDE == 4 && left >= 4) {
            if (s->out2) retrieve(R, WIDE, 0, s, vb, rb, z, W, inv, i0, a->o_rs, dv, c8);
            else retrieve(R, WIDE, 1, s, vb, rb, z, W, inv, i0, a->o_rs, dv, c8);
            c8 += 32;
        } else if (left >= 2) {
            if (s->out2) retrieve(R, 2, 0, s, vb, rb, z, W, inv, i0, a->o_rs, dv, c8);
            else retrieve(R, 2, 1, s, vb, rb, z, W, inv, i0, a->o_rs, dv, c8);
            c8 += 16;
        } else {
            if (s->out2) retrieve(R, 1, 0, s, vb, rb, z, W, inv, i0, a->o_rs, dv, c8);
            else retrieve(R, 1, 1, s, vb, rb, z, W, inv, i0, a->o_rs, dv, c8);
            c8 += 8;
        }
    }
    PROF_ADD(3, t3);
}

static void rows_4(const AxialArgs* a, const Seq* s, int64_t i0, float* z) { rows_block(4, a, s, i0, z); }
static void rows_1(const AxialArgs* a, const Seq* s, int64_t i0, float* z) { rows_block(1, a, s, i0, z); }

/* Lines of a position-major sequence (every head) to fetch into L2 while the current one is
   computed, a few before each block of rows: the copy of a sequence then finds its lines in L2
   (measured at 1x128x65x129: a third of the copy's time left; all asked for at once right
   after the previous copy, nine tenths). */
typedef struct {
    const float* base;  /* the sequence's data, NULL when every line was asked for */
    int64_t p, h, c;    /* the next line: position p, head h, 16 channels from c */
    int64_t step;       /* lines per call */
} Ahead;

static void prefetch_ahead(const AxialArgs* a, Ahead* f) {
    const int64_t c2h = 2 * a->dk + a->dv;
    for (int64_t k = 0; k < f->step; k++) {
        __builtin_prefetch(f->base + f->p * a->s_p + f->h * a->s_h + f->c, 0, 2);
        if ((f->c += 16) < c2h) continue;
        f->c = 0;
        if (++f->h < a->heads) continue;
        f->h = 0;
        if (++f->p == a->L) {
            f->base = 0;
            return;
        }
    }
}

/* Rows [r0, r1) of the flattened (sequence, head, query) grid.
   scratch: axial_attention_scratch_floats(a) floats. */
static int rows_f32(const AxialArgs* a, int64_t r0, int64_t r1, float* scratch) {
    if (a->dk > MAXDK || a->Jp < 2 * a->L + 7) return 1;
    Seq s;
    geometry(a, &s);
    float* z = scratch;
    float* slots = z + MAXR * s.Zs;
    /* logit rows, and the slots' zero padding (keys and values before and after the sequence,
       value channels dv..dvp-1), which no copy writes: zeroed once for every sequence-head */
    memset(z, 0, sizeof(float) * axial_attention_scratch_floats(a));
    int64_t loaded = -1, current = -1; /* the sequence whose heads are in the slots; the row's (n, h) */
    /* every head at once (position-major): the next sequence's lines spread over the current
       one's blocks of rows */
    Ahead ahead = {0, 0, 0, 0, 0};
    if (s.head_group > 1)
        ahead.step = a->L * ((2 * a->dk + a->dv + 15) / 16) / ((a->Lq + 3) / 4) + 1;
    int64_t r = r0;
    while (r < r1) {
        const int64_t hn = r / a->Lq, i = r % a->Lq;
        if (hn != current) {
            const int64_t h = hn % a->heads, n = hn / a->heads;
            const int64_t nb = n / a->n_inner, ni = n % a->n_inner;
            const int64_t nb1 = (n + 1) / a->n_inner, ni1 = (n + 1) % a->n_inner; /* the next sequence */
            PROF_START(t0);
            if (s.head_group > 1) {
                if (n != loaded) {
                    load_heads(a, &s, a->qkv + nb * a->s_b + ni * a->s_n, slots);
                    if (a->bias)
                        for (int64_t hh = 0; hh < a->heads; hh++) add_bias(a, &s, slots + hh * s.slot, hh);
                    loaded = n;
                    if (n + 1 < a->nseq) {
                        const Ahead next = {a->qkv + nb1 * a->s_b + ni1 * a->s_n, 0, 0, 0, ahead.step};
                        ahead = next;
                    }
                }
                use_sequence(a, &s, n, h, slots + h * s.slot);
            } else {
                load_one(a, &s, a->qkv + nb * a->s_b + ni * a->s_n + h * a->s_h, slots);
                if (a->bias) add_bias(a, &s, slots, h);
                if (n + 1 < a->nseq)  /* the same head of the next sequence */
                    prefetch_sequence(a, a->qkv + nb1 * a->s_b + ni1 * a->s_n + h * a->s_h);
                use_sequence(a, &s, n, h, slots);
            }
            PROF_ADD(0, t0);
            current = hn;
        }
        if (ahead.base) prefetch_ahead(a, &ahead);
        if (i + 4 <= a->Lq && r + 4 <= r1) { rows_4(a, &s, i, z); r += 4; }
        else { rows_1(a, &s, i, z); r += 1; }
    }
    return 0;
}

/* ---------------------------------------------------------------- backward (training) */
typedef struct {
    int64_t L, radius, dk, dv, heads;
    const float* qkv;                 /* element (n, h, ch, p) at qkv[n*s_n + h*s_h + ch*s_c + p*s_p] */
    int64_t s_n, s_h, s_c, s_p;
    const float* scale;               /* (3, heads) natural-unit multipliers a_t */
    int64_t use_qk, use_qr, use_kr, use_rv;
    const float *rqe, *rke;           /* (dk, Jp) as in the forward; zeros for a term off */
    int64_t Jp;
    const float* rvT;                 /* (dv, Jp) value table over offsets, zero-padded; zeros if off */
    const float *lse, *delta;         /* (n*heads, L): forward log2-sum-exp2, sum_p P dP */
    const float *gsv, *gsve;          /* incoming gradients, element (n, h, c, o) at g[n*g_n + h*g_h + c*g_c + o*g_o] */
    int64_t g_n, g_h, g_c, g_o;
    float* gqkv;                      /* gradient of qkv, same strides as qkv (every slot written) */
    const float *osv, *osve;          /* with delta NULL: the forward's sv, sve (strides of g), delta from them */
    const float *yscale, *yshift;     /* or NULL: qkv holds the projection before its BatchNorm, whose output
                                         (what the forward attended to) is yscale * qkv + yshift per channel,
                                         channel (h, ch) at h*s_h + ch (position-major only); applied as the
                                         keys, values and queries are loaded, so that output need not be kept
                                         or formed again. gqkv is the gradient of that output. */
} AxialBackArgs;

#define BROWS 4 /* query rows whose passes share every load of keys, values, tables and accumulators */
#define BPAD 8  /* zeros before each row of the P and dY buffers (shifted reads start up to 3 early) */

/* Per-row inputs of a block of rows, scaled for the passes. */
typedef struct {
    float qa[BROWS][MAXDK], qb[BROWS][MAXDK];        /* log2-unit a_qk q, a_qr q (logits)            */
    const float *q[BROWS], *gs[BROWS], *gse[BROWS];  /* each row's raw queries and incoming gradients */
    float lse[BROWS], delta[BROWS];
    const float *qL, *gsL, *gseL, *dL; /* the sequence-head's queries (row o at qL + o*q_rs), incoming
                                          gradients of sv and sve (rows g_rs and ge_rs apart; rows of
                                          zeros without the value term) and delta (L) */
    int64_t q_rs, g_rs, ge_rs;
} BackRows;

static int64_t back_row_floats(int64_t L) { return round16(L + 48); }

int64_t axial_attention_backward_scratch_floats(const AxialBackArgs* a) {
    const int64_t Lp = a->L + 32;
    return 8 + (2 * a->dk + 2 * a->dv) * Lp + BPAD + 2 * BROWS * back_row_floats(a->L) + 16
           + a->heads * a->L * (a->dk + 2 * a->dv + 1);
}

/* Pass 1a over offsets [m0, m0 + 8*NK) of the block (offset u = U0 + m): logits of every row
   from the shared table loads and the row's keys at its own shift (as the forward), and
   P = 2^(z - lse) (0 outside row j's offsets [mlo_j, mhi_j)) into pr (rows Zs apart). */
AI void back_logits(const int R, const int NK, int64_t dk, int64_t Jp, int64_t Lp, const float* rq,
                    const float* rk, const float* const* kb, const BackRows* w, v8sf ckz, const int64_t* mlo,
                    const int64_t* mhi, float* pr, int64_t Zs, int64_t m0) {
    v8sf z[BROWS][4];
    logit_sums(R, NK, dk, Jp, Lp, rq, rk, ckz, kb, w->qa[0], w->qb[0], m0, z);
    const v8si lane = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int j = 0; j < R; j++)
        for (int v = 0; v < NK; v++) {
            const v8si idx = lane + (int32_t)(m0 + 8 * v);
            const v8si in = (idx >= (int32_t)mlo[j]) & (idx < (int32_t)mhi[j]);
            store8(pr + j * Zs + m0 + 8 * v, select8(in, exp2_8z(z[j][v] - splat8(w->lse[j])), splat8(0.0f)));
        }
}

/* Pass 1b over offsets [m0, m0 + 8*NK): dP from the rows' values at their shift and the shared
   value-table loads, and dY = P (dP - delta) into dy. */
AI void back_dy(const int R, const int NK, int64_t dv, int64_t Jp, int64_t Lp, const float* rv,
                const float* const* vb, const BackRows* w, const float* pr, float* dy, int64_t Zs, int64_t m0) {
    v8sf dp[BROWS][4];
    for (int j = 0; j < R; j++)
        for (int v = 0; v < NK; v++) dp[j][v] = splat8(0.0f);
    for (int64_t c = 0; c < dv; c++) {
        v8sf tr[4];
        for (int v = 0; v < NK; v++) {
            tr[v] = load8(rv + c * Jp + m0 + 8 * v);
            KEEP_IN_REGISTER(tr[v]);
        }
        for (int j = 0; j < R; j++) {
            const v8sf g1 = splat8(w->gs[j][c]), g2 = splat8(w->gse[j][c]);
            for (int v = 0; v < NK; v++) {
                dp[j][v] += g1 * load8(vb[j] + c * Lp + m0 + 8 * v);
                dp[j][v] += g2 * tr[v];
            }
        }
    }
    for (int j = 0; j < R; j++)
        for (int v = 0; v < NK; v++) {
            const int64_t at = j * Zs + m0 + 8 * v;
            store8(dy + at, load8(pr + at) * (dp[j][v] - splat8(w->delta[j])));
        }
}

/* Where a block of rows lies: keys [K0, K0 + K8) in key coordinates (row j's P and dY of key
   K0 + pb at sh0 - j + pb of its buffer row), offsets [U0, U0 + M8) at table column t0. */
typedef struct { int64_t L, Lp, Zs, Jp, o, U0, M8, K0, K8, sh0, t0; } BackGeom;

/* out[cc][j] = sum of the lanes of acc[cc][j]; eight of them at once by a transpose. */
AI void row_sums(const int R, const int CK, v8sf (*acc)[BROWS], float (*out)[BROWS]) {
    if (R == 4 && CK % 2 == 0 && BROWS == 4) {
        for (int c2 = 0; c2 < CK; c2 += 2) {
            v8sf t[8];
            for (int cc = 0; cc < 2; cc++)
                for (int j = 0; j < 4; j++) t[cc * 4 + j] = acc[c2 + cc][j];
            transpose8(t);
            store8(&out[c2][0], ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7])));
        }
    } else
        for (int cc = 0; cc < CK; cc++)
            for (int j = 0; j < R; j++) out[cc][j] = hsum8(acc[cc][j]);
}

/* Pass 2 for key channels [c, c + CK): key gradients in key coordinates (the dY of the R rows
   loaded once for the CK channels), the rows' query gradients, the query- and key-table
   gradients in offset coordinates (table vectors loaded once for the R rows), and the term-scale
   gradients: gq[0] += sum_p dY q.k_p, gq[1] += sum_p dY q.r^q, g2v += dY k_p.r^k (lanes). */
AI void back_keys(const int R, const int CK, const AxialBackArgs* a, const BackGeom* G, int64_t c,
                  const float* kT, const float* const* kb, float* gkT, const float* dyb, const BackRows* w,
                  float aqk, float aqr, float akr, float* gbase, float* g_rqe, float* g_rke, double* gq, v8sf* g2v) {
    const int64_t Lp = G->Lp, Zs = G->Zs, Jp = G->Jp, o = G->o;
    const v8sf ck = splat8(akr);
    v8sf acc[4][BROWS], cq[4][BROWS];
    for (int cc = 0; cc < CK; cc++)
        for (int j = 0; j < R; j++) {
            acc[cc][j] = splat8(0.0f);
            cq[cc][j] = splat8(aqk * w->q[j][c + cc]);
        }
    for (int64_t pb = 0; pb < G->K8; pb += 8) {
        const int64_t p = G->K0 + pb;
        v8sf d[BROWS];
        for (int j = 0; j < R; j++) d[j] = load8(dyb + j * Zs + G->sh0 - j + pb);
        for (int cc = 0; cc < CK; cc++) {
            const float* tk = a->rke + (c + cc) * Jp + (G->L - 1) + p - o;
            const v8sf kv = load8(kT + (c + cc) * Lp + p);
            float* gk = gkT + (c + cc) * Lp + p;
            v8sf g = load8(gk);
            for (int j = 0; j < R; j++) {
                acc[cc][j] += d[j] * kv;
                g += d[j] * (cq[cc][j] + ck * load8(tk - j));
            }
            store8(gk, g);
        }
    }
    float sk[4][BROWS], sr[4][BROWS];
    row_sums(R, CK, acc, sk);
    for (int cc = 0; cc < CK; cc++)
        for (int j = 0; j < R; j++) {
            acc[cc][j] = splat8(0.0f);
            cq[cc][j] = splat8(aqr * w->q[j][c + cc]);
        }
    v8sf g2 = *g2v;
    for (int64_t m = 0; m < G->M8; m += 8) {
        v8sf d[BROWS];
        for (int j = 0; j < R; j++) d[j] = load8(dyb + j * Zs + m);
        for (int cc = 0; cc < CK; cc++) {
            const int64_t col = (c + cc) * Jp + G->t0 + m;
            const v8sf tq = load8(a->rqe + col), tk = load8(a->rke + col);
            v8sf sr = splat8(0.0f), sk2 = splat8(0.0f);
            for (int j = 0; j < R; j++) {
                acc[cc][j] += d[j] * tq;
                sr += cq[cc][j] * d[j];
                sk2 += d[j] * load8(kb[j] + (c + cc) * Lp + m);
            }
            store8(g_rqe + col, load8(g_rqe + col) + sr);
            store8(g_rke + col, load8(g_rke + col) + ck * sk2);
            g2 += sk2 * tk;
        }
    }
    *g2v = g2;
    row_sums(R, CK, acc, sr);
    float g0 = 0.0f, g1 = 0.0f;
    for (int cc = 0; cc < CK; cc++)
        for (int j = 0; j < R; j++) {
            gbase[(c + cc) * a->s_c + (o + j) * a->s_p] = aqk * sk[cc][j] + aqr * sr[cc][j];
            g0 += w->q[j][c + cc] * sk[cc][j];
            g1 += w->q[j][c + cc] * sr[cc][j];
        }
    gq[0] += g0;
    gq[1] += g1;
}

/* Pass 2 for value channels [c, c + CV): value gradients in key coordinates and value-table
   gradients in offset coordinates, each P vector of the R rows loaded once for the CV channels. */
AI void back_values(const int R, const int CV, const AxialBackArgs* a, const BackGeom* G, int64_t c,
                    float* gvT, const float* pbb, const BackRows* w, float* g_rvT) {
    const int64_t Lp = G->Lp, Zs = G->Zs;
    v8sf s[4][BROWS];
    for (int cc = 0; cc < CV; cc++)
        for (int j = 0; j < R; j++) s[cc][j] = splat8(w->gs[j][c + cc]);
    for (int64_t pb = 0; pb < G->K8; pb += 8) {
        v8sf pv[BROWS];
        for (int j = 0; j < R; j++) pv[j] = load8(pbb + j * Zs + G->sh0 - j + pb);
        for (int cc = 0; cc < CV; cc++) {
            float* gv = gvT + (c + cc) * Lp + G->K0 + pb;
            v8sf g = load8(gv);
            for (int j = 0; j < R; j++) g += s[cc][j] * pv[j];
            store8(gv, g);
        }
    }
    if (!a->use_rv) return;
    for (int cc = 0; cc < CV; cc++)
        for (int j = 0; j < R; j++) s[cc][j] = splat8(w->gse[j][c + cc]);
    for (int64_t m = 0; m < G->M8; m += 8) {
        v8sf pv[BROWS];
        for (int j = 0; j < R; j++) pv[j] = load8(pbb + j * Zs + m);
        for (int cc = 0; cc < CV; cc++) {
            float* grv = g_rvT + (c + cc) * G->Jp + G->t0 + m;
            v8sf g = load8(grv);
            for (int j = 0; j < R; j++) g += s[cc][j] * pv[j];
            store8(grv, g);
        }
    }
}

/* Rows o..o+R-1 of sequence-head (n, h). In offset coordinates u = p - o_j the rows share one
   window [U0, U1) (the union of their offsets): pass 1 and the table gradients load each table
   vector once for the R rows and read keys, values, P and dY at a shift of one per row. In key
   coordinates the key and value gradients of the R rows coincide: each accumulator vector is
   read and written once per R rows, P and dY read at the row's shift. ga: (3) scale gradients. */
AI void back_rows(const int R, const int64_t DK, const int64_t DV, const AxialBackArgs* a, int64_t n, int64_t h,
                  int64_t o, const float* kT, const float* vT, float* gkT, float* gvT, float* dyb, float* pbb,
                  BackRows* w, float* g_rqe, float* g_rke, float* g_rvT, double* ga) {
    /* DK, DV: the depths as constants (0: read from a) */
    const int64_t L = a->L, Lp = L + 32, Zs = back_row_floats(L), Jp = a->Jp;
    const int64_t dk = DK ? DK : a->dk, dv = DV ? DV : a->dv;
    const int64_t H = a->heads, nh = n * H + h;
    const int64_t rad = a->radius < 0 ? L - 1 : imin(a->radius, L - 1);
    const float LOG2E = 1.4426950408889634f;
    const float aqk = a->use_qk ? a->scale[h] : 0.0f;
    const float aqr = a->use_qr ? a->scale[H + h] : 0.0f;
    const float akr = a->use_kr ? a->scale[2 * H + h] : 0.0f;
    float* gbase = a->gqkv + n * a->s_n + h * a->s_h;
    int64_t lo[BROWS], hi[BROWS];
    PROF_START(b0);
    for (int j = 0; j < R; j++) {
        const int64_t oj = o + j;
        lo[j] = imax(-oj, -rad);
        hi[j] = imin(L - oj, rad + 1);
        const float* qr = w->qL + oj * w->q_rs;
        for (int64_t c = 0; c < dk; c++) {
            const float qv = qr[c];
            w->qa[j][c] = LOG2E * aqk * qv;
            w->qb[j][c] = LOG2E * aqr * qv;
        }
        w->q[j] = qr;
        w->gs[j] = w->gsL + oj * w->g_rs;
        w->gse[j] = w->gseL + oj * w->ge_rs;
        w->delta[j] = w->dL[oj];
        w->lse[j] = a->lse[nh * L + oj];
    }
    const int64_t U0 = lo[R - 1], M = hi[0] - U0, M8 = (M + 7) & ~(int64_t)7;
    int64_t mlo[BROWS], mhi[BROWS];
    const float* kb[BROWS];
    const float* vb[BROWS];
    for (int j = 0; j < R; j++) {
        mlo[j] = lo[j] - U0;
        mhi[j] = hi[j] - U0;
        kb[j] = kT + o + j + U0;
        vb[j] = vT + o + j + U0;
    }
    const int64_t t0 = L - 1 + U0; /* table column of offset U0 */
    const float *rq = a->rqe + t0, *rk = a->rke + t0, *rv = a->rvT + t0;
    const v8sf ckz = splat8(LOG2E * akr);

    PROF_ADD_B(0, b0);
    PROF_START(b1);
    /* pass 1: P and dY of the R rows over the window, then zeros after it for the shifted reads */
    {
        int64_t m = 0;
        if (WIDE == 4)
            for (; m + 32 <= M8; m += 32) back_logits(R, WIDE, dk, Jp, Lp, rq, rk, kb, w, ckz, mlo, mhi, pbb, Zs, m);
        for (; m + 16 <= M8; m += 16) back_logits(R, 2, dk, Jp, Lp, rq, rk, kb, w, ckz, mlo, mhi, pbb, Zs, m);
        if (m < M8) back_logits(R, 1, dk, Jp, Lp, rq, rk, kb, w, ckz, mlo, mhi, pbb, Zs, m);
        m = 0;
        if (WIDE == 4)
            for (; m + 32 <= M8; m += 32) back_dy(R, WIDE, dv, Jp, Lp, rv, vb, w, pbb, dyb, Zs, m);
        for (; m + 16 <= M8; m += 16) back_dy(R, 2, dv, Jp, Lp, rv, vb, w, pbb, dyb, Zs, m);
        if (m < M8) back_dy(R, 1, dv, Jp, Lp, rv, vb, w, pbb, dyb, Zs, m);
        for (int j = 0; j < R; j++) {
            memset(dyb + j * Zs + M8, 0, sizeof(float) * 24);
            memset(pbb + j * Zs + M8, 0, sizeof(float) * 24);
        }
    }

    /* keys [K0, K0 + K8) cover every row's span; row j's P and dY at key p sit at m = p - o - j - U0 */
    const int64_t K0 = o + lo[0], K8 = ((o + R - 1 + hi[R - 1] - K0) + 7) & ~(int64_t)7;
    const int64_t sh0 = K0 - o - U0; /* m of key K0 in row 0; row j: sh0 - j */
    PROF_ADD_B(1, b1);
    PROF_START(b2);
    const BackGeom G = {L, Lp, Zs, Jp, o, U0, M8, K0, K8, sh0, t0};
    double gq[2] = {0.0, 0.0};
    v8sf g2v = splat8(0.0f);
    int64_t c = 0;
    if (WIDE == 4)
        for (; c + 2 <= dk; c += 2) back_keys(R, 2, a, &G, c, kT, kb, gkT, dyb, w, aqk, aqr, akr, gbase, g_rqe, g_rke, gq, &g2v);
    for (; c < dk; c++) back_keys(R, 1, a, &G, c, kT, kb, gkT, dyb, w, aqk, aqr, akr, gbase, g_rqe, g_rke, gq, &g2v);
    PROF_ADD_B(2, b2);
    PROF_START(b3);
    c = 0;
    for (; c + WIDE <= dv; c += WIDE) back_values(R, WIDE, a, &G, c, gvT, pbb, w, g_rvT);
    for (; c < dv; c++) back_values(R, 1, a, &G, c, gvT, pbb, w, g_rvT);
    PROF_ADD_B(3, b3);
    ga[0] += gq[0];
    ga[1] += gq[1];
    ga[2] += hsum8(g2v);
}

/* The rows' passes with the small depths of Axial-ResNets' first stages as constants (dk 4, dv 8
   and dk 8, dv 16: loops over channels unrolled), and for any depth. */
typedef void (*BackRowsFn)(const AxialBackArgs*, int64_t, int64_t, int64_t, const float*, const float*, float*,
                           float*, float*, float*, BackRows*, float*, float*, float*, double*);
#define BACK_ROWS_FN(name, R, DK, DV)                                                                            \
    static void name(const AxialBackArgs* a, int64_t n, int64_t h, int64_t o, const float* kT, const float* vT, \
                     float* gkT, float* gvT, float* dyb, float* pbb, BackRows* w, float* g_rqe, float* g_rke,  \
                     float* g_rvT, double* ga) {                                                                \
        back_rows(R, DK, DV, a, n, h, o, kT, vT, gkT, gvT, dyb, pbb, w, g_rqe, g_rke, g_rvT, ga);             \
    }
BACK_ROWS_FN(back_rows_4, 4, 0, 0)
BACK_ROWS_FN(back_rows_1, 1, 0, 0)
BACK_ROWS_FN(back_rows_4_d4v8, 4, 4, 8)
BACK_ROWS_FN(back_rows_1_d4v8, 1, 4, 8)
BACK_ROWS_FN(back_rows_4_d8v16, 4, 8, 16)
BACK_ROWS_FN(back_rows_1_d8v16, 1, 8, 16)
#undef BACK_ROWS_FN

/* Position-major sequence-head data (position p, channel ch at x[p * xs + ch], ch < nch) <->
   channel rows (rows[ch][p]): whole 8x8 blocks by transposes in registers, the rest one by one.
   to_rows: copy into the rows, else out of them. */
static void transpose_rows(float* x, int64_t xs, int64_t L, int64_t nch, float* const* rows, int to_rows) {
    const int64_t L8 = L & ~(int64_t)7, n8 = nch & ~(int64_t)7;
    for (int64_t p = 0; p < L8; p += 8)
        for (int64_t ch = 0; ch < n8; ch += 8) {
            if (to_rows) {
                float* dst[8];
                for (int g = 0; g < 8; g++) dst[g] = rows[ch + g] + p;
                scatter8(x + p * xs + ch, xs, 8, 8, dst);
            } else {
                v8sf r[8];
                for (int g = 0; g < 8; g++) r[g] = load8(rows[ch + g] + p);
                transpose8(r);
                for (int i = 0; i < 8; i++) store8(x + (p + i) * xs + ch, r[i]);
            }
        }
    for (int64_t p = 0; p < L; p++)
        for (int64_t ch = p < L8 ? n8 : 0; ch < nch; ch++) {
            if (to_rows) rows[ch][p] = x[p * xs + ch];
            else x[p * xs + ch] = rows[ch][p];
        }
}

/* rows[ch][p] = rows[ch][p] * scale[ch] + shift[ch] for p < L: a BatchNorm's output from its input
   (AxialBackArgs.yscale), the rows' zero padding left as it is. */
static void normalise_rows(float* const* rows, int64_t nch, int64_t L, const float* scale, const float* shift) {
    for (int64_t ch = 0; ch < nch; ch++) {
        float* r = rows[ch];
        const float sc = scale[ch], sh = shift[ch];
        for (int64_t p = 0; p < L; p++) r[p] = r[p] * sc + sh;
    }
}

/* Position-major layout (s_c == g_c == 1): delta of every head of sequence n into rows_in (per
   head at L * (dk + 2 * dv) of its head_floats), reading each position's rows of the gradients and
   the forward's outputs front to back, once for all heads (the rows' queries and incoming
   gradients are read where they are). */
static void sweep_sequence(const AxialBackArgs* a, int64_t n, float* rows_in) {
    const int64_t L = a->L, dk = a->dk, dv = a->dv, H = a->heads, head_floats = L * (dk + 2 * dv + 1);
    if (a->delta) {
        for (int64_t h = 0; h < H; h++)
            memcpy(rows_in + h * head_floats + L * (dk + 2 * dv), a->delta + (n * H + h) * L, sizeof(float) * L);
        return;
    }
    for (int64_t p = 0; p < L; p++)
        for (int64_t h = 0; h < H; h++) {
            float* dL = rows_in + h * head_floats + L * (dk + 2 * dv);
            const int64_t g = n * a->g_n + h * a->g_h + p * a->g_o;
            const float* gl = a->gsv + g;
            const float* el = a->use_rv ? a->gsve + g : 0;
            /* delta_o = sum_c g_sv sv + g_sve sve, 8 channels at a time */
            const float* sp = a->osv + g;
            const float* ep = a->use_rv ? a->osve + g : 0;
            v8sf acc = splat8(0.0f);
            int64_t c = 0;
            for (; c + 8 <= dv; c += 8) {
                acc += load8(gl + c) * load8(sp + c);
                if (ep) acc += load8(el + c) * load8(ep + c);
            }
            float t = hsum8(acc);
            for (; c < dv; c++) t += gl[c] * sp[c] + (ep ? el[c] * ep[c] : 0.0f);
            dL[p] = t;
        }
}

/* Lines of the next position-major sequence (every head: its qkv rows, incoming gradients, the
   forward's outputs, and the qkv-gradient rows it will write) to fetch into L2 while the current
   sequence is computed, a few before each block of rows: a sequence's rows are read once per head
   at a stride of a whole row, which the hardware prefetchers do not follow, so without this the
   backward waits on memory for every new sequence (the forward does the same, prefetch_ahead). */
typedef struct {
    const float* base[6]; /* row 0 of each region; a region's row p at base + p * stride */
    int64_t stride[6], width[6];
    int write[6];
    int nreg, r;          /* regions; the current one (nreg: every line asked for) */
    int64_t p, c, step;   /* the next line: row p, floats from c; lines per call */
} BackAhead;

static void back_ahead_start(const AxialBackArgs* a, int64_t n, int64_t blocks, BackAhead* f) {
    const int64_t H = a->heads, c2h = 2 * a->dk + a->dv;
    const int64_t gw = (H - 1) * a->g_h + a->dv;
    int k = 0;
#define REGION(b, st, w, wr) \
    do {                         \
        f->base[k] = (b);        \
        f->stride[k] = (st);     \
        f->width[k] = (w);       \
        f->write[k] = (wr);      \
        k++;                     \
    } while (0)
    REGION(a->qkv + n * a->s_n, a->s_p, (H - 1) * a->s_h + c2h, 0);
    REGION(a->gsv + n * a->g_n, a->g_o, gw, 0);
    if (a->use_rv) REGION(a->gsve + n * a->g_n, a->g_o, gw, 0);
    if (!a->delta) {
        REGION(a->osv + n * a->g_n, a->g_o, gw, 0);
        if (a->use_rv) REGION(a->osve + n * a->g_n, a->g_o, gw, 0);
    }
    REGION(a->gqkv + n * a->s_n, a->s_p, (H - 1) * a->s_h + c2h, 1);
#undef REGION
    int64_t lines = 0;
    for (int i = 0; i < k; i++) lines += a->L * ((f->width[i] + 15) / 16 + 1);
    f->nreg = k;
    f->r = 0;
    f->p = 0;
    f->c = 0;
    f->step = lines / (blocks > 0 ? blocks : 1) + 1;
}

static void back_ahead(const AxialBackArgs* a, BackAhead* f) {
    for (int64_t k = 0; k < f->step && f->r < f->nreg; k++) {
        const float* line = f->base[f->r] + f->p * f->stride[f->r] + f->c;
        if (f->write[f->r])
            __builtin_prefetch(line, 1, 2);
        else
            __builtin_prefetch(line, 0, 2);
        if ((f->c += 16) < f->width[f->r] + 15) continue;
        f->c = 0;
        if (++f->p < a->L) continue;
        f->p = 0;
        f->r++;
    }
}

/* Sequence-heads [nh0, nh1). scratch: axial_attention_backward_scratch_floats(a) floats.
   g_rqe, g_rke: (dk, Jp), g_rvT: (dv, Jp), g_scale: (3, heads), accumulated (+=).
   Query rows go BROWS at a time (the last L mod BROWS one by one), global and local spans alike. */
static int backward_f32(const AxialBackArgs* a, int64_t nh0, int64_t nh1, float* scratch, float* g_rqe,
                        float* g_rke, float* g_rvT, float* g_scale) {
    const int64_t L = a->L, Lp = L + 32, Jp = a->Jp, dk = a->dk, dv = a->dv, H = a->heads;
    if (dk > MAXDK || dv > 4 * MAXDK || Jp < 2 * L + 7 || !a->rqe || !a->rke || !a->rvT) return 1;
    /* every row of Lp floats holds its data from offset 8: 8 zeros before, 24 after L */
    float* kT = scratch + 8;           /* (dk, Lp) keys */
    float* vT = kT + dk * Lp;          /* (dv, Lp) values */
    float* gkT = vT + dv * Lp;         /* (dk, Lp) key gradient */
    float* gvT = gkT + dk * Lp;        /* (dv, Lp) value gradient */
    float* dyb = gvT + dv * Lp + BPAD; /* (BROWS, Zs) dY of the current rows over their window */
    float* pbb = dyb + BROWS * back_row_floats(L); /* (BROWS, Zs) P */
    /* per head (of the current sequence, or only the current head in the channel-major layout):
       queries (L, dk), incoming gradients of sv and sve (L, dv) (zeros without the value term),
       delta (L) */
    float* const rows_in = pbb + BROWS * back_row_floats(L) + 16;
    const int64_t head_floats = L * (dk + 2 * dv + 1);
    const int position_major = a->s_c == 1 && a->g_c == 1;
    int64_t swept = -1; /* the sequence whose heads' rows are in rows_in (position-major) */
    float *qL = rows_in, *gsL, *gseL, *dL;
    if (a->yscale && (!a->yshift || !position_major)) return 1;
    memset(scratch, 0, sizeof(float) * axial_attention_backward_scratch_floats(a));
    BackRows w;
    BackAhead ahead;
    ahead.nreg = ahead.r = 0;
    float* rows[5 * MAXDK];  /* channel rows of keys then values, and of their gradients */
    float* grows[5 * MAXDK];
    for (int64_t c = 0; c < dk + dv; c++) {
        rows[c] = c < dk ? kT + c * Lp : vT + (c - dk) * Lp;
        grows[c] = c < dk ? gkT + c * Lp : gvT + (c - dk) * Lp;
    }
    BackRowsFn rows4 = back_rows_4, rows1 = back_rows_1;
    if (dk == 4 && dv == 8) rows4 = back_rows_4_d4v8, rows1 = back_rows_1_d4v8;
    if (dk == 8 && dv == 16) rows4 = back_rows_4_d8v16, rows1 = back_rows_1_d8v16;
    for (int64_t nh = nh0; nh < nh1; nh++) {
        const int64_t n = nh / H, h = nh % H;
        PROF_START(b4);
        const float* base = a->qkv + n * a->s_n + h * a->s_h;
        float* gbase = a->gqkv + n * a->s_n + h * a->s_h;
        if (a->s_c == 1) {  /* position-major: each position's channels are contiguous */
            transpose_rows((float*)base + dk, a->s_p, L, dk + dv, rows, 1);
            if (a->yscale) normalise_rows(rows, dk + dv, L, a->yscale + h * a->s_h + dk, a->yshift + h * a->s_h + dk);
        } else {
            for (int64_t c = 0; c < dk; c++)
                for (int64_t p = 0; p < L; p++) kT[c * Lp + p] = base[(dk + c) * a->s_c + p * a->s_p];
            for (int64_t c = 0; c < dv; c++)
                for (int64_t p = 0; p < L; p++) vT[c * Lp + p] = base[(2 * dk + c) * a->s_c + p * a->s_p];
        }
        if (position_major && n != swept) {  /* every head's rows of sequence n in one sweep */
            sweep_sequence(a, n, rows_in);
            swept = n;
            /* the next sequence's lines, spread over this one's blocks of rows (if it is ours) */
            ahead.nreg = 0;
            ahead.r = 0;
            if ((n + 1) * H < nh1)
                back_ahead_start(a, n + 1, imin(H, nh1 - n * H) * ((L + BROWS - 1) / BROWS), &ahead);
        }
        qL = rows_in + (position_major ? h * head_floats : 0);
        gsL = qL + L * dk;
        gseL = gsL + L * dv;
        dL = gseL + L * dv;
        if (!position_major) {
            const int64_t g0 = n * a->g_n + h * a->g_h, gc = a->g_c, go = a->g_o;
            const float *gsv = a->gsv + g0, *gsve = a->use_rv ? a->gsve + g0 : 0;
            const float *osv = a->delta ? 0 : a->osv + g0, *osve = a->delta || !a->use_rv ? 0 : a->osve + g0;
            for (int64_t c = 0; c < dk; c++)
                for (int64_t p = 0; p < L; p++) qL[p * dk + c] = base[c * a->s_c + p * a->s_p];
            for (int64_t c = 0; c < dv; c++)
                for (int64_t p = 0; p < L; p++) {
                    gsL[p * dv + c] = gsv[c * gc + p * go];
                    if (gsve) gseL[p * dv + c] = gsve[c * gc + p * go];
                }
            if (osv) {  /* delta_o = sum_c g_sv sv + g_sve sve */
                for (int64_t p = 0; p < L; p++) dL[p] = 0.0f;
                for (int64_t c = 0; c < dv; c++)
                    for (int64_t p = 0; p < L; p++) {
                        const int64_t at = c * gc + p * go;
                        dL[p] += gsL[p * dv + c] * osv[at] + (osve ? gseL[p * dv + c] * osve[at] : 0.0f);
                    }
            } else
                memcpy(dL, a->delta + nh * L, sizeof(float) * L);
        }
        w.qL = qL;
        w.gsL = gsL;
        w.gseL = gseL;
        w.dL = dL;
        w.q_rs = dk;
        w.g_rs = w.ge_rs = dv;
        if (position_major) { /* queries and gradients read in place; gseL: zeros without the value term */
            w.qL = base;
            w.q_rs = a->s_p;
            if (a->yscale) { /* the queries normalised into the head's query rows of rows_in */
                const float *qs = a->yscale + h * a->s_h, *qt = a->yshift + h * a->s_h;
                for (int64_t p = 0; p < L; p++)
                    for (int64_t c = 0; c < dk; c++) qL[p * dk + c] = base[p * a->s_p + c] * qs[c] + qt[c];
                w.qL = qL;
                w.q_rs = dk;
            }
            w.gsL = a->gsv + n * a->g_n + h * a->g_h;
            w.g_rs = a->g_o;
            if (a->use_rv) {
                w.gseL = a->gsve + n * a->g_n + h * a->g_h;
                w.ge_rs = a->g_o;
            }
        }
        for (int64_t c = 0; c < dk; c++) memset(gkT + c * Lp, 0, sizeof(float) * L);
        for (int64_t c = 0; c < dv; c++) memset(gvT + c * Lp, 0, sizeof(float) * L);
        PROF_ADD_B(4, b4);
        double ga[3] = {0.0, 0.0, 0.0};
        int64_t o = 0;
        for (; o + BROWS <= L; o += BROWS) {
            back_ahead(a, &ahead);
            rows4(a, n, h, o, kT, vT, gkT, gvT, dyb, pbb, &w, g_rqe, g_rke, g_rvT, ga);
        }
        if (o < L) back_ahead(a, &ahead);
        for (; o < L; o++) rows1(a, n, h, o, kT, vT, gkT, gvT, dyb, pbb, &w, g_rqe, g_rke, g_rvT, ga);
        PROF_START(b5);
        if (a->s_c == 1) {
            transpose_rows(gbase + dk, a->s_p, L, dk + dv, grows, 0);
        } else {
            for (int64_t c = 0; c < dk; c++)
                for (int64_t p = 0; p < L; p++) gbase[(dk + c) * a->s_c + p * a->s_p] = gkT[c * Lp + p];
            for (int64_t c = 0; c < dv; c++)
                for (int64_t p = 0; p < L; p++) gbase[(2 * dk + c) * a->s_c + p * a->s_p] = gvT[c * Lp + p];
        }
        PROF_ADD_B(5, b5);
        g_scale[h] += a->use_qk ? (float)ga[0] : 0.0f;
        g_scale[H + h] += a->use_qr ? (float)ga[1] : 0.0f;
        g_scale[2 * H + h] += a->use_kr ? (float)ga[2] : 0.0f;
    }
    return 0;
}

/* The entry points run with denormals flushed to zero (MXCSR FTZ and DAZ on x86, restored after: the
   threads are torch's). A row's weights 2^(z - max) below 2^-126 are denormal, and every multiply-add
   on one takes a microcode assist: with large logits (log2-sum-exp2 of rows up to ~150) the backward
   ran 2.6x and the forward 1.5x slower. Flushed, such weights count as 0 (they are < 1.2e-38 of the
   row's largest, which is 1). */
#if defined(__SSE__)
#include <xmmintrin.h>
static unsigned flush_denormals(void) {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u); /* FTZ (bit 15) | DAZ (bit 6) */
    return csr;
}
static void restore_denormals(unsigned csr) { _mm_setcsr(csr); }
#else
static unsigned flush_denormals(void) { return 0; }
static void restore_denormals(unsigned csr) { (void)csr; }
#endif

int axial_attention_rows_f32(const AxialArgs* a, int64_t r0, int64_t r1, float* scratch) {
    const unsigned csr = flush_denormals();
    const int bad = rows_f32(a, r0, r1, scratch);
    restore_denormals(csr);
    return bad;
}

int axial_attention_backward_f32(const AxialBackArgs* a, int64_t nh0, int64_t nh1, float* scratch,
                                 float* g_rqe, float* g_rke, float* g_rvT, float* g_scale) {
    const unsigned csr = flush_denormals();
    const int bad = backward_f32(a, nh0, nh1, scratch, g_rqe, g_rke, g_rvT, g_scale);
    restore_denormals(csr);
    return bad;
}

/* Similarity-BN moments of a global span (RowMoments in layers/similarity_stats.py), straight
   from the position-major projection y: row (n, o) at y + (n*L + o)*ys, head h's queries at
   h*hs and keys at h*hs + dk of it; x_0 = q, x_1 = k (dk values each) per (n, o, h).
     by sequence (by_position 0): gram[n, h, t] = sum_o x_t x_t^T, xsum[n, h] = sum_o [q, k], n in [i0, i1)
     by position (by_position 1): gram[h, o, t] = sum_n x_t x_t^T, xsum[h, o] = sum_n [q, k], o in [i0, i1)
   (gram blocks (2, dk, dk): the statistics need no q-k cross terms.) float32 products are exact
   in float64, so the Grams are exact up to float64 rounding of the sums. The outputs are
   zeroed by the caller. Rows are taken four at a time, so each Gram entry is loaded and
   stored once per four rows; the loops are instantiated for the common dk (constant trip
   counts), with a generic one for the rest. */
typedef double v4df __attribute__((vector_size(32)));
typedef float v4sf __attribute__((vector_size(16)));
#define MOM_ROWS 4

static inline __attribute__((always_inline)) void moments_loop(const float* y, int64_t nseq, int64_t L,
                                                               int64_t heads, int64_t hs, int64_t ys,
                                                               int64_t by_position, int64_t i0, int64_t i1,
                                                               double* gram, double* xsum, const int64_t dk) {
    double xb[MOM_ROWS][512];
    const int64_t d2 = 2 * dk, inner = by_position ? nseq : L;
    const int64_t jstride = (by_position ? L : 1) * ys;
    for (int64_t i = i0; i < i1; i++) {
        const float* first = y + (by_position ? i : i * L) * ys;
        /* every head of a block of rows while its lines are in L1: by position, the rows are a whole
           sequence apart, and a loop over heads outside would read each of them once per head
           (by position 22-26% faster at dk = 4: 4.1 -> 3.2 ms at 448x112 rows) */
        for (int64_t j0 = 0; j0 < inner; j0 += MOM_ROWS) {
            const int64_t nb = inner - j0 < MOM_ROWS ? inner - j0 : MOM_ROWS;
            for (int64_t h = 0; h < heads; h++) {
                const int64_t blk = by_position ? h * L + i : i * heads + h;
                double* G = gram + blk * d2 * dk;
                double* S = xsum + blk * d2;
                for (int64_t b = 0; b < MOM_ROWS; b++) {
                    const float* xr = first + (j0 + b) * jstride + h * hs;
                    for (int64_t c = 0; c < d2; c++) xb[b][c] = b < nb ? (double)xr[c] : 0.0;
                }
                for (int64_t c = 0; c < d2; c++) S[c] += xb[0][c] + xb[1][c] + xb[2][c] + xb[3][c];
                for (int64_t t = 0; t < 2; t++) {
                    double* Gt = G + t * dk * dk;
                    const int64_t off = t * dk;
                    if (dk % 4 == 0) {
                        for (int64_t c = 0; c < dk; c++) {
                            double* Gc = Gt + c * dk;
                            for (int64_t e = 0; e < dk; e += 4) {
                                v4df g, x0, x1, x2, x3;
                                memcpy(&g, Gc + e, 32);
                                memcpy(&x0, xb[0] + off + e, 32);
                                memcpy(&x1, xb[1] + off + e, 32);
                                memcpy(&x2, xb[2] + off + e, 32);
                                memcpy(&x3, xb[3] + off + e, 32);
                                g += xb[0][off + c] * x0 + xb[1][off + c] * x1 + xb[2][off + c] * x2 +
                                     xb[3][off + c] * x3;
                                memcpy(Gc + e, &g, 32);
                            }
                        }
                    } else {
                        for (int64_t c = 0; c < dk; c++)
                            for (int64_t e = 0; e < dk; e++)
                                for (int64_t b = 0; b < MOM_ROWS; b++)
                                    Gt[c * dk + e] += xb[b][off + c] * xb[b][off + e];
                    }
                }
            }
        }
    }
}

int axial_moments_f32(const float* y, int64_t nseq, int64_t L, int64_t heads, int64_t hs, int64_t ys,
                      int64_t dk, int64_t by_position, int64_t i0, int64_t i1, double* gram, double* xsum) {
    if (dk > 256 || dk < 1 || hs < 2 * dk || ys < heads * hs) return 1;
    switch (dk) {
        case 4: moments_loop(y, nseq, L, heads, hs, ys, by_position, i0, i1, gram, xsum, 4); break;
        case 8: moments_loop(y, nseq, L, heads, hs, ys, by_position, i0, i1, gram, xsum, 8); break;
        case 16: moments_loop(y, nseq, L, heads, hs, ys, by_position, i0, i1, gram, xsum, 16); break;
        case 32: moments_loop(y, nseq, L, heads, hs, ys, by_position, i0, i1, gram, xsum, 32); break;
        default: moments_loop(y, nseq, L, heads, hs, ys, by_position, i0, i1, gram, xsum, dk);
    }
    return 0;
}

/* Backward of the moments above (float32): for rows r = n*L + o in [r0, r1), each head h and
   block t (queries 0, keys 1; c, e index the block's dk channels),
     g[t, c] = cs[n, h, t, c] + sum_e x_t[e] ws[n, h, t][e][c]
             + cp[h, o, t, c] + bp[h, t, c] sum_e x_t[e] tp[o, t][e][c]
   and 0 in the row's other channels (the values), g laid out as y (rows of ys = heads*hs).
   ws/cs (the Grams by sequence) or tp/bp/cp (by position: the position tables, shared by the
   heads, with a per-head column scale) may be NULL (that family is absent). yscale, yshift (ys floats,
   a row's channels) or NULL: y is the projection before its BatchNorm, x its output yscale * y + yshift
   (as AxialBackArgs.yscale). */
/* two accumulators per product (even and odd e) halve the chains of dependent adds */
#define MOM_BACK_BODY(VT, W, LD, SPLAT, ST)                                                        \
    for (int64_t c = 0; c < dk; c += W) {                                                          \
        VT acc = SPLAT(0.0f), acc1 = SPLAT(0.0f);                                                  \
        if (Ws) {                                                                                  \
            acc += LD(cs + bs * d2 + off + c);                                                     \
            int64_t e = 0;                                                                         \
            for (; e + 1 < dk; e += 2) {                                                           \
                acc += SPLAT(xt[e]) * LD(Ws + e * dk + c);                                         \
                acc1 += SPLAT(xt[e + 1]) * LD(Ws + (e + 1) * dk + c);                              \
            }                                                                                      \
            if (e < dk) acc += SPLAT(xt[e]) * LD(Ws + e * dk + c);                                 \
        }                                                                                          \
        if (Tp) {                                                                                  \
            VT tq = SPLAT(0.0f), tq1 = SPLAT(0.0f);                                                \
            int64_t e = 0;                                                                         \
            for (; e + 1 < dk; e += 2) {                                                           \
                tq += SPLAT(xt[e]) * LD(Tp + e * dk + c);                                          \
                tq1 += SPLAT(xt[e + 1]) * LD(Tp + (e + 1) * dk + c);                               \
            }                                                                                      \
            if (e < dk) tq += SPLAT(xt[e]) * LD(Tp + e * dk + c);                                  \
            acc += LD(cp + bp_ * d2 + off + c) + LD(bp + h * d2 + off + c) * (tq + tq1);           \
        }                                                                                          \
        ST(gt + c, acc + acc1);                                                                    \
    }

static inline v4sf load4(const float* p) { v4sf r; memcpy(&r, p, 16); return r; }
static inline void store4(float* p, v4sf v) { memcpy(p, &v, 16); }
static inline v4sf splat4(float x) { return (v4sf){x, x, x, x}; }
static inline float load1(const float* p) { return *p; }
static inline void store1(float* p, float v) { *p = v; }
static inline float splat1(float x) { return x; }

static inline __attribute__((always_inline)) void moments_back_loop(const float* y, int64_t L, int64_t heads,
                                                                    int64_t hs, int64_t ys, const float* ws,
                                                                    const float* cs, const float* tp,
                                                                    const float* bp, const float* cp,
                                                                    const float* yscale, const float* yshift,
                                                                    int64_t r0, int64_t r1, float* g,
                                                                    const int64_t dk) {
    const int64_t d2 = 2 * dk;
    float xn[256];
    int64_t n = r0 / L, o = r0 % L;
    for (int64_t r = r0; r < r1; r++, o++) {
        if (o == L) o = 0, n++;
        const float* row = y + r * ys;
        float* grow = g + r * ys;
        for (int64_t h = 0; h < heads; h++) {
            const int64_t bs = n * heads + h, bp_ = h * L + o;
            for (int64_t t = 0; t < 2; t++) {
                const int64_t off = t * dk;
                const float* xt = row + h * hs + off;
                float* gt = grow + h * hs + off;
                if (yscale) { /* the BatchNorm's output from its input */
                    const float *sc = yscale + h * hs + off, *sh = yshift + h * hs + off;
                    for (int64_t e = 0; e < dk; e++) xn[e] = xt[e] * sc[e] + sh[e];
                    xt = xn;
                }
                const float* Ws = ws ? ws + (bs * 2 + t) * dk * dk : NULL;
                const float* Tp = tp ? tp + (o * 2 + t) * dk * dk : NULL;
                if (dk % 8 == 0) {
                    MOM_BACK_BODY(v8sf, 8, load8, splat8, store8)
                } else if (dk % 4 == 0) {
                    MOM_BACK_BODY(v4sf, 4, load4, splat4, store4)
                } else {
                    MOM_BACK_BODY(float, 1, load1, splat1, store1)
                }
            }
            for (int64_t c = d2; c < hs; c++) grow[h * hs + c] = 0.0f;
        }
        for (int64_t c = heads * hs; c < ys; c++) grow[c] = 0.0f;
    }
}

int axial_moments_backward_f32(const float* y, int64_t L, int64_t heads, int64_t hs, int64_t ys, int64_t dk,
                               const float* ws, const float* cs, const float* tp, const float* bp, const float* cp,
                               const float* yscale, const float* yshift, int64_t r0, int64_t r1, float* g) {
    if (dk > 256 || dk < 1 || hs < 2 * dk || ys < heads * hs) return 1;
    if ((ws && !cs) || (tp && (!bp || !cp)) || (yscale && !yshift)) return 1;
#define MOM_BACK(D) moments_back_loop(y, L, heads, hs, ys, ws, cs, tp, bp, cp, yscale, yshift, r0, r1, g, D)
    switch (dk) {
        case 4: MOM_BACK(4); break;
        case 8: MOM_BACK(8); break;
        case 16: MOM_BACK(16); break;
        case 32: MOM_BACK(32); break;
        default: MOM_BACK(dk);
    }
#undef MOM_BACK
    return 0;
}

/* ---------------------------------------------------------------- shares on torch's threads
   The entry points above take one share of the work; the *_shares ones below split the work into
   `workers` shares themselves and, when built with -fopenmp (linked against the OpenMP runtime
   torch has loaded, so there is one pool of threads), run them on that runtime's team: the threads
   torch's own operators use, instead of a second pool fighting them for the cores while torch's
   workers spin-wait between operators. Share i covers [total*i/workers, total*(i+1)/workers) and
   uses its own scratch (scratch + i*scratch_stride) and accumulators; a nonzero return means some
   share refused its operands. Without OpenMP the shares run one after the other (the caller then
   uses its own threads and the single-share entry points instead). */
#ifdef _OPENMP
#include <omp.h>
#define SHARES_PRAGMA _Pragma("omp parallel for num_threads(workers) schedule(static, 1) reduction(|:bad) if(workers > 1)")
#else
#define SHARES_PRAGMA
#endif

int axial_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int axial_attention_rows_shares(const AxialArgs* a, int64_t total, int64_t workers, float* scratch,
                                int64_t scratch_stride) {
    int bad = 0;
    SHARES_PRAGMA
    for (int64_t i = 0; i < workers; i++)
        bad |= axial_attention_rows_f32(a, total * i / workers, total * (i + 1) / workers, scratch + i * scratch_stride);
    return bad;
}

/* grads: one block per share, grads_stride floats apart (summed by the caller), each holding
   g_rqe (dk, Jp), g_rke (dk, Jp), g_rvT (dv, Jp) and g_scale (3, heads) one after the other. The
   caller keeps the blocks whole cache lines apart: the table gradients are written for every block
   of rows, and two shares writing one line (false sharing) cost the backward a third of its time
   on two threads. */
int axial_attention_backward_shares(const AxialBackArgs* a, int64_t total, int64_t workers, float* scratch,
                                    int64_t scratch_stride, float* grads, int64_t grads_stride) {
    const int64_t tk = a->dk * a->Jp, tv = a->dv * a->Jp;
    int bad = 0;
    SHARES_PRAGMA
    for (int64_t i = 0; i < workers; i++) {
        float* g = grads + i * grads_stride;
        bad |= axial_attention_backward_f32(a, total * i / workers, total * (i + 1) / workers,
                                            scratch + i * scratch_stride, g, g + tk, g + 2 * tk, g + 2 * tk + tv);
    }
    return bad;
}

/* total: nseq (by sequence) or L (by position); shares write disjoint blocks of gram and xsum. */
int axial_moments_shares(const float* y, int64_t nseq, int64_t L, int64_t heads, int64_t hs, int64_t ys, int64_t dk,
                         int64_t by_position, int64_t total, int64_t workers, double* gram, double* xsum) {
    int bad = 0;
    SHARES_PRAGMA
    for (int64_t i = 0; i < workers; i++)
        bad |= axial_moments_f32(y, nseq, L, heads, hs, ys, dk, by_position, total * i / workers,
                                 total * (i + 1) / workers, gram, xsum);
    return bad;
}

/* total: nseq * L rows; shares write disjoint rows of g. */
int axial_moments_backward_shares(const float* y, int64_t L, int64_t heads, int64_t hs, int64_t ys, int64_t dk,
                                  const float* ws, const float* cs, const float* tp, const float* bp,
                                  const float* cp, const float* yscale, const float* yshift, int64_t total,
                                  int64_t workers, float* g) {
    int bad = 0;
    SHARES_PRAGMA
    for (int64_t i = 0; i < workers; i++)
        bad |= axial_moments_backward_f32(y, L, heads, hs, ys, dk, ws, cs, tp, bp, cp, yscale, yshift,
                                          total * i / workers, total * (i + 1) / workers, g);
    return bad;
}
