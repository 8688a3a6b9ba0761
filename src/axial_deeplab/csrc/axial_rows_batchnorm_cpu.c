/* axial_rows_batchnorm_cpu.c - the output BatchNorm of an axial attention layer in training, on rows
   of [sv | sve] (float32).

   What it computes: the layer's two retrievals sv and sve of value channel j sit in one row of
   y (M, 2C) at j and C + j; the output BatchNorm normalises each of the 2C channels with batch
   statistics and adds the two halves:
     out[m, j] = a0[j] y[m, j] + a1[j] y[m, C + j] + (s0[j] + s1[j])
   Its backward needs, per channel, sum_m g[m, j] y[m, r C + j] (r = 0, 1) and sum_m g[m, j], and
   then writes the input gradient
     gy[m, r C + j] = s'_r[j] + b_r[j] y[m, r C + j] + a_r[j] g[m, j].
   PyTorch does each of these as two to four passes over (M, 2C) tensors (a broadcast product, a
   sum, two multiply-adds), which at the layer's sizes are memory-bound: here they are one pass for
   the forward and two for the backward, and the products are never stored.

   Rows are m = (b S + s) T + t; y and gy are contiguous (M, 2C); the (M, C) output and gradient
   are at any row strides (the height layer's output is written with s and t swapped): dims =
   [B, S, T, C, stride_b, stride_s, stride_t] of that (M, C) tensor, then the rows per block of the
   sums (the caller sizes `part` by it), then the channel stride of the gradient g (the output, written
   here, has unit stride; a gradient may come at any, e.g. 0 from the backward of a sum).

   Built by axial_deeplab/layers/cpu_kernel.py into the same library as axial_attention_cpu.c (the
   sources are compiled as one unit; every name here is static or starts with axial_obn_). Exported:
     int axial_obn_forward_f32(dims, y, coef, r0, r1, out)         coef (3, C): a0, a1, s0 + s1
     int axial_obn_sums_f32(dims, y, g, k0, k1, part)              part (blocks, 3, C) float64:
         per block of dims[7] rows, sum g y0, sum g y1, sum g (the caller adds the blocks,
         so the result does not depend on how the rows were shared out)
     int axial_obn_backward_f32(dims, y, g, coef, r0, r1, gy)      coef (3, 2, C): a, b, s'
     and the *_shares forms: the same split into `workers` shares (OpenMP threads when built with
     -fopenmp). They return 0, or 1 when out of memory (the caller then runs its PyTorch form). */

#include <stdint.h>
#include <stdlib.h>

static const float* obn_row(const int64_t* dims, const float* base, int64_t m) {
    const int64_t S = dims[1], T = dims[2];
    const int64_t b = m / (S * T), s = (m / T) % S, t = m % T;
    return base + b * dims[4] + s * dims[5] + t * dims[6];
}

int axial_obn_forward_f32(const int64_t* dims, const float* y, const float* coef, int64_t r0, int64_t r1,
                          float* out) {
    const int64_t C = dims[3];
    const float *a0 = coef, *a1 = coef + C, *sh = coef + 2 * C;
    for (int64_t m = r0; m < r1; m++) {
        const float* yr = y + m * 2 * C;
        float* o = (float*)obn_row(dims, out, m);
        for (int64_t j = 0; j < C; j++) o[j] = sh[j] + a0[j] * yr[j] + a1[j] * yr[C + j];
    }
    return 0;
}

/* Row m of the gradient g as C contiguous floats: in place when its channels are at unit stride,
   else gathered into buf (the loops over channels then run on vectors either way). */
static inline const float* obn_gradient_row(const int64_t* dims, const float* g, int64_t m, float* buf) {
    const float* gr = obn_row(dims, g, m);
    const int64_t C = dims[3], gc = dims[8];
    if (gc == 1) return gr;
    for (int64_t j = 0; j < C; j++) buf[j] = gr[j * gc];
    return buf;
}

int axial_obn_sums_f32(const int64_t* dims, const float* y, const float* g, int64_t k0, int64_t k1, double* part) {
    const int64_t M = dims[0] * dims[1] * dims[2], C = dims[3], block = dims[7];
    float* acc = malloc(sizeof(float) * 4 * C);
    if (!acc) return 1;
    float *s0 = acc, *s1 = acc + C, *sg = acc + 2 * C, *buf = acc + 3 * C;
    for (int64_t k = k0; k < k1; k++) {
        for (int64_t j = 0; j < 3 * C; j++) acc[j] = 0.0f;
        const int64_t m1 = (k + 1) * block < M ? (k + 1) * block : M;
        for (int64_t m = k * block; m < m1; m++) {
            const float* yr = y + m * 2 * C;
            const float* gr = obn_gradient_row(dims, g, m, buf);
            for (int64_t j = 0; j < C; j++) {
                s0[j] += gr[j] * yr[j];
                s1[j] += gr[j] * yr[C + j];
                sg[j] += gr[j];
            }
        }
        double* p = part + k * 3 * C;
        for (int64_t j = 0; j < 3 * C; j++) p[j] = acc[j];
    }
    free(acc);
    return 0;
}

int axial_obn_backward_f32(const int64_t* dims, const float* y, const float* g, const float* coef, int64_t r0,
                           int64_t r1, float* gy) {
    const int64_t C = dims[3];
    const float *a = coef, *b = coef + 2 * C, *sh = coef + 4 * C; /* each (2, C) */
    float* buf = dims[8] == 1 ? NULL : malloc(sizeof(float) * C);
    if (dims[8] != 1 && !buf) return 1;
    for (int64_t m = r0; m < r1; m++) {
        const float* yr = y + m * 2 * C;
        const float* gr = obn_gradient_row(dims, g, m, buf);
        float* o = gy + m * 2 * C;
        for (int64_t j = 0; j < C; j++) {
            o[j] = sh[j] + b[j] * yr[j] + a[j] * gr[j];
            o[C + j] = sh[C + j] + b[C + j] * yr[C + j] + a[C + j] * gr[j];
        }
    }
    free(buf);
    return 0;
}

#ifdef _OPENMP
#define OBN_SHARES_PRAGMA _Pragma("omp parallel for num_threads(workers) schedule(static, 1) reduction(|:bad) if(workers > 1)")
#else
#define OBN_SHARES_PRAGMA
#endif

int axial_obn_forward_shares(const int64_t* dims, const float* y, const float* coef, int64_t total, int64_t workers,
                             float* out) {
    int bad = 0;
    OBN_SHARES_PRAGMA
    for (int64_t i = 0; i < workers; i++)
        bad |= axial_obn_forward_f32(dims, y, coef, total * i / workers, total * (i + 1) / workers, out);
    return bad;
}

int axial_obn_sums_shares(const int64_t* dims, const float* y, const float* g, int64_t total, int64_t workers,
                          double* part) {
    int bad = 0;
    OBN_SHARES_PRAGMA
    for (int64_t i = 0; i < workers; i++)
        bad |= axial_obn_sums_f32(dims, y, g, total * i / workers, total * (i + 1) / workers, part);
    return bad;
}

int axial_obn_backward_shares(const int64_t* dims, const float* y, const float* g, const float* coef, int64_t total,
                              int64_t workers, float* gy) {
    int bad = 0;
    OBN_SHARES_PRAGMA
    for (int64_t i = 0; i < workers; i++)
        bad |= axial_obn_backward_f32(dims, y, g, coef, total * i / workers, total * (i + 1) / workers, gy);
    return bad;
}
