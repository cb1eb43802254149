/*
 * The loops of cybn's kernels, in C for three things Cython cannot say:
 *
 *  - A floating-point sum only vectorizes if the compiler may reorder it.
 *    Instead of letting it reorder freely (which would make the result depend
 *    on the instruction set), each sum keeps 16 explicit partial sums, lane j
 *    taking elements j, j + 16, ...; the lanes are merged in a fixed order.
 *    The result is the same on any machine and instruction set.
 *  - An element-wise loop whose output may be its input (out=x, out=dy) is
 *    still safe to vectorize: `#pragma omp simd` says so.
 *  - One binary runs well on any x86-64: the task-level functions are cloned
 *    for AVX2 and AVX-512 and the best clone is picked at load time
 *    (GCC's target_clones).  A native build (CYBN_NATIVE=1) does without.
 *
 * Two layouts (see _kernels.pyx): "planar", where a channel is runs of
 * n_spatial contiguous values batch_stride elements apart and a task covers
 * the flat indices [begin, end) of one channel; and "rows", where a task is a
 * range of rows of n_channels contiguous values, row_stride apart, and sums
 * go to per-channel arrays.  Each function is written once as a macro over
 * the element type T and instantiated for float and double at the bottom.
 * Sums are always double, and accumulate into what the caller passes.
 */
#ifndef CYBN_LOOPS_H
#define CYBN_LOOPS_H

#include <Python.h> /* Py_ssize_t */
#include <string.h> /* memcpy */

#ifdef _OPENMP
#include <omp.h>
static inline int cybn_max_threads(void) { return omp_get_max_threads(); }
#else
static inline int cybn_max_threads(void) { return 1; }
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__) && !defined(CYBN_NATIVE)
#define CYBN_DISPATCH __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define CYBN_DISPATCH
#endif

#define CYBN_INLINE static inline __attribute__((always_inline))
#define CYBN_PRAGMA(text) _Pragma(#text)

/* Sums keep 16 partial sums in two 8-lane vectors (GCC vector extensions, so
 * the lanes exist whatever the instruction set: 1 AVX-512, 2 AVX2 or 4 SSE2
 * registers each), merged in a fixed order at the end. */
typedef double cybn_v8d __attribute__((vector_size(64)));
typedef float cybn_v8f __attribute__((vector_size(32)));

CYBN_INLINE cybn_v8d load8_f32(const float *p)
{
    cybn_v8f v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return __builtin_convertvector(v, cybn_v8d);
}

CYBN_INLINE cybn_v8d load8_f64(const double *p)
{
    cybn_v8d v;
    memcpy(&v, p, sizeof v);
    return v;
}

CYBN_INLINE double lanes_total(const cybn_v8d *v) /* a pointer: no vector ABI */
{
    return (((*v)[0] + (*v)[1]) + ((*v)[2] + (*v)[3]))
           + (((*v)[4] + (*v)[5]) + ((*v)[6] + (*v)[7]));
}

/* Walk the flat indices [begin, end) of a planar channel run by run: each
 * piece is run N, from position S, LEN values long. */
#define CYBN_FOR_RUNS(begin, end, n_spatial, N, S, LEN, ...)                         \
    for (Py_ssize_t i_ = (begin); i_ < (end);) {                                     \
        Py_ssize_t N = i_ / (n_spatial), S = i_ - N * (n_spatial);                   \
        Py_ssize_t LEN = (n_spatial) - S < (end) - i_ ? (n_spatial) - S : (end) - i_; \
        __VA_ARGS__;                                                                 \
        i_ += LEN;                                                                   \
    }

#define CYBN_DEFINE_LOOPS(T, SUFFIX)                                                  \
                                                                                      \
/* *sum += sum(x - shift); *sumsq += sum((x - shift)^2) over n contiguous values. */ \
CYBN_INLINE void shifted_sums_##SUFFIX(const T *x, Py_ssize_t n, double shift,        \
                                       double *sum, double *sumsq)                    \
{                                                                                     \
    cybn_v8d s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};                                  \
    Py_ssize_t i = 0;                                                                 \
    for (; i + 16 <= n; i += 16) {                                                    \
        cybn_v8d d0 = load8_##SUFFIX(x + i) - shift;                                  \
        cybn_v8d d1 = load8_##SUFFIX(x + i + 8) - shift;                              \
        s0 += d0;                                                                     \
        s1 += d1;                                                                     \
        q0 += d0 * d0;                                                                \
        q1 += d1 * d1;                                                                \
    }                                                                                 \
    s0 += s1;                                                                         \
    q0 += q1;                                                                         \
    double ts = lanes_total(&s0), tq = lanes_total(&q0);                              \
    for (; i < n; i++) {                                                              \
        double d = (double)x[i] - shift;                                              \
        ts += d;                                                                      \
        tq += d * d;                                                                  \
    }                                                                                 \
    *sum += ts;                                                                       \
    *sumsq += tq;                                                                     \
}                                                                                     \
                                                                                      \
/* *sum_dy += sum(dy); *sum_dy_xmu += sum(dy * (x - mean)) over n values. */          \
CYBN_INLINE void grad_sums_##SUFFIX(const T *dy, const T *x, Py_ssize_t n,            \
                                    double mean, double *sum_dy, double *sum_dy_xmu)  \
{                                                                                     \
    cybn_v8d s0 = {0}, s1 = {0}, p0 = {0}, p1 = {0};                                  \
    Py_ssize_t i = 0;                                                                 \
    for (; i + 16 <= n; i += 16) {                                                    \
        cybn_v8d g0 = load8_##SUFFIX(dy + i), g1 = load8_##SUFFIX(dy + i + 8);        \
        s0 += g0;                                                                     \
        s1 += g1;                                                                     \
        p0 += g0 * (load8_##SUFFIX(x + i) - mean);                                    \
        p1 += g1 * (load8_##SUFFIX(x + i + 8) - mean);                                \
    }                                                                                 \
    s0 += s1;                                                                         \
    p0 += p1;                                                                         \
    double ts = lanes_total(&s0), tp = lanes_total(&p0);                              \
    for (; i < n; i++) {                                                              \
        double g = (double)dy[i];                                                     \
        ts += g;                                                                      \
        tp += g * ((double)x[i] - mean);                                              \
    }                                                                                 \
    *sum_dy += ts;                                                                    \
    *sum_dy_xmu += tp;                                                                \
}                                                                                     \
                                                                                      \
/* ---- planar: one channel's flat indices [begin, end) ---- */                       \
                                                                                      \
static CYBN_DISPATCH void cybn_planar_sums_##SUFFIX(                                  \
    const T *x, Py_ssize_t batch_stride, Py_ssize_t n_spatial, Py_ssize_t begin,      \
    Py_ssize_t end, double shift, double *sum, double *sumsq)                         \
{                                                                                     \
    CYBN_FOR_RUNS(begin, end, n_spatial, n, s, len,                                   \
                  shifted_sums_##SUFFIX(x + n * batch_stride + s, len, shift, sum, sumsq)) \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_planar_grad_sums_##SUFFIX(                             \
    const T *dy, Py_ssize_t dy_stride, const T *x, Py_ssize_t x_stride,               \
    Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end, double mean,              \
    double *sum_dy, double *sum_dy_xmu)                                               \
{                                                                                     \
    CYBN_FOR_RUNS(begin, end, n_spatial, n, s, len,                                   \
                  grad_sums_##SUFFIX(dy + n * dy_stride + s, x + n * x_stride + s, len,  \
                                     mean, sum_dy, sum_dy_xmu))                       \
}                                                                                     \
                                                                                      \
/* y = (x - mean) * scale + shift; y may be x. */                                     \
static CYBN_DISPATCH void cybn_planar_affine_##SUFFIX(                                \
    const T *x, Py_ssize_t x_stride, T *y, Py_ssize_t y_stride, Py_ssize_t n_spatial, \
    Py_ssize_t begin, Py_ssize_t end, double mean, double scale, double shift)        \
{                                                                                     \
    CYBN_FOR_RUNS(begin, end, n_spatial, n, s, len, {                                 \
        const T *in = x + n * x_stride + s;                                           \
        T *out = y + n * y_stride + s;                                                \
        CYBN_PRAGMA(omp simd)                                                         \
        for (Py_ssize_t i = 0; i < len; i++)                                          \
            out[i] = (T)(((double)in[i] - mean) * scale + shift);                     \
    })                                                                                \
}                                                                                     \
                                                                                      \
/* dx = ((dy - dy_shift) - (x - mean) * x_coef) * scale; dx may be dy or x. */        \
static CYBN_DISPATCH void cybn_planar_grad_input_##SUFFIX(                            \
    const T *dy, Py_ssize_t dy_stride, const T *x, Py_ssize_t x_stride, T *dx,        \
    Py_ssize_t dx_stride, Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,     \
    double mean, double dy_shift, double x_coef, double scale)                        \
{                                                                                     \
    CYBN_FOR_RUNS(begin, end, n_spatial, n, s, len, {                                 \
        const T *g = dy + n * dy_stride + s, *v = x + n * x_stride + s;               \
        T *out = dx + n * dx_stride + s;                                              \
        CYBN_PRAGMA(omp simd)                                                         \
        for (Py_ssize_t i = 0; i < len; i++)                                          \
            out[i] = (T)((((double)g[i] - dy_shift) - ((double)v[i] - mean) * x_coef) \
                         * scale);                                                    \
    })                                                                                \
}                                                                                     \
                                                                                      \
/* ---- rows: rows [begin, end) of n_channels contiguous values; one              \
 * accumulator per channel, so sums vectorize across channels unreordered ---- */     \
                                                                                      \
static CYBN_DISPATCH void cybn_rows_sums_##SUFFIX(                                    \
    const T *x, Py_ssize_t row_stride, Py_ssize_t n_channels, Py_ssize_t begin,       \
    Py_ssize_t end, const double *restrict shift, double *restrict sum,               \
    double *restrict sumsq)                                                           \
{                                                                                     \
    for (Py_ssize_t r = begin; r < end; r++) {                                        \
        const T *restrict row = x + r * row_stride;                                   \
        CYBN_PRAGMA(omp simd)                                                         \
        for (Py_ssize_t c = 0; c < n_channels; c++) {                                 \
            double d = (double)row[c] - shift[c];                                     \
            sum[c] += d;                                                              \
            sumsq[c] += d * d;                                                        \
        }                                                                             \
    }                                                                                 \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_rows_grad_sums_##SUFFIX(                               \
    const T *dy, Py_ssize_t dy_stride, const T *x, Py_ssize_t x_stride,               \
    Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end,                          \
    const double *restrict mean, double *restrict sum_dy,                             \
    double *restrict sum_dy_xmu)                                                      \
{                                                                                     \
    for (Py_ssize_t r = begin; r < end; r++) {                                        \
        const T *restrict g = dy + r * dy_stride, *restrict v = x + r * x_stride;     \
        CYBN_PRAGMA(omp simd)                                                         \
        for (Py_ssize_t c = 0; c < n_channels; c++) {                                 \
            sum_dy[c] += (double)g[c];                                                \
            sum_dy_xmu[c] += (double)g[c] * ((double)v[c] - mean[c]);                 \
        }                                                                             \
    }                                                                                 \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_rows_affine_##SUFFIX(                                  \
    const T *x, Py_ssize_t x_stride, T *y, Py_ssize_t y_stride, Py_ssize_t n_channels,\
    Py_ssize_t begin, Py_ssize_t end, const double *mean, const double *scale,        \
    const double *shift)                                                              \
{                                                                                     \
    for (Py_ssize_t r = begin; r < end; r++) {                                        \
        const T *in = x + r * x_stride;                                               \
        T *out = y + r * y_stride;                                                    \
        CYBN_PRAGMA(omp simd)                                                         \
        for (Py_ssize_t c = 0; c < n_channels; c++)                                   \
            out[c] = (T)(((double)in[c] - mean[c]) * scale[c] + shift[c]);            \
    }                                                                                 \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_rows_grad_input_##SUFFIX(                              \
    const T *dy, Py_ssize_t dy_stride, const T *x, Py_ssize_t x_stride, T *dx,        \
    Py_ssize_t dx_stride, Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end,    \
    const double *mean, const double *dy_shift, const double *x_coef,                 \
    const double *scale)                                                              \
{                                                                                     \
    for (Py_ssize_t r = begin; r < end; r++) {                                        \
        const T *g = dy + r * dy_stride, *v = x + r * x_stride;                       \
        T *out = dx + r * dx_stride;                                                  \
        CYBN_PRAGMA(omp simd)                                                         \
        for (Py_ssize_t c = 0; c < n_channels; c++)                                   \
            out[c] = (T)((((double)g[c] - dy_shift[c]) - ((double)v[c] - mean[c])     \
                          * x_coef[c]) * scale[c]);                                   \
    }                                                                                 \
}

CYBN_DEFINE_LOOPS(float, f32)
CYBN_DEFINE_LOOPS(double, f64)

#endif /* CYBN_LOOPS_H */
