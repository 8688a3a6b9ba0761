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

/* per position o: R_o = sum of the rows it meets (L, d) and T_o = sum of their r r^T (L, d, d), float64 */
static void band_position_tables(const float* tab, int64_t d, int64_t L, int64_t r, int key, double* R, double* T) {
    const int64_t m = 2 * r + 1;
    for (int64_t o = 0; o < L; o++) {
        int64_t j0, j1;
        band_rows(o, L, r, key, &j0, &j1);
        for (int64_t c = 0; c < d; c++) {
            double rs = 0;
            for (int64_t j = j0; j < j1; j++) rs += tab[c * m + j];
            R[o * d + c] = rs;
            for (int64_t e = 0; e < d; e++) {
                double t = 0;
                for (int64_t j = j0; j < j1; j++) t += (double)tab[c * m + j] * tab[e * m + j];
                T[(o * d + c) * d + e] = t;
            }
        }
    }
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
            if (s.use[t] == 2)
                band_position_tables(t == 1 ? rq : rk, d, L, r, t == 2, pt + (t - 1) * L * (d + d * d),
                                     pt + (t - 1) * L * (d + d * d) + L * d);
    }
    for (int64_t ch = 0; ch < d; ch++)
        for (int64_t j = 0; j < m; j++) {
            tq[ch * mt + j] = s.use[1] ? rq[ch * m + j] : 0.0;
            tk[ch * mt + j] = s.use[2] ? rk[ch * m + j] : 0.0;
            tqpre[(j + 1) * d + ch] = tqpre[j * d + ch] + tq[ch * mt + j];
            tkpre[(j + 1) * d + ch] = tkpre[j * d + ch] + tk[ch * mt + j];
        }
    for (int64_t i = nh0; i < nh1; i++) {
        const int64_t bn = i / s.heads, bh = i % s.heads;
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
            if (s.use[t] == 2)
                band_position_tables(t == 1 ? rq : rk, d, L, r, t == 2, pg + (t - 1) * gt, pg + (t - 1) * gt + L * d);
    }
    for (int64_t i = nh0; i < nh1; i++) {
        const int64_t bn = i / H, bh = i % H;
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
    return 0;
}

#ifdef _OPENMP
#define BAND_SHARES_PRAGMA _Pragma("omp parallel for num_threads(workers) schedule(static, 1) reduction(|:bad) if(workers > 1)")
#else
#define BAND_SHARES_PRAGMA
#endif

/* shares write disjoint columns of out */
int axial_band_moments_shares(const int64_t* dims, const float* q, const float* k, const float* rq, const float* rk,
                              int64_t total, int64_t workers, double* out) {
    int bad = 0;
    BAND_SHARES_PRAGMA
    for (int64_t i = 0; i < workers; i++)
        bad |= axial_band_moments_f32(dims, q, k, rq, rk, total * i / workers, total * (i + 1) / workers, out);
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
        bad |= axial_band_moments_backward_f32(dims, q, k, rq, rk, coef, total * i / workers,
                                               total * (i + 1) / workers, gq, gk, gtab + i * block);
    return bad;
}
