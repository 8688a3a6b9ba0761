"""Fused C kernel for the eval forward of axial attention on CPU.

Why: in PyTorch eager every pass over a chunk's L x L logits is a separate operator
(batched products, a transposed add, exp, sums), so the layer stays memory- and
dispatch-bound however it is chunked. This kernel computes, per query row, the three
similarity terms from the compact tables, the softmax (exp2 with log2(e) folded into the
term scales) and both retrievals while the row sits in L1 cache; four rows share each
load of the keys and values. Two entry points: :func:`forward_eval`, the whole layer in
inference (BN folded into the projection, one matrix product into a position-major
buffer the kernel reads directly, output BN folded into the kernel's store), and
:func:`attend_eval`, the contract of :func:`.fast_cpu.attend`, used by the forward of
the memory-efficient training function (it also returns each row's log-sum-exp).

The C source below is compiled once per machine with the system C compiler (``$CC``,
else ``cc``/``gcc``/``clang``) into a cache directory (``$AXIAL_DEEPLAB_CACHE``, else
``$XDG_CACHE_HOME/axial_deeplab`` or ``~/.cache/axial_deeplab``) and loaded with
ctypes, whose calls release the GIL, so a thread per torch thread runs a share of the
rows. Without a compiler, or with ``AXIAL_DEEPLAB_NO_C_KERNEL=1``, the fast path uses
its PyTorch implementation instead (same results within float32 rounding).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["available", "attend_eval", "forward_eval", "attention_backward", "ENABLED"]

# Tests switch this off to exercise the PyTorch implementation.
ENABLED = os.environ.get("AXIAL_DEEPLAB_NO_C_KERNEL", "") in ("", "0")
MAX_KEY_DEPTH = 256
_PAD = 8  # floats of zero padding after key rows and table rows (one vector)
_LOG2E = 1.4426950408889634

_SOURCE = r"""
/* Position-sensitive axial attention, eval forward, fused per query row (float32).
   For query row o of sequence-head (n, h), in log2 units (scales folded by the caller):
     z_p = qqk_o . k_p + qqr_o . rq[p-o] + kkr_p . rk[p-o]   for p in the span of o
     a_p = 2^(z_p - max z) / sum
     sv  = sum_p a_p v_p,   sve = sum_p a_p rv[p-o]
   Tables are pre-gathered over offsets -(L-1)..(L-1) (clipped to the reach by the caller). */
#include <stdint.h>
#include <string.h>

typedef float v8sf __attribute__((vector_size(32)));
typedef int32_t v8si __attribute__((vector_size(32)));

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
static inline v8sf max8(v8sf a, v8sf b) { return select8(a > b, a, b); }
static inline float hmax8(v8sf v) {
    float m = v[0];
    for (int i = 1; i < 8; i++) m = v[i] > m ? v[i] : m;
    return m;
}
static inline float hsum8(v8sf v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}
/* 2^x lane-wise (Cephes exp2f polynomial, about 2 ulp); lanes below -126 give 2^-126. */
static inline v8sf exp2_8(v8sf x) {
    const v8sf magic = splat8(12582912.0f); /* 1.5 * 2^23: rounds to the nearest integer */
    x = max8(x, splat8(-126.0f));
    const v8sf xi = (x + magic) - magic;
    const v8sf f = x - xi;
    v8sf p = splat8(1.535336188319500e-4f);
    p = p * f + splat8(1.339887440266574e-3f);
    p = p * f + splat8(9.618437357674640e-3f);
    p = p * f + splat8(5.550332471162809e-2f);
    p = p * f + splat8(2.402264791363012e-1f);
    p = p * f + splat8(6.931472028550421e-1f);
    p = p * f + splat8(1.0f);
    const v8si e = __builtin_convertvector(xi, v8si);
    return p * (v8sf)((e + 127) << 23);
}

typedef struct {
    int64_t Lq, L, qstep, radius, dk, dv, heads;
    const float* qkv;        /* (n, h, channel, position) at qkv[n*s_n + h*s_h + ch*s_c + p*s_p];      */
    int64_t s_n, s_h, s_c, s_p; /* channels per head: q 0..dk-1, k dk..2dk-1, v 2dk..; v needs s_c == 1 */
                             /* and 8 readable floats past each value row                             */
    const float* scale;      /* (3, heads) log2-unit multipliers of q.k, q.r^q, k.r^k                  */
    int64_t use_qk, use_qr, use_kr;
    const float *rqe, *rke;  /* (dk, Jp) tables over offsets -(L-1)..L-1 (clipped), zero-padded; NULL if off */
    int64_t Jp;
    const float* rvt;        /* (2L-1, dvp), dvp = dv rounded up to 8, or NULL (r^v off)               */
    float *out, *out2;       /* out[n*o_ns + h*o_hs + i*o_rs + c]; out2 = sve with the same strides     */
    int64_t o_ns, o_hs, o_rs;
    const float *alpha_v, *alpha_r, *beta; /* (heads*dv): fused out = a_v*sv + a_r*sve + beta, or NULL */
    float* lse;              /* (n*heads, Lq) log2-sum-exp2 of each row, or NULL                        */
} AxialArgs;

#define MAXDK 256

/* Keys of one sequence-head as zero-padded rows (dk, Lp): plain and scaled for k.r^k. */
static void load_keys(const AxialArgs* a, int64_t n, int64_t h, int64_t Lp, float* kt, float* kkt) {
    const float* base = a->qkv + n * a->s_n + h * a->s_h + a->dk * a->s_c;
    const float sk = a->scale[2 * a->heads + h];
    for (int64_t c = 0; c < a->dk; c++) {
        float* row = kt + c * Lp;
        float* row2 = kkt + c * Lp;
        for (int64_t p = 0; p < a->L; p++) {
            const float v = base[c * a->s_c + p * a->s_p];
            row[p] = v;
            row2[p] = v * sk;
        }
        for (int64_t p = a->L; p < Lp; p++) row[p] = row2[p] = 0.0f;
    }
}

#define DEFINE_ROWS(R)                                                                      \
static void rows_##R(const AxialArgs* a, int64_t nh, int64_t i0, float* z,                 \
                     const float* kt, const float* kkt, int64_t Lp) {                      \
    const int64_t L = a->L, Jp = a->Jp, dk = a->dk, dv = a->dv, Lq = a->Lq;                 \
    const int64_t n = nh / a->heads, h = nh % a->heads;                                     \
    int64_t o[R], p0[R], p1[R], toff[R];                                                    \
    for (int j = 0; j < R; j++) {                                                           \
        o[j] = (i0 + j) * a->qstep;                                                         \
        p0[j] = 0; p1[j] = L;                                                               \
        if (a->radius >= 0) {                                                               \
            p0[j] = o[j] - a->radius < 0 ? 0 : o[j] - a->radius;                            \
            p1[j] = o[j] + a->radius + 1 > L ? L : o[j] + a->radius + 1;                    \
        }                                                                                   \
    }                                                                                       \
    const int64_t P0 = p0[0], P1 = p1[R - 1], W = P1 - P0, W8 = (W + 7) & ~(int64_t)7;      \
    for (int j = 0; j < R; j++) toff[j] = P0 - o[j] + L - 1;                                \
    float qa[R][MAXDK], qb[R][MAXDK];                                                       \
    {                                                                                       \
        const float* qbase = a->qkv + n * a->s_n + h * a->s_h;                              \
        const float s0 = a->scale[h], s1 = a->scale[a->heads + h];                          \
        for (int64_t c = 0; c < dk; c++)                                                    \
            for (int j = 0; j < R; j++) {                                                   \
                const float qv = qbase[c * a->s_c + o[j] * a->s_p];                         \
                qa[j][c] = qv * s0;                                                         \
                qb[j][c] = qv * s1;                                                         \
            }                                                                               \
    }                                                                                       \
    const float* kn = kt + P0;                                                              \
    const float* kkn = kkt + P0;                                                            \
    for (int64_t pb = 0; pb < W8; pb += 8) {                                                \
        v8sf acc[R];                                                                        \
        for (int j = 0; j < R; j++) acc[j] = splat8(0.0f);                                  \
        for (int64_t c = 0; c < dk; c++) {                                                  \
            if (a->use_qk) {                                                                \
                const v8sf kv = load8(kn + c * Lp + pb);                                    \
                for (int j = 0; j < R; j++) acc[j] += splat8(qa[j][c]) * kv;                \
            }                                                                               \
            if (a->use_qr) {                                                                \
                const float* t = a->rqe + c * Jp + pb;                                      \
                for (int j = 0; j < R; j++) acc[j] += splat8(qb[j][c]) * load8(t + toff[j]); \
            }                                                                               \
            if (a->use_kr) {                                                                \
                const v8sf kv = load8(kkn + c * Lp + pb);                                   \
                const float* t = a->rke + c * Jp + pb;                                      \
                for (int j = 0; j < R; j++) acc[j] += kv * load8(t + toff[j]);              \
            }                                                                               \
        }                                                                                   \
        for (int j = 0; j < R; j++) store8(z + j * Lp + pb, acc[j]);                        \
    }                                                                                       \
    float inv[R];                                                                           \
    for (int j = 0; j < R; j++) {                                                           \
        float* zj = z + j * Lp;                                                             \
        for (int64_t p = 0; p < p0[j] - P0; p++) zj[p] = -1e30f;                            \
        for (int64_t p = p1[j] - P0; p < W8; p++) zj[p] = -1e30f;                           \
        v8sf mv = load8(zj);                                                                \
        for (int64_t p = 8; p < W8; p += 8) mv = max8(mv, load8(zj + p));                   \
        const float m = hmax8(mv);                                                          \
        v8sf sum = splat8(0.0f);                                                            \
        for (int64_t p = 0; p < W8; p += 8) {                                               \
            const v8sf e = exp2_8(load8(zj + p) - splat8(m));                               \
            store8(zj + p, e);                                                              \
            sum += e;                                                                       \
        }                                                                                   \
        for (int64_t p = 0; p < p0[j] - P0; p++) zj[p] = 0.0f;                              \
        for (int64_t p = p1[j] - P0; p < W8; p++) zj[p] = 0.0f;                             \
        const float s = hsum8(sum);                                                         \
        inv[j] = 1.0f / s;                                                                  \
        if (a->lse) a->lse[nh * Lq + i0 + j] = m + __builtin_log2f(s);                      \
    }                                                                                       \
    const float* vn = a->qkv + n * a->s_n + h * a->s_h + 2 * dk * a->s_c + P0 * a->s_p;     \
    const int64_t dvp = (dv + 7) & ~(int64_t)7;                                             \
    for (int64_t c8 = 0; c8 < dv; c8 += 8) {                                                \
        v8sf acc[R], acc2[R];                                                               \
        for (int j = 0; j < R; j++) acc[j] = acc2[j] = splat8(0.0f);                        \
        for (int64_t p = 0; p < W; p++) {                                                   \
            const v8sf vv = load8(vn + p * a->s_p + c8);                                    \
            for (int j = 0; j < R; j++) acc[j] += splat8(z[j * Lp + p]) * vv;               \
        }                                                                                   \
        if (a->rvt) {                                                                       \
            for (int64_t p = 0; p < W; p++)                                                 \
                for (int j = 0; j < R; j++)                                                 \
                    acc2[j] += splat8(z[j * Lp + p]) * load8(a->rvt + (toff[j] + p) * dvp + c8); \
        }                                                                                   \
        const int64_t width = dv - c8;                                                      \
        for (int j = 0; j < R; j++) {                                                       \
            float* dst = a->out + n * a->o_ns + h * a->o_hs + (i0 + j) * a->o_rs + c8;      \
            const v8sf sv = acc[j] * splat8(inv[j]), sve = acc2[j] * splat8(inv[j]);        \
            if (a->alpha_v) {                                                               \
                const int64_t hc = h * dv + c8;                                             \
                v8sf av = splat8(0.0f), ar = splat8(0.0f), b = splat8(0.0f);                \
                for (int64_t i = 0; i < 8 && i < width; i++) {                              \
                    av[i] = a->alpha_v[hc + i];                                             \
                    ar[i] = a->alpha_r ? a->alpha_r[hc + i] : 0.0f;                         \
                    b[i] = a->beta[hc + i];                                                 \
                }                                                                           \
                store_n(dst, av * sv + ar * sve + b, width);                                \
            } else {                                                                        \
                store_n(dst, sv, width);                                                    \
                if (a->out2) store_n(a->out2 + (dst - a->out), sve, width);                 \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
}

DEFINE_ROWS(4)
DEFINE_ROWS(1)

/* Rows [r0, r1) of the flattened (sequence-head, query) grid.
   scratch: (4 + 2 * dk) * (L + 8) floats. */
int axial_attention_rows_f32(const AxialArgs* a, int64_t r0, int64_t r1, float* scratch) {
    if (a->dk > MAXDK || a->Jp < 2 * a->L + 7 || a->s_c != 1) return 1;
    const int64_t Lp = a->L + 8;
    float* z = scratch;
    float* kt = scratch + 4 * Lp;
    float* kkt = kt + a->dk * Lp;
    int64_t loaded = -1;
    int64_t r = r0;
    while (r < r1) {
        const int64_t nh = r / a->Lq, i = r % a->Lq;
        if (nh != loaded) { load_keys(a, nh / a->heads, nh % a->heads, Lp, kt, kkt); loaded = nh; }
        if (i + 4 <= a->Lq && r + 4 <= r1) { rows_4(a, nh, i, z, kt, kkt, Lp); r += 4; }
        else { rows_1(a, nh, i, z, kt, kkt, Lp); r += 1; }
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
    const float *rqe, *rke;           /* (dk, Jp) as in the forward, or NULL */
    int64_t Jp;
    const float* rvT;                 /* (dv, Jp) value table over offsets, zero-padded, or NULL */
    const float *lse, *delta;         /* (n*heads, L): forward log2-sum-exp2, sum_p P dP */
    const float *gsv, *gsve;          /* incoming gradients, element (nh, c, o) at g[nh*g_nh + c*g_c + o*g_o] */
    int64_t g_nh, g_c, g_o;
    float* gqkv;                      /* gradient of qkv, same strides as qkv (every slot written) */
} AxialBackArgs;

/* Sequence-heads [nh0, nh1). scratch: (dk*2 + dv*2 + 5) * (L + 8) + 16 * dk floats.
   g_rqe, g_rke: (dk, Jp), g_rvT: (dv, Jp), g_scale: (3, heads), accumulated (+=). */
int axial_attention_backward_f32(const AxialBackArgs* a, int64_t nh0, int64_t nh1, float* scratch,
                                 float* g_rqe, float* g_rke, float* g_rvT, float* g_scale) {
    const int64_t L = a->L, Lp = L + 8, Jp = a->Jp, dk = a->dk, dv = a->dv, H = a->heads;
    if (dk > MAXDK || dv > 4 * MAXDK || Jp < 2 * L + 7) return 1;
    float* kT = scratch;               /* (dk, Lp) keys */
    float* vT = kT + dk * Lp;          /* (dv, Lp) values */
    float* gkT = vT + dv * Lp;         /* (dk, Lp) key gradient */
    float* gvT = gkT + dk * Lp;        /* (dv, Lp) value gradient */
    float* sqk = gvT + dv * Lp;        /* unscaled terms of the current row */
    float* sqr = sqk + Lp;
    float* skr = sqr + Lp;
    float* dyb = skr + Lp;             /* dY of the current row */
    float* pb_ = dyb + Lp;             /* P of the current row */
    const float LOG2E = 1.4426950408889634f;
    const v8sf lanes = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int64_t nh = nh0; nh < nh1; nh++) {
        const int64_t n = nh / H, h = nh % H;
        const float* base = a->qkv + n * a->s_n + h * a->s_h;
        float* gbase = a->gqkv + n * a->s_n + h * a->s_h;
        for (int64_t c = 0; c < dk; c++) {
            for (int64_t p = 0; p < L; p++) kT[c * Lp + p] = base[(dk + c) * a->s_c + p * a->s_p];
            for (int64_t p = L; p < Lp; p++) kT[c * Lp + p] = 0.0f;
        }
        for (int64_t c = 0; c < dv; c++) {
            for (int64_t p = 0; p < L; p++) vT[c * Lp + p] = base[(2 * dk + c) * a->s_c + p * a->s_p];
            for (int64_t p = L; p < Lp; p++) vT[c * Lp + p] = 0.0f;
        }
        memset(gkT, 0, sizeof(float) * dk * Lp);
        memset(gvT, 0, sizeof(float) * dv * Lp);
        const float aqk = a->use_qk ? a->scale[h] : 0.0f;
        const float aqr = a->use_qr ? a->scale[H + h] : 0.0f;
        const float akr = a->use_kr ? a->scale[2 * H + h] : 0.0f;
        v8sf ga_qk = splat8(0.0f), ga_qr = splat8(0.0f), ga_kr = splat8(0.0f);
        for (int64_t o = 0; o < L; o++) {
            int64_t p0 = 0, p1 = L;
            if (a->radius >= 0) {
                p0 = o - a->radius < 0 ? 0 : o - a->radius;
                p1 = o + a->radius + 1 > L ? L : o + a->radius + 1;
            }
            const int64_t W = p1 - p0, W8 = (W + 7) & ~(int64_t)7, toff = p0 - o + L - 1;
            float q[MAXDK], gs[4 * MAXDK], gse[4 * MAXDK];
            for (int64_t c = 0; c < dk; c++) q[c] = base[c * a->s_c + o * a->s_p];
            for (int64_t c = 0; c < dv; c++) {
                gs[c] = a->gsv[nh * a->g_nh + c * a->g_c + o * a->g_o];
                gse[c] = a->use_rv ? a->gsve[nh * a->g_nh + c * a->g_c + o * a->g_o] : 0.0f;
            }
            const float lse = a->lse[nh * L + o], delta = a->delta[nh * L + o];
            /* pass 1: terms, P, dP, dY */
            for (int64_t pb = 0; pb < W8; pb += 8) {
                v8sf t_qk = splat8(0.0f), t_qr = splat8(0.0f), t_kr = splat8(0.0f);
                for (int64_t c = 0; c < dk; c++) {
                    const v8sf kv = load8(kT + c * Lp + p0 + pb);
                    if (a->use_qk) t_qk += splat8(q[c]) * kv;
                    if (a->use_qr) t_qr += splat8(q[c]) * load8(a->rqe + c * Jp + toff + pb);
                    if (a->use_kr) t_kr += kv * load8(a->rke + c * Jp + toff + pb);
                }
                const v8sf z = splat8(LOG2E) * (splat8(aqk) * t_qk + splat8(aqr) * t_qr + splat8(akr) * t_kr);
                v8sf p = exp2_8(z - splat8(lse));
                p = select8(lanes + splat8((float)pb) < splat8((float)W), p, splat8(0.0f));
                v8sf dp = splat8(0.0f);
                for (int64_t c = 0; c < dv; c++) {
                    dp += splat8(gs[c]) * load8(vT + c * Lp + p0 + pb);
                    if (a->use_rv) dp += splat8(gse[c]) * load8(a->rvT + c * Jp + toff + pb);
                }
                const v8sf dy = p * (dp - splat8(delta));
                store8(sqk + pb, t_qk); store8(sqr + pb, t_qr); store8(skr + pb, t_kr);
                store8(dyb + pb, dy); store8(pb_ + pb, p);
                ga_qk += dy * t_qk; ga_qr += dy * t_qr; ga_kr += dy * t_kr;
            }
            /* pass 2: gradients of q (this row), k, v (rows of this sequence-head), tables */
            for (int64_t c = 0; c < dk; c++) {
                v8sf acc_k = splat8(0.0f), acc_r = splat8(0.0f);
                const float* kr = kT + c * Lp + p0;
                const float* tq = a->use_qr ? a->rqe + c * Jp + toff : 0;
                const float* tk = a->use_kr ? a->rke + c * Jp + toff : 0;
                float* gk = gkT + c * Lp + p0;
                float* grq = g_rqe ? g_rqe + c * Jp + toff : 0;
                float* grk = g_rke ? g_rke + c * Jp + toff : 0;
                const v8sf cq_k = splat8(aqk * q[c]), cq_r = splat8(aqr * q[c]), ck = splat8(akr);
                for (int64_t pb = 0; pb < W8; pb += 8) {
                    const v8sf dy = load8(dyb + pb), kv = load8(kr + pb);
                    acc_k += dy * kv;
                    v8sf g = load8(gk + pb) + cq_k * dy;
                    if (tq) {
                        acc_r += dy * load8(tq + pb);
                        store8(grq + pb, load8(grq + pb) + cq_r * dy);
                    }
                    if (tk) {
                        g += ck * dy * load8(tk + pb);
                        store8(grk + pb, load8(grk + pb) + ck * dy * kv);
                    }
                    store8(gk + pb, g);
                }
                gbase[c * a->s_c + o * a->s_p] = aqk * hsum8(acc_k) + aqr * hsum8(acc_r);
            }
            for (int64_t c = 0; c < dv; c++) {
                float* gv = gvT + c * Lp + p0;
                float* grv = (a->use_rv && g_rvT) ? g_rvT + c * Jp + toff : 0;
                const v8sf g1 = splat8(gs[c]), g2 = splat8(gse[c]);
                for (int64_t pb = 0; pb < W8; pb += 8) {
                    const v8sf p = load8(pb_ + pb);
                    store8(gv + pb, load8(gv + pb) + g1 * p);
                    if (grv) store8(grv + pb, load8(grv + pb) + g2 * p);
                }
            }
        }
        for (int64_t c = 0; c < dk; c++)
            for (int64_t p = 0; p < L; p++) gbase[(dk + c) * a->s_c + p * a->s_p] = gkT[c * Lp + p];
        for (int64_t c = 0; c < dv; c++)
            for (int64_t p = 0; p < L; p++) gbase[(2 * dk + c) * a->s_c + p * a->s_p] = gvT[c * Lp + p];
        g_scale[h] += hsum8(ga_qk);
        g_scale[H + h] += hsum8(ga_qr);
        g_scale[2 * H + h] += hsum8(ga_kr);
    }
    return 0;
}
"""

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class _Args(ctypes.Structure):
    _fields_ = ([(n, _I64) for n in ("Lq", "L", "qstep", "radius", "dk", "dv", "heads")]
                + [("qkv", _PTR)] + [(n, _I64) for n in ("s_n", "s_h", "s_c", "s_p")]
                + [("scale", _PTR)] + [(n, _I64) for n in ("use_qk", "use_qr", "use_kr")]
                + [("rqe", _PTR), ("rke", _PTR), ("Jp", _I64), ("rvt", _PTR), ("out", _PTR),
                   ("out2", _PTR), ("o_ns", _I64), ("o_hs", _I64), ("o_rs", _I64), ("alpha_v", _PTR),
                   ("alpha_r", _PTR), ("beta", _PTR), ("lse", _PTR)])


class _BackArgs(ctypes.Structure):
    _fields_ = ([(n, _I64) for n in ("L", "radius", "dk", "dv", "heads")]
                + [("qkv", _PTR)] + [(n, _I64) for n in ("s_n", "s_h", "s_c", "s_p")]
                + [("scale", _PTR)] + [(n, _I64) for n in ("use_qk", "use_qr", "use_kr", "use_rv")]
                + [("rqe", _PTR), ("rke", _PTR), ("Jp", _I64), ("rvT", _PTR), ("lse", _PTR), ("delta", _PTR),
                   ("gsv", _PTR), ("gsve", _PTR), ("g_nh", _I64), ("g_c", _I64), ("g_o", _I64), ("gqkv", _PTR)])


_lock = threading.Lock()
_state = {"lib": None, "tried": False, "pools": {}}


def _cache_dir() -> str:
    root = os.environ.get("AXIAL_DEEPLAB_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "axial_deeplab")
    try:
        os.makedirs(root, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return tempfile.gettempdir()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compile() -> Optional[ctypes.CDLL]:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None
    common = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
    for flags in (common + ["-march=native"], common):
        key = hashlib.sha256("\0".join([_SOURCE, compiler, *flags, platform.machine(), _cpu_model()])
                             .encode()).hexdigest()[:16]
        target = os.path.join(_cache_dir(), f"axial_attention_{key}.so")
        if not os.path.exists(target):
            fd, src = tempfile.mkstemp(suffix=".c", dir=os.path.dirname(target))
            tmp_out = src[:-2] + ".so"
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(_SOURCE)
                proc = subprocess.run([compiler, *flags, src, "-o", tmp_out], capture_output=True, timeout=120)
                if proc.returncode != 0:
                    continue
                os.replace(tmp_out, target)  # atomic: concurrent processes see a whole file
            except (OSError, subprocess.SubprocessError):
                continue
            finally:
                for path in (src, tmp_out):
                    if os.path.exists(path):
                        os.unlink(path)
        try:
            lib = ctypes.CDLL(target)
        except OSError:
            continue
        fn = lib.axial_attention_rows_f32
        fn.argtypes = [ctypes.POINTER(_Args), _I64, _I64, _PTR]
        fn.restype = ctypes.c_int
        fn = lib.axial_attention_backward_f32
        fn.argtypes = [ctypes.POINTER(_BackArgs), _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR]
        fn.restype = ctypes.c_int
        return lib
    return None


def _library() -> Optional[ctypes.CDLL]:
    if not ENABLED:
        return None
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _state["lib"] = _compile()
                except Exception as e:  # never let the optional kernel break the layer
                    warnings.warn(f"axial attention C kernel unavailable ({e}); using the PyTorch path")
                _state["tried"] = True
    return _state["lib"]


def available() -> bool:
    """True when the compiled kernel is loaded (compiling it on first call)."""
    return _library() is not None


def _pool(workers: int) -> ThreadPoolExecutor:
    # Keyed by process id too: a forked child (e.g. a data-loader worker) must not reuse
    # the parent's pool, whose threads do not exist in the child.
    key = (os.getpid(), workers)
    pool = _state["pools"].get(key)
    if pool is None:
        with _lock:
            pool = _state["pools"].get(key)
            if pool is None:
                pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="axial-attn")
                _state["pools"][key] = pool
    return pool


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _run_rows(lib, args: _Args, rows: int, length: int, dk: int) -> bool:
    """Split the rows over one thread per torch thread; ctypes releases the GIL."""
    workers = max(1, min(torch.get_num_threads(), rows // 64 or 1))
    fn = lib.axial_attention_rows_f32
    scratch_size = (4 + 2 * dk) * (length + _PAD)

    def share(i):
        r0, r1 = rows * i // workers, rows * (i + 1) // workers
        scratch = torch.empty(scratch_size)
        return fn(ctypes.byref(args), r0, r1, scratch.data_ptr())

    status = [share(0)] if workers == 1 else list(_pool(workers).map(share, range(workers)))
    return not any(status)


def _tables(layer, length: int):
    """Relative tables gathered over offsets -(L-1)..L-1 (clipped to the reach), zero-padded."""
    d = layer.max_relative_distance
    offsets = torch.arange(-(length - 1), length).clamp(-d, d) + d
    rqe = rke = rvt = None
    if layer.use_query_rpe:
        rqe = F.pad(layer.query_table.detach().float()[:, offsets], (0, _PAD)).contiguous()
    if layer.use_key_rpe:
        rke = F.pad(layer.key_table.detach().float()[:, offsets], (0, _PAD)).contiguous()
    if layer.use_value_rpe:
        rvt = F.pad(layer.value_table.detach().float()[:, offsets].t(), (0, -layer.value_depth % 8)).contiguous()
    return rqe, rke, rvt


def _supported(layer, t: torch.Tensor) -> bool:
    return (t.dtype == torch.float32 and t.device.type == "cpu" and layer.key_depth <= MAX_KEY_DEPTH
            and _library() is not None)


def _run(layer, qkv_pm: torch.Tensor, n: int, length: int, scales: torch.Tensor, step: int,
         out: torch.Tensor, o_strides, out2=None, alpha=None, lse=None) -> bool:
    """qkv_pm: position-major (n, L, heads, 2dk+dv) with 8 readable floats after it."""
    lib = _library()
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    c2h = 2 * dk + dv
    lq = len(range(0, length, step))
    scale = (scales.detach().float() * _LOG2E).contiguous()
    rqe, rke, rvt = _tables(layer, length)
    alpha_v, alpha_r, beta = alpha if alpha is not None else (None, None, None)
    args = _Args(lq, length, step, _radius(layer), dk, dv, heads,
                 qkv_pm.data_ptr(), length * heads * c2h, c2h, 1, heads * c2h,
                 scale.data_ptr(), int(layer.use_qk), int(layer.use_query_rpe), int(layer.use_key_rpe),
                 _ptr(rqe), _ptr(rke), 2 * length - 1 + _PAD, _ptr(rvt),
                 out.data_ptr(), _ptr(out2), *o_strides, _ptr(alpha_v), _ptr(alpha_r), _ptr(beta), _ptr(lse))
    return _run_rows(lib, args, n * heads * lq, length, dk)


def attend_eval(layer, qkv: torch.Tensor, scales: torch.Tensor, query_step: int = 1,
                return_lse: bool = False):
    """Same contract as :func:`.fast_cpu.attend` (qkv (nh, 2dk+dv, L) -> sv, sve (nh, dv, Lq)
    [, lse]) for float32 CPU tensors without gradients; None when the kernel is unavailable."""
    if not _supported(layer, qkv):
        return None
    heads, dv = layer.num_heads, layer.value_depth
    with torch.no_grad():
        nh, c2h, length = qkv.shape
        n = nh // heads
        buf = torch.empty(nh * c2h * length + _PAD)
        qkv_pm = buf[: nh * c2h * length].view(n, length, heads, c2h)
        qkv_pm.copy_(qkv.view(n, heads, c2h, length).permute(0, 3, 1, 2))
        lq = len(range(0, length, query_step))
        sv = torch.empty(nh, lq, dv)
        sve = torch.empty(nh, lq, dv) if layer.use_value_rpe else None
        lse = torch.empty(nh, lq) if return_lse else None
        if not _run(layer, buf, n, length, scales, query_step, sv, (heads * lq * dv, lq * dv, dv),
                    out2=sve, lse=lse):
            return None
        sv = sv.transpose(1, 2)
        sve = sve.transpose(1, 2) if sve is not None else None
    if return_lse:
        return sv, sve, lse
    return sv, sve


def _radius(layer) -> int:
    return -1 if layer.span is None else (layer.span - 1) // 2


def _eval_bn(bn) -> bool:
    return not bn.training and bn.running_mean is not None


def forward_eval(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The whole layer in inference (all BNs in eval, no autograd, float32, no autocast):
    folded projection as one matrix product into a position-major (sequence, position,
    channel) buffer the kernel reads directly, the kernel with the output BN folded in,
    and a permuted view back to (B, C, H, W). None when not applicable."""
    if (torch.is_grad_enabled() or not _supported(layer, x) or torch.is_autocast_enabled("cpu")
            or not all(_eval_bn(bn) for bn in (layer.bn_qkv, layer.bn_similarity, layer.bn_output))):
        return None
    heads, dv = layer.num_heads, layer.value_depth
    batch, cin, height, width = x.shape
    if layer.axis == "height":
        length, other = height, width
        xs = x.permute(0, 3, 2, 1)  # (B, W, H, C): sequences along H
    else:
        length, other = width, height
        xs = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    n = batch * other
    c2 = 2 * layer.key_channels + layer.out_channels
    bn = layer.bn_qkv
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    w = layer.qkv.weight.flatten(1) * scale[:, None]
    b = bn.bias - bn.running_mean * scale
    buf = torch.empty(n * length * c2 + _PAD)  # 8 readable floats past the last value row
    torch.addmm(b, xs.reshape(n * length, cin), w.t(), out=buf[: n * length * c2].view(n * length, c2))
    bs = layer.bn_similarity
    scales = (bs.weight * torch.rsqrt(bs.running_var + bs.eps)).view(3, heads)
    step = layer.stride if layer.stride > 1 and layer.stride_mode == "subsample" else 1
    lq = len(range(0, length, step))
    bo = layer.bn_output
    oscale = bo.weight * torch.rsqrt(bo.running_var + bo.eps)
    oshift = (bo.bias - bo.running_mean * oscale).view(heads * dv, 2)
    oscale = oscale.view(heads * dv, 2)
    alpha_v = oscale[:, 0].contiguous()
    alpha_r = oscale[:, 1].contiguous() if layer.use_value_rpe else None
    beta = (oshift[:, 0] + oshift[:, 1] if layer.use_value_rpe else oshift[:, 0]).contiguous()
    c = heads * dv
    out = torch.empty(n, lq, c)
    if not _run(layer, buf, n, length, scales, step, out, (lq * c, dv, c), alpha=(alpha_v, alpha_r, beta)):
        return None
    if layer.axis == "height":
        y = out.view(batch, other, lq, c).permute(0, 3, 2, 1)
    else:
        y = out.view(batch, other, lq, c).permute(0, 3, 1, 2)
    if step == 1 and layer.stride > 1:
        from .reference import apply_stride

        y = apply_stride(y, layer)
    return y


def attention_backward(layer, qkv: torch.Tensor, scales: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                       g_sv: torch.Tensor, g_sve: Optional[torch.Tensor]):
    """Backward of :func:`attend_eval` (query step 1) by recomputation, one thread per share
    of the sequence-heads. qkv (nh, 2dk+dv, L); lse, delta (nh, L) with delta_o = sum_c
    g_sv*sv + g_sve*sve; g_sv, g_sve (nh, dv, L). Returns (g_qkv, g_scales (3, heads),
    g_query_table, g_key_table, g_value_table) or None when the kernel cannot take it."""
    if not _supported(layer, qkv):
        return None
    lib = _library()
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    with torch.no_grad():
        qkv = qkv.contiguous()
        nh, c2h, length = qkv.shape
        jp = 2 * length - 1 + _PAD
        rqe, rke, _ = _tables(layer, length)
        rvT = None
        d = layer.max_relative_distance
        offsets = torch.arange(-(length - 1), length).clamp(-d, d) + d
        if layer.use_value_rpe:
            rvT = F.pad(layer.value_table.detach().float()[:, offsets], (0, _PAD)).contiguous()
        g_sv = g_sv.contiguous()
        g_sve = g_sve.contiguous() if layer.use_value_rpe else None
        scale = scales.detach().float().contiguous()
        lse, delta = lse.contiguous(), delta.contiguous()
        g_qkv = torch.empty_like(qkv)
        args = _BackArgs(length, _radius(layer), dk, dv, heads,
                         qkv.data_ptr(), heads * c2h * length, c2h * length, length, 1,
                         scale.data_ptr(), int(layer.use_qk), int(layer.use_query_rpe), int(layer.use_key_rpe),
                         int(layer.use_value_rpe), _ptr(rqe), _ptr(rke), jp, _ptr(rvT), lse.data_ptr(),
                         delta.data_ptr(), g_sv.data_ptr(), _ptr(g_sve), dv * length, length, 1, g_qkv.data_ptr())
        workers = max(1, min(torch.get_num_threads(), nh))
        fn = lib.axial_attention_backward_f32
        scratch_size = (2 * dk + 2 * dv + 5) * (length + _PAD)
        buffers = [(torch.zeros(dk, jp), torch.zeros(dk, jp), torch.zeros(dv, jp), torch.zeros(3, heads))
                   for _ in range(workers)]

        def share(i):
            g_rq, g_rk, g_rv, g_s = buffers[i]
            scratch = torch.empty(scratch_size)
            return fn(ctypes.byref(args), nh * i // workers, nh * (i + 1) // workers, scratch.data_ptr(),
                      g_rq.data_ptr(), g_rk.data_ptr(), g_rv.data_ptr(), g_s.data_ptr())

        status = [share(0)] if workers == 1 else list(_pool(workers).map(share, range(workers)))
        if any(status):
            return None
        g_rqe = sum(b[0] for b in buffers)[:, : 2 * length - 1]
        g_rke = sum(b[1] for b in buffers)[:, : 2 * length - 1]
        g_rvT = sum(b[2] for b in buffers)[:, : 2 * length - 1]
        g_scales = sum(b[3] for b in buffers)
        rows = layer.table_rows
        g_rq = torch.zeros(dk, rows).index_add_(1, offsets, g_rqe) if layer.use_query_rpe else None
        g_rk = torch.zeros(dk, rows).index_add_(1, offsets, g_rke) if layer.use_key_rpe else None
        g_rv = torch.zeros(dv, rows).index_add_(1, offsets, g_rvT) if layer.use_value_rpe else None
    return g_qkv, g_scales, g_rq, g_rk, g_rv
