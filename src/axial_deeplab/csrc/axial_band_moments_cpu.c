/* axial_band_moments_cpu.c - the similarity-BN moments of a local span and their backward (float32 in).

   What it computes: for every sequence-head (n, h) of a layer with a local span of radius r, the
   sum and the sum of squares of each similarity term over the in-span pairs |p - o| <= r:
     q.k    x = q_o . k_p,              over (o, p) both on the axis;
     q.r^q  x = q_o . rq[:, p - o + r],  over (o, j = p - o + r) with p on the axis;
     k.r^k  x = k_p . rk[:, p - o + r],  over (p, j) with o = p - j + r on the axis;
   and the gradient of sum_t a_t sums_t + b_t sumsq_t with respect to q, k and the tables: D = a + 2b x
   on every in-span pair, then dq_o = sum_p D k_p, dk_p = sum_o D q_o (q.k), dq_o = sum_j D rq_j,
   drq_j = sum_o D q_o (q.r^q), and the same for k.r^k.

   Accuracy: the forward works in float64 throughout (float32 products are exact in it): the sums in
   closed form (window sums of k and of the table columns), then the squares of the logits centred on
   each (n, h)'s exact mean c, so sumsq = sum (x - c)^2 + 2 c sum x - pairs c^2 keeps every digit of
   the variance however large the mean. The backward runs in float32, as the products it replaces did.
   Heads in groups of eight up to d = 32 (the section "eight heads at once" below) take q.k from
   windowed Gram matrices instead, as the PyTorch reference does, in float64 forward and backward.

   Built by axial_deeplab/layers/cpu_kernel.py into the same library as axial_attention_cpu.c (the
   two sources are compiled as one unit; every name here is static or starts with axial_band_).
   q, k: (N, heads, d, L) float32 at any strides (dims below); tables (d, 2r+1) contiguous.
   dims (int64): [N, heads, d, L, r, use_qk, use_qr, use_kr, q strides (n, h, c, o) x4, k strides x4,
   gradient strides x4]; use_*: 0 off, 1 by band, 2 (table terms) by the per-position Gram matrices
   T_o = sum of r_j r_j^T over the rows position o meets (sumsq = sum_o x_o^T T_o x_o, d*d per position
   instead of d*(2r+1): cheaper for shallow heads). Exported:
     int axial_band_moments_f32(dims, q, k, rq, rk, nh0, nh1, out)      out (2, 3, N*heads): sums, sumsq
     int axial_band_moments_backward_f32(dims, q, k, rq, rk, coef, nh0, nh1, gq, gk, gtab)
         coef (2, 3, heads): a and 2b; gq, gk written (not accumulated) at the gradient strides;
         gtab (2, d, 2r+1) float64, accumulated
     int axial_band_moments_shares / axial_band_moments_backward_shares: the same in `workers` shares
         (OpenMP threads when built with -fopenmp), the backward with one gtab block per share.
   A nonzero return means the operands were refused (the caller falls back to PyTorch). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef double band_v4d __attribute__((vector_size(32)));
typedef float band_v8f __attribute__((vector_size(32)));

#define BAND_MAXD 256
#define BAND_PAD 8 /* zeros after each row of a channel-major buffer: whole-vector reads past its end */

static inline band_v4d band_load4d(const double* p) { band_v4d v; memcpy(&v, p, 32); return v; }
static inline band_v8f band_load8f(const float* p) { band_v8f v; memcpy(&v, p, 32); return v; }
static inline void band_store8f(float* p, band_v8f v) { memcpy(p, &v, 32); }

/* lanes [0, n) of a vector set, the others zero (n in 0..8) */
static const float band_ones8[16] = {1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0};
static inline band_v4d band_mask4d(int64_t n) {
    band_v4d m;
    for (int i = 0; i < 4; i++) m[i] = i < n ? 1.0 : 0.0;
    return m;
}

/* sum over [lo, hi) of (x . cols[:, u] - c)^2, x (d,), cols (d, ld) channel-major, in float64 */
#define BAND_AI static inline __attribute__((always_inline))
BAND_AI double band_centred_squares_k(const double* x, const double* cols, int64_t ld, int64_t d, int64_t lo,
                                      int64_t hi, double c) {
    band_v4d acc = {0, 0, 0, 0};
    for (int64_t u = lo; u < hi; u += 4) {
        band_v4d z = {0, 0, 0, 0};
        for (int64_t ch = 0; ch < d; ch++) z += x[ch] * band_load4d(cols + ch * ld + u);
        z -= c;
        if (hi - u < 4) z *= band_mask4d(hi - u);
        acc += z * z;
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* D = a + b (x . cols[:, u]) over [lo, hi); gx += sum_u D cols[:, u]; gcols[:, u] += D x (float32).
   The vectors start at multiples of 8 (lanes outside the window masked): the next row's window, one
   further, then reloads exactly the vectors this one stored (an unaligned overlap would stall the
   store-to-load forwarding on every vector). */
static const float band_zeros_ones8[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
BAND_AI void band_back_row_k(const float* x, const float* cols, int64_t ld, int64_t d, int64_t lo, int64_t hi,
                             float a, float b, float* gx, float* gcols, band_v8f* big) {
    band_v8f small[16]; /* for a constant d <= 16 (the dispatch below), the accumulators live in registers */
    band_v8f* acc = d <= 16 ? small : big;
    for (int64_t ch = 0; ch < d; ch++) acc[ch] = (band_v8f){0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t u = lo & ~(int64_t)7; u < hi; u += 8) {
        band_v8f z = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t ch = 0; ch < d; ch++) z += x[ch] * band_load8f(cols + ch * ld + u);
        band_v8f dd = a + b * z;
        if (u < lo) dd *= band_load8f(band_zeros_ones8 + 8 - (lo - u));
        if (hi - u < 8) dd *= band_load8f(band_ones8 + 8 - (hi - u));
        for (int64_t ch = 0; ch < d; ch++) {
            acc[ch] += dd * band_load8f(cols + ch * ld + u);
            float* g = gcols + ch * ld + u;
            band_store8f(g, band_load8f(g) + dd * x[ch]);
        }
    }
    for (int64_t ch = 0; ch < d; ch++) {
        band_v8f v = acc[ch];
        gx[ch] += ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    }
}

/* the same, compiled apart for the common key depths (channel loops unrolled, accumulators in registers) */
static double band_centred_squares(const double* x, const double* cols, int64_t ld, int64_t d, int64_t lo,
                                   int64_t hi, double c) {
    switch (d) {
    case 4: return band_centred_squares_k(x, cols, ld, 4, lo, hi, c);
    case 8: return band_centred_squares_k(x, cols, ld, 8, lo, hi, c);
    case 16: return band_centred_squares_k(x, cols, ld, 16, lo, hi, c);
    default: return band_centred_squares_k(x, cols, ld, d, lo, hi, c);
    }
}

static void band_back_row(const float* x, const float* cols, int64_t ld, int64_t d, int64_t lo, int64_t hi, float a,
                          float b, float* gx, float* gcols, band_v8f* acc) {
    switch (d) {
    case 4: band_back_row_k(x, cols, ld, 4, lo, hi, a, b, gx, gcols, acc); break;
    case 8: band_back_row_k(x, cols, ld, 8, lo, hi, a, b, gx, gcols, acc); break;
    case 16: band_back_row_k(x, cols, ld, 16, lo, hi, a, b, gx, gcols, acc); break;
    default: band_back_row_k(x, cols, ld, d, lo, hi, a, b, gx, gcols, acc);
    }
}

/* a position of a table term in Gram form: gx += a R + b T x; A += a x; P += b x x^T (float64) */
BAND_AI void band_gram_back_k(const float* x, const double* R, const double* T, double* A, double* P, float* gx,
                              int64_t d, double a, double b) {
    for (int64_t c = 0; c < d; c++) {
        double tx = 0;
        const double bx = b * x[c];
        for (int64_t e = 0; e < d; e++) {
            tx += T[c * d + e] * x[e];
            P[c * d + e] += bx * x[e];
        }
        gx[c] += (float)(a * R[c] + b * tx);
        A[c] += a * x[c];
    }
}

static void band_gram_back(const float* x, const double* R, const double* T, double* A, double* P, float* gx,
                           int64_t d, double a, double b) {
    switch (d) {
    case 2: band_gram_back_k(x, R, T, A, P, gx, 2, a, b); break;
    case 4: band_gram_back_k(x, R, T, A, P, gx, 4, a, b); break;
    case 8: band_gram_back_k(x, R, T, A, P, gx, 8, a, b); break;
    default: band_gram_back_k(x, R, T, A, P, gx, d, a, b);
    }
}

/* Asks for the lines of a sequence-head's (d, L) operand at strides (sc, sp) ahead of its use: at
   position-major strides its L positions are L lines apart (a page holds a few), which the hardware
   prefetchers do not follow, and waiting for them cost as much as the band itself. */
static void band_prefetch(const float* base, int64_t sc, int64_t sp, int64_t d, int64_t L, int for_write) {
    for (int64_t o = 0; o < L; o++) {
        if (for_write) {
            __builtin_prefetch(base + o * sp, 1);
            __builtin_prefetch(base + (d - 1) * sc + o * sp, 1);
        } else {
            __builtin_prefetch(base + o * sp, 0);
            __builtin_prefetch(base + (d - 1) * sc + o * sp, 0);
        }
    }
}

/* the windows: keys of query o, table rows of query o, table rows of key p */
static inline int64_t band_max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t band_min(int64_t a, int64_t b) { return a < b ? a : b; }

/* table rows [j0, j1) that query o (key = 0) or key o (key = 1) meets */
static inline void band_rows(int64_t o, int64_t L, int64_t r, int key, int64_t* j0, int64_t* j1) {
    *j0 = key ? band_max(0, o + r - (L - 1)) : band_max(0, r - o);
    *j1 = key ? band_min(2 * r + 1, o + r + 1) : band_min(2 * r + 1, L - o + r);
}

/* per position o: R_o = sum of the rows it meets (L, d) and T_o = sum of their r r^T (L, d, d), float64,
   as differences of prefix sums over the rows (m d^2 + L d^2 operations, in vectors over e, where
   the direct sums took L m d^2 in chains of dependent adds: 15% of a d = 32 layer's moments). Returns
   nonzero when out of memory. */
static int band_position_tables(const float* tab, int64_t d, int64_t L, int64_t r, int key, double* R, double* T) {
    const int64_t m = 2 * r + 1;
    double* pre = (double*)calloc((size_t)((m + 1) * (d + d * d)), sizeof(double)); /* (m+1, d), (m+1, d, d) */
    if (!pre) return 1;
    double *ps = pre, *pt = pre + (m + 1) * d;
    for (int64_t j = 0; j < m; j++)
        for (int64_t c = 0; c < d; c++) {
            const double rc = tab[c * m + j];
            ps[(j + 1) * d + c] = ps[j * d + c] + rc;
            const double* below = pt + (j * d + c) * d;
            double* row = pt + ((j + 1) * d + c) * d;
            for (int64_t e = 0; e < d; e++) row[e] = below[e] + rc * tab[e * m + j];
        }
    for (int64_t o = 0; o < L; o++) {
        int64_t j0, j1;
        band_rows(o, L, r, key, &j0, &j1);
        for (int64_t c = 0; c < d; c++) R[o * d + c] = ps[j1 * d + c] - ps[j0 * d + c];
        for (int64_t ce = 0; ce < d * d; ce++) T[o * d * d + ce] = pt[j1 * d * d + ce] - pt[j0 * d * d + ce];
    }
    free(pre);
    return 0;
}

/* x^T T x in float64, x float64 (d,) */
static double band_quadratic(const double* x, const double* T, int64_t d) {
    double acc = 0;
    for (int64_t c = 0; c < d; c++) {
        double tx = 0;
        for (int64_t e = 0; e < d; e++) tx += T[c * d + e] * x[e];
        acc += x[c] * tx;
    }
    return acc;
}

/* use[t]: 0 off, 1 by band, 2 (the table terms) by the position Grams T_o: sumsq = sum_o x_o^T T_o x_o,
   cheaper than the band when d*d is small against the span */
typedef struct {
    int64_t n, heads, d, L, r, use[3], qs[4], ks[4], gs[4];
} BandDims;

static int band_dims(const int64_t* v, BandDims* s) {
    s->n = v[0], s->heads = v[1], s->d = v[2], s->L = v[3], s->r = v[4];
    for (int i = 0; i < 3; i++) s->use[i] = v[5 + i];
    for (int i = 0; i < 4; i++) s->qs[i] = v[8 + i], s->ks[i] = v[12 + i], s->gs[i] = v[16 + i];
    return s->d < 1 || s->d > BAND_MAXD || s->L < 1 || s->r < 0;
}

/* ---------------------------------------------------------------- eight heads at once
   Heads of depth d <= 32 (BAND8_MAXD) in groups of eight, with the table terms in Gram form: per head, the walk above is mostly fixed
   work per position on scalars (loads at the head's stride, window sums, d x d products) and the
   q.k band of 2r+1 logits. Here eight heads of a sequence go together, one head per lane of float64
   vectors, and q.k comes from the windowed Gram matrix W_o of the keys (as the PyTorch reference
   forms it), slid along the axis: each k_p k_p^T added once and taken away once, then q_o^T W_o q_o;
   the backward slides the queries' window Gram V too (the span is symmetric: the queries that meet
   key p are p's window) for dq_o = a sum_p k_p + b W_o q_o and dk_p = a sum_o q_o + b V_p k_p.
   About 3d^2 vector operations per position for eight heads, against 8(2r+1)(d+3) for the band
   (at d = 32 and span 65, 3072 against 18200; the tables' terms d^2 each, against 8(2r+1)d).
   The Gram form squares uncentred sums, as the reference's: the variance keeps about
   16 - log10(mean^2 / variance) digits of float64. */
typedef double band_v8d __attribute__((vector_size(64)));
#define BAND8_MAXD 32

static inline band_v8d band_splat8d(double x) { return (band_v8d){x, x, x, x, x, x, x, x}; }
static inline band_v8d band_gather8d(const float* p, int64_t stride) {
    band_v8d v;
    for (int h = 0; h < 8; h++) v[h] = p[h * stride];
    return v;
}
static inline double band_hsum8d(band_v8d v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* whether a sequence-head group goes eight heads at once: d <= BAND8_MAXD and no term by band but
   q.k (the caller asks for the tables' Gram form then: cpu_kernel.band_tables_by_band) */
static int band_eight_heads(const BandDims* s) {
    return s->heads % 8 == 0 && s->d <= BAND8_MAXD && s->use[1] != 1 && s->use[2] != 1;
}

/* q, k of heads h0..h0+7 of sequence n as (L, d) vectors over the heads; floats: 2 L d vectors */
static void band8_load(const BandDims* s, const float* q, const float* k, int64_t n, int64_t h0, band_v8d* Q,
                       band_v8d* K) {
    const int64_t d = s->d, L = s->L;
    const float* qb = q + n * s->qs[0] + h0 * s->qs[1];
    const float* kb = k + n * s->ks[0] + h0 * s->ks[1];
    for (int64_t o = 0; o < L; o++)
        for (int64_t c = 0; c < d; c++) {
            Q[o * d + c] = band_gather8d(qb + c * s->qs[2] + o * s->qs[3], s->qs[1]);
            K[o * d + c] = band_gather8d(kb + c * s->ks[2] + o * s->ks[3], s->ks[1]);
        }
}

/* W += sign x x^T, sum += sign x (lanes: heads) */
BAND_AI void band8_slide_k(band_v8d* W, band_v8d* sum, const band_v8d* x, int64_t d, double sign) {
    for (int64_t c = 0; c < d; c++) {
        const band_v8d sx = sign * x[c];
        sum[c] += sx;
        for (int64_t e = 0; e < d; e++) W[c * d + e] += sx * x[e];
    }
}

/* W x (W symmetric d x d of vectors) */
BAND_AI void band8_times_k(const band_v8d* W, const band_v8d* x, int64_t d, band_v8d* wx) {
    for (int64_t c = 0; c < d; c++) {
        band_v8d acc = W[c * d] * x[0];
        for (int64_t e = 1; e < d; e++) acc += W[c * d + e] * x[e];
        wx[c] = acc;
    }
}

/* row c of T x for a table term's T_o (shared by the heads; T symmetric) */
BAND_AI band_v8d band8_table_row_k(const double* T, const band_v8d* x, int64_t d, int64_t c) {
    band_v8d tx = T[c * d] * x[0];
    for (int64_t e = 1; e < d; e++) tx += T[c * d + e] * x[e];
    return tx;
}

/* x^T T x and x . R for a table term in Gram form (T, R shared by the heads) */
BAND_AI void band8_table_k(const band_v8d* x, const double* T, const double* R, int64_t d, band_v8d* sum,
                           band_v8d* sq) {
    for (int64_t c = 0; c < d; c++) {
        *sq += x[c] * band8_table_row_k(T, x, d, c);
        *sum += R[c] * x[c];
    }
}

/* Sums and sums of squares of heads h0..h0+7 of sequence n into out (as axial_band_moments_f32);
   pt: the tables' R_o and T_o (Gram form); ws: 2 L d + d d + d vectors */
BAND_AI void band8_forward_k(const BandDims* s, const float* q, const float* k, const double* pt, int64_t n,
                             int64_t h0, int64_t d, band_v8d* ws, double* out) {
    const int64_t L = s->L, r = s->r, nh = s->n * s->heads, i0 = n * s->heads + h0;
    band_v8d *Q = ws, *K = Q + L * d, *W = K + L * d, *ks = W + d * d;
    band8_load(s, q, k, n, h0, Q, K);
    for (int64_t j = 0; j < d * d + d; j++) W[j] = band_splat8d(0.0);
    band_v8d sum[3], sq[3], wx[BAND8_MAXD];
    for (int t = 0; t < 3; t++) sum[t] = sq[t] = band_splat8d(0.0);
    int64_t in = 0, gone = 0; /* W and ks hold the keys [gone, in) */
    for (int64_t o = 0; o < L; o++) {
        const band_v8d* x = Q + o * d;
        if (s->use[0]) {
            const int64_t lo = band_max(0, o - r), hi = band_min(L, o + r + 1);
            for (; in < hi; in++) band8_slide_k(W, ks, K + in * d, d, 1.0);
            for (; gone < lo; gone++) band8_slide_k(W, ks, K + gone * d, d, -1.0);
            band8_times_k(W, x, d, wx);
            for (int64_t c = 0; c < d; c++) {
                sq[0] += x[c] * wx[c];
                sum[0] += x[c] * ks[c];
            }
        }
        for (int t = 1; t < 3; t++)
            if (s->use[t]) {
                const double* R = pt + (t - 1) * L * (d + d * d);
                band8_table_k(t == 1 ? x : K + o * d, R + L * d + o * d * d, R + o * d, d, &sum[t], &sq[t]);
            }
    }
    for (int t = 0; t < 3; t++)
        for (int h = 0; h < 8; h++) {
            out[t * nh + i0 + h] = s->use[t] ? sum[t][h] : 0.0;
            out[(3 + t) * nh + i0 + h] = s->use[t] ? sq[t][h] : 0.0;
        }
}

static void band8_forward(const BandDims* s, const float* q, const float* k, const double* pt, int64_t n, int64_t h0,
                          band_v8d* ws, double* out) {
    switch (s->d) {
    case 4: band8_forward_k(s, q, k, pt, n, h0, 4, ws, out); break;
    case 8: band8_forward_k(s, q, k, pt, n, h0, 8, ws, out); break;
    case 16: band8_forward_k(s, q, k, pt, n, h0, 16, ws, out); break;
    case 32: band8_forward_k(s, q, k, pt, n, h0, 32, ws, out); break;
    default: band8_forward_k(s, q, k, pt, n, h0, s->d, ws, out);
    }
}

/* The backward of heads h0..h0+7 of sequence n: gq, gk written at the gradient strides; for each
   table term in Gram form, a x_o and b x_o x_o^T (upper triangle) added per head lane into acc
   (band8_acc_vectors, summed over the lanes into the per-head walk's A_o and P_o by
   band8_reduce). ws: 4 L d + 2 d d + 2 d vectors */
static int64_t band8_acc_vectors(int64_t L, int64_t d) { return 2 * L * (d + d * (d + 1) / 2); }

BAND_AI void band8_backward_k(const BandDims* s, const float* q, const float* k, const float* coef, band_v8d* acc,
                              const double* pg, int64_t n, int64_t h0, int64_t d, band_v8d* ws, float* gq,
                              float* gk) {
    const int64_t L = s->L, r = s->r, H = s->heads, gt = 2 * L * (d + d * d), tri = d * (d + 1) / 2;
    band_v8d *Q = ws, *K = Q + L * d, *gQ = K + L * d, *gK = gQ + L * d;
    band_v8d *W = gK + L * d, *V = W + d * d, *ks = V + d * d, *qs = ks + d;
    band8_load(s, q, k, n, h0, Q, K);
    for (int64_t j = 0; j < 2 * L * d + 2 * d * d + 2 * d; j++) gQ[j] = band_splat8d(0.0);
    band_v8d a[3], b[3];
    for (int t = 0; t < 3; t++)
        for (int h = 0; h < 8; h++) a[t][h] = coef[t * H + h0 + h], b[t][h] = coef[(3 + t) * H + h0 + h];
    if (s->use[0]) {
        band_v8d wq[BAND8_MAXD], vk[BAND8_MAXD];
        int64_t in = 0, gone = 0;
        for (int64_t o = 0; o < L; o++) {
            const int64_t lo = band_max(0, o - r), hi = band_min(L, o + r + 1);
            for (; in < hi; in++) {
                band8_slide_k(W, ks, K + in * d, d, 1.0);
                band8_slide_k(V, qs, Q + in * d, d, 1.0);
            }
            for (; gone < lo; gone++) {
                band8_slide_k(W, ks, K + gone * d, d, -1.0);
                band8_slide_k(V, qs, Q + gone * d, d, -1.0);
            }
            band8_times_k(W, Q + o * d, d, wq);
            band8_times_k(V, K + o * d, d, vk);
            for (int64_t c = 0; c < d; c++) {
                gQ[o * d + c] += a[0] * ks[c] + b[0] * wq[c];
                gK[o * d + c] += a[0] * qs[c] + b[0] * vk[c];
            }
        }
    }
    for (int t = 1; t < 3; t++) {
        if (!s->use[t]) continue;
        const double *R = pg + (t - 1) * gt, *T = R + L * d;
        const band_v8d* X = t == 1 ? Q : K;
        band_v8d* gX = t == 1 ? gQ : gK;
        for (int64_t o = 0; o < L; o++) { /* d/dx_o = a R_o + b T_o x_o */
            const band_v8d* x = X + o * d;
            const double* To = T + o * d * d;
            band_v8d* Ao = acc + ((t - 1) * L + o) * (d + tri);
            band_v8d* Po = Ao + d;
            for (int64_t c = 0; c < d; c++) {
                gX[o * d + c] += a[t] * R[o * d + c] + b[t] * band8_table_row_k(To, x, d, c);
                Ao[c] += a[t] * x[c];
                const band_v8d bx = b[t] * x[c];
                for (int64_t e = c; e < d; e++) *Po++ += bx * x[e];
            }
        }
    }
    float* gqb = gq + n * s->gs[0] + h0 * s->gs[1];
    float* gkb = gk + n * s->gs[0] + h0 * s->gs[1];
    for (int64_t o = 0; o < L; o++)
        for (int64_t c = 0; c < d; c++)
            for (int h = 0; h < 8; h++) {
                gqb[h * s->gs[1] + c * s->gs[2] + o * s->gs[3]] = (float)gQ[o * d + c][h];
                gkb[h * s->gs[1] + c * s->gs[2] + o * s->gs[3]] = (float)gK[o * d + c][h];
            }
}

static void band8_backward(const BandDims* s, const float* q, const float* k, const float* coef, band_v8d* acc,
                           const double* pg, int64_t n, int64_t h0, band_v8d* ws, float* gq, float* gk) {
    switch (s->d) {
    case 4: band8_backward_k(s, q, k, coef, acc, pg, n, h0, 4, ws, gq, gk); break;
    case 8: band8_backward_k(s, q, k, coef, acc, pg, n, h0, 8, ws, gq, gk); break;
    case 16: band8_backward_k(s, q, k, coef, acc, pg, n, h0, 16, ws, gq, gk); break;
    case 32: band8_backward_k(s, q, k, coef, acc, pg, n, h0, 32, ws, gq, gk); break;
    default: band8_backward_k(s, q, k, coef, acc, pg, n, h0, s->d, ws, gq, gk);
    }
}

/* the lanes of acc summed into the per-head walk's A_o and P_o (P symmetric) of each table term */
static void band8_reduce(const BandDims* s, const band_v8d* acc, double* pg) {
    const int64_t L = s->L, d = s->d, gt = 2 * L * (d + d * d), tri = d * (d + 1) / 2;
    for (int t = 1; t < 3; t++) {
        if (!s->use[t]) continue;
        double *A = pg + (t - 1) * gt + L * (d + d * d), *P = A + L * d;
        for (int64_t o = 0; o < L; o++) {
            const band_v8d* Ao = acc + ((t - 1) * L + o) * (d + tri);
            const band_v8d* Po = Ao + d;
            for (int64_t c = 0; c < d; c++) {
                A[o * d + c] += band_hsum8d(Ao[c]);
                for (int64_t e = c; e < d; e++) {
                    const double v = band_hsum8d(*Po++);
                    P[(o * d + c) * d + e] += v;
                    if (e != c) P[(o * d + e) * d + c] += v;
                }
            }
        }
    }
}

/* vectors of 64 bytes, aligned (malloc's 16 bytes are not), zeroed */
static band_v8d* band8_scratch(int64_t vectors) {
    void* p = NULL;
    if (posix_memalign(&p, 64, (size_t)(vectors > 0 ? vectors : 1) * sizeof(band_v8d))) return NULL;
    memset(p, 0, (size_t)(vectors > 0 ? vectors : 1) * sizeof(band_v8d));
    return (band_v8d*)p;
}

int axial_band_moments_f32(const int64_t* dims, const float* q, const float* k, const float* rq, const float* rk,
                           int64_t nh0, int64_t nh1, double* out) {
    BandDims s;
    if (band_dims(dims, &s)) return 1;
    const int64_t d = s.d, L = s.L, r = s.r, m = 2 * r + 1, nh = s.n * s.heads;
    const int64_t ld = L + BAND_PAD, mt = m + BAND_PAD;
    /* kc (d, ld) channel-major; qp, kp (L, d) position-major; tq, tk (d, mt); prefix sums */
    const int64_t floats = d * ld + 2 * L * d + 2 * d * mt + (L + 1) * d + 2 * (m + 1) * d;
    double* buf = (double*)calloc((size_t)floats, sizeof(double));
    if (!buf) return 1;
    double *kc = buf, *qp = kc + d * ld, *kp = qp + L * d, *tq = kp + L * d, *tk = tq + d * mt;
    double *kpre = tk + d * mt, *tqpre = kpre + (L + 1) * d, *tkpre = tqpre + (m + 1) * d;
    double* pt = NULL; /* (2, L, d + d*d): R_o and T_o of each table in Gram form */
    if (s.use[1] == 2 || s.use[2] == 2) {
        pt = (double*)calloc((size_t)(2 * L * (d + d * d)), sizeof(double));
        if (!pt) {
            free(buf);
            return 1;
        }
        for (int t = 1; t < 3; t++)
            if (s.use[t] == 2 && band_position_tables(t == 1 ? rq : rk, d, L, r, t == 2, pt + (t - 1) * L * (d + d * d),
                                                      pt + (t - 1) * L * (d + d * d) + L * d)) {
                free(buf);
                free(pt);
                return 1;
            }
    }
    for (int64_t ch = 0; ch < d; ch++)
        for (int64_t j = 0; j < m; j++) {
            tq[ch * mt + j] = s.use[1] ? rq[ch * m + j] : 0.0;
            tk[ch * mt + j] = s.use[2] ? rk[ch * m + j] : 0.0;
            tqpre[(j + 1) * d + ch] = tqpre[j * d + ch] + tq[ch * mt + j];
            tkpre[(j + 1) * d + ch] = tkpre[j * d + ch] + tk[ch * mt + j];
        }
    band_v8d* eight = band_eight_heads(&s) ? band8_scratch(2 * L * d + d * d + d) : NULL;
    for (int64_t i = nh0; i < nh1; i++) {
        const int64_t bn = i / s.heads, bh = i % s.heads;
        if (eight && bh % 8 == 0 && i + 8 <= nh1) { /* heads bh..bh+7 together */
            band8_forward(&s, q, k, pt, bn, bh, eight, out);
            i += 7;
            continue;
        }
        const float* qi = q + bn * s.qs[0] + bh * s.qs[1];
        const float* ki = k + bn * s.ks[0] + bh * s.ks[1];
        if (i + 1 < nh1) { /* the next sequence-head's operands, while this one's band runs */
            const int64_t nn = (i + 1) / s.heads, nhd = (i + 1) % s.heads;
            band_prefetch(q + nn * s.qs[0] + nhd * s.qs[1], s.qs[2], s.qs[3], d, L, 0);
            band_prefetch(k + nn * s.ks[0] + nhd * s.ks[1], s.ks[2], s.ks[3], d, L, 0);
        }
        for (int64_t ch = 0; ch < d; ch++) { /* the running sum in a register, not through memory */
            double run = 0;
            for (int64_t o = 0; o < L; o++) {
                const double kv = ki[ch * s.ks[2] + o * s.ks[3]];
                qp[o * d + ch] = qi[ch * s.qs[2] + o * s.qs[3]];
                kp[o * d + ch] = kc[ch * ld + o] = kv;
                kpre[(o + 1) * d + ch] = run += kv;
            }
        }
        /* closed-form sums: the window sums of k and of the table columns each position meets */
        double s1[3] = {0, 0, 0}, pairs = 0;
        for (int64_t o = 0; o < L; o++) {
            const int64_t lo = band_max(0, o - r), hi = band_min(L, o + r + 1);
            const int64_t jq0 = lo - o + r, jq1 = hi - o + r; /* rows of query o: [jq0, jq1) */
            const int64_t jk0 = band_max(0, o + r - (L - 1)), jk1 = band_min(m, o + r + 1); /* of key o */
            pairs += (double)(hi - lo);
            for (int64_t ch = 0; ch < d; ch++) {
                s1[0] += qp[o * d + ch] * (kpre[hi * d + ch] - kpre[lo * d + ch]);
                s1[1] += qp[o * d + ch] * (tqpre[jq1 * d + ch] - tqpre[jq0 * d + ch]);
                s1[2] += kp[o * d + ch] * (tkpre[jk1 * d + ch] - tkpre[jk0 * d + ch]);
            }
        }
        double c[3], css[3] = {0, 0, 0};
        for (int t = 0; t < 3; t++) c[t] = s.use[t] == 2 ? 0.0 : s1[t] / pairs; /* Grams: plain squares */
        for (int64_t o = 0; o < L; o++) {
            const int64_t lo = band_max(0, o - r), hi = band_min(L, o + r + 1);
            if (s.use[0]) css[0] += band_centred_squares(qp + o * d, kc, ld, d, lo, hi, c[0]);
            if (s.use[1] == 1) css[1] += band_centred_squares(qp + o * d, tq, mt, d, lo - o + r, hi - o + r, c[1]);
            if (s.use[2] == 1) {
                const int64_t jk0 = band_max(0, o + r - (L - 1)), jk1 = band_min(m, o + r + 1);
                css[2] += band_centred_squares(kp + o * d, tk, mt, d, jk0, jk1, c[2]);
            }
            for (int t = 1; t < 3; t++)
                if (s.use[t] == 2)
                    css[t] += band_quadratic((t == 1 ? qp : kp) + o * d, pt + (t - 1) * L * (d + d * d) + L * d + o * d * d, d);
        }
        for (int t = 0; t < 3; t++) {
            const int on = s.use[t] != 0;
            out[t * nh + i] = on ? s1[t] : 0.0;
            out[(3 + t) * nh + i] = on ? css[t] + 2 * c[t] * s1[t] - pairs * c[t] * c[t] : 0.0;
        }
    }
    free(buf);
    free(pt);
    free(eight);
    return 0;
}

int axial_band_moments_backward_f32(const int64_t* dims, const float* q, const float* k, const float* rq,
                                    const float* rk, const float* coef, int64_t nh0, int64_t nh1, float* gq,
                                    float* gk, double* gtab) {
    BandDims s;
    if (band_dims(dims, &s)) return 1;
    const int64_t d = s.d, L = s.L, r = s.r, m = 2 * r + 1, H = s.heads;
    const int64_t ld = L + BAND_PAD, mt = m + BAND_PAD;
    /* kc, gkc (d, ld); qp, kp, gqp, gkp (L, d); tq, tk, gtq, gtk (d, mt) */
    const int64_t floats = 2 * d * ld + 4 * L * d + 4 * d * mt;
    float* buf = (float*)calloc((size_t)floats, sizeof(float));
    band_v8f acc[BAND_MAXD]; /* on the stack: vector-aligned (malloc's 16 bytes are not) */
    if (!buf) return 1;
    float *kc = buf, *gkc = kc + d * ld, *qp = gkc + d * ld, *kp = qp + L * d, *gqp = kp + L * d, *gkp = gqp + L * d;
    float *tq = gkp + L * d, *tk = tq + d * mt, *gtq = tk + d * mt, *gtk = gtq + d * mt;
    for (int64_t ch = 0; ch < d; ch++)
        for (int64_t j = 0; j < m; j++) {
            tq[ch * mt + j] = s.use[1] ? rq[ch * m + j] : 0.0f;
            tk[ch * mt + j] = s.use[2] ? rk[ch * m + j] : 0.0f;
        }
    /* tables in Gram form, per term: R_o, T_o (as the forward), and this share's sums over (n, h) of
       a x_o (L, d) and 2b x_o x_o^T (L, d, d), from which the table's gradient follows at the end */
    const int64_t gt = 2 * L * (d + d * d);
    double* pg = NULL;
    if (s.use[1] == 2 || s.use[2] == 2) {
        pg = (double*)calloc((size_t)(2 * gt), sizeof(double));
        if (!pg) {
            free(buf);
            return 1;
        }
        for (int t = 1; t < 3; t++)
            if (s.use[t] == 2 &&
                band_position_tables(t == 1 ? rq : rk, d, L, r, t == 2, pg + (t - 1) * gt, pg + (t - 1) * gt + L * d)) {
                free(buf);
                free(pg);
                return 1;
            }
    }
    /* eight heads at once: their scratch, then the lanes' table-gradient terms */
    band_v8d* eight = band_eight_heads(&s) ? band8_scratch(4 * L * d + 2 * d * d + 2 * d + band8_acc_vectors(L, d)) : NULL;
    band_v8d* eight_acc = eight ? eight + 4 * L * d + 2 * d * d + 2 * d : NULL;
    for (int64_t i = nh0; i < nh1; i++) {
        const int64_t bn = i / H, bh = i % H;
        if (eight && bh % 8 == 0 && i + 8 <= nh1) { /* heads bh..bh+7 together */
            band8_backward(&s, q, k, coef, eight_acc, pg, bn, bh, eight, gq, gk);
            i += 7;
            continue;
        }
        const float* qi = q + bn * s.qs[0] + bh * s.qs[1];
        const float* ki = k + bn * s.ks[0] + bh * s.ks[1];
        if (i + 1 < nh1) { /* the next sequence-head's operands and this one's gradient lines */
            const int64_t nn = (i + 1) / H, nhd = (i + 1) % H;
            band_prefetch(q + nn * s.qs[0] + nhd * s.qs[1], s.qs[2], s.qs[3], d, L, 0);
            band_prefetch(k + nn * s.ks[0] + nhd * s.ks[1], s.ks[2], s.ks[3], d, L, 0);
        }
        band_prefetch(gq + bn * s.gs[0] + bh * s.gs[1], s.gs[2], s.gs[3], d, L, 1);
        band_prefetch(gk + bn * s.gs[0] + bh * s.gs[1], s.gs[2], s.gs[3], d, L, 1);
        for (int64_t o = 0; o < L; o++)
            for (int64_t ch = 0; ch < d; ch++) {
                qp[o * d + ch] = qi[ch * s.qs[2] + o * s.qs[3]];
                kp[o * d + ch] = kc[ch * ld + o] = ki[ch * s.ks[2] + o * s.ks[3]];
            }
        memset(gkc, 0, sizeof(float) * (size_t)(d * ld));
        memset(gqp, 0, sizeof(float) * (size_t)(2 * L * d));
        float a[3], b[3];
        for (int t = 0; t < 3; t++) a[t] = coef[t * H + bh], b[t] = coef[(3 + t) * H + bh];
        for (int64_t o = 0; o < L; o++) {
            const int64_t lo = band_max(0, o - r), hi = band_min(L, o + r + 1);
            if (s.use[0]) band_back_row(qp + o * d, kc, ld, d, lo, hi, a[0], b[0], gqp + o * d, gkc, acc);
            if (s.use[1] == 1)
                band_back_row(qp + o * d, tq, mt, d, lo - o + r, hi - o + r, a[1], b[1], gqp + o * d, gtq, acc);
            if (s.use[2] == 1) {
                const int64_t jk0 = band_max(0, o + r - (L - 1)), jk1 = band_min(m, o + r + 1);
                band_back_row(kp + o * d, tk, mt, d, jk0, jk1, a[2], b[2], gkp + o * d, gtk, acc);
            }
        }
        for (int t = 1; t < 3; t++) {
            if (s.use[t] != 2) continue;
            const double *R = pg + (t - 1) * gt, *T = R + L * d;
            double *A = pg + (t - 1) * gt + L * (d + d * d), *P = A + L * d;
            const float* xs = t == 1 ? qp : kp;
            float* gx = t == 1 ? gqp : gkp;
            for (int64_t o = 0; o < L; o++) /* d/dx_o = a R_o + 2b T_o x_o */
                band_gram_back(xs + o * d, R + o * d, T + o * d * d, A + o * d, P + o * d * d, gx + o * d, d, a[t],
                               b[t]);
        }
        float* gqi = gq + bn * s.gs[0] + bh * s.gs[1];
        float* gki = gk + bn * s.gs[0] + bh * s.gs[1];
        for (int64_t o = 0; o < L; o++)
            for (int64_t ch = 0; ch < d; ch++) {
                gqi[ch * s.gs[2] + o * s.gs[3]] = gqp[o * d + ch];
                gki[ch * s.gs[2] + o * s.gs[3]] = gkc[ch * ld + o] + gkp[o * d + ch];
            }
    }
    if (eight && pg) band8_reduce(&s, eight_acc, pg);
    /* the tables' gradients: summed over this share's sequence-heads in float32 rows, added in float64;
       in Gram form d/dr_j = sum over the positions o that meet row j of (A_o + P_o r_j) */
    for (int64_t ch = 0; ch < d; ch++)
        for (int64_t j = 0; j < m; j++) {
            gtab[ch * m + j] += gtq[ch * mt + j];
            gtab[(d + ch) * m + j] += gtk[ch * mt + j];
        }
    for (int t = 1; t < 3; t++) {
        if (s.use[t] != 2) continue;
        const double *A = pg + (t - 1) * gt + L * (d + d * d), *P = A + L * d;
        const float* tab = t == 1 ? rq : rk;
        double* g = gtab + (t - 1) * d * m;
        for (int64_t o = 0; o < L; o++) {
            int64_t j0, j1;
            band_rows(o, L, r, t == 2, &j0, &j1);
            for (int64_t j = j0; j < j1; j++)
                for (int64_t c = 0; c < d; c++) {
                    double v = A[o * d + c];
                    for (int64_t e = 0; e < d; e++) v += P[(o * d + c) * d + e] * tab[e * m + j];
                    g[c * m + j] += v;
                }
        }
    }
    free(buf);
    free(pg);
    free(eight);
    return 0;
}

#ifdef _OPENMP
#define BAND_SHARES_PRAGMA _Pragma("omp parallel for num_threads(workers) schedule(static, 1) reduction(|:bad) if(workers > 1)")
#else
#define BAND_SHARES_PRAGMA
#endif

/* Share i of `workers` over the sequence-heads [0, total) in whole sequences (dims[1] heads each):
   every head of a sequence in one share, so a head takes the same path (alone or in a group of
   eight) whatever the number of threads. The Python side (_share_bounds) splits the same way. */
static int64_t band_share_start(const int64_t* dims, int64_t total, int64_t workers, int64_t i) {
    const int64_t heads = dims[1] > 0 ? dims[1] : 1, units = total / heads;
    return i >= workers ? total : heads * (units * i / workers);
}

/* shares write disjoint columns of out */
int axial_band_moments_shares(const int64_t* dims, const float* q, const float* k, const float* rq, const float* rk,
                              int64_t total, int64_t workers, double* out) {
    int bad = 0;
    BAND_SHARES_PRAGMA
    for (int64_t i = 0; i < workers; i++)
        bad |= axial_band_moments_f32(dims, q, k, rq, rk, band_share_start(dims, total, workers, i),
                                      band_share_start(dims, total, workers, i + 1), out);
    return bad;
}

/* gtab: (workers, 2, d, 2r+1), one block per share, summed by the caller */
int axial_band_moments_backward_shares(const int64_t* dims, const float* q, const float* k, const float* rq,
                                       const float* rk, const float* coef, int64_t total, int64_t workers, float* gq,
                                       float* gk, double* gtab) {
    const int64_t block = 2 * dims[2] * (2 * dims[4] + 1);
    int bad = 0;
    BAND_SHARES_PRAGMA
    for (int64_t i = 0; i < workers; i++)
        bad |= axial_band_moments_backward_f32(dims, q, k, rq, rk, coef, band_share_start(dims, total, workers, i),
                                               band_share_start(dims, total, workers, i + 1), gq, gk,
                                               gtab + i * block);
    return bad;
}
