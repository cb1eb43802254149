/*
 * The innermost loops of cybn's kernels, in C because two things cannot be
 * said in Cython:
 *
 *  - A floating-point sum only vectorizes if the compiler may reorder it.
 *    Instead of letting it reorder freely (which would make the result depend
 *    on the instruction set), each sum keeps CYBN_LANES independent partial
 *    sums, lane j taking elements j, j + LANES, ...; the lanes are merged in
 *    index order.  The result is the same scalar or SIMD, on any machine.
 *  - An element-wise loop whose output may be its input (out=x, out=dy) is
 *    still safe to vectorize: `#pragma omp simd` says so.
 *
 * Every function is defined once, as a macro over the element type, and
 * instantiated for float and double at the bottom.  Sums are always double.
 * Inputs are read with arbitrary row strides (in elements); within a row the
 * values are contiguous.
 */
#ifndef CYBN_LOOPS_H
#define CYBN_LOOPS_H

#include <Python.h> /* Py_ssize_t */

#ifdef _OPENMP
#include <omp.h>
static inline int cybn_max_threads(void) { return omp_get_max_threads(); }
#else
static inline int cybn_max_threads(void) { return 1; }
#endif

#define CYBN_LANES 16 /* independent partial sums: hides add latency at 2 x AVX-512 */
#define CYBN_BLOCK 64 /* channels per task in the channels-contiguous ("rows") kernels */

#define CYBN_PRAGMA(text) _Pragma(#text)

#define CYBN_DEFINE_LOOPS(T, SUFFIX)                                                  \
                                                                                      \
/* *sum += sum(x - shift); *sumsq += sum((x - shift)^2) over n contiguous values. */ \
static inline void cybn_shifted_sums_##SUFFIX(const T *x, Py_ssize_t n, double shift, \
                                              double *sum, double *sumsq)             \
{                                                                                     \
    double s[CYBN_LANES] = {0}, q[CYBN_LANES] = {0};                                  \
    double ts = 0.0, tq = 0.0;                                                        \
    Py_ssize_t i = 0;                                                                 \
    for (; i + CYBN_LANES <= n; i += CYBN_LANES)                                      \
        for (int j = 0; j < CYBN_LANES; j++) {                                        \
            double d = (double)x[i + j] - shift;                                      \
            s[j] += d;                                                                \
            q[j] += d * d;                                                            \
        }                                                                             \
    for (int j = 0; j < CYBN_LANES; j++) {                                            \
        ts += s[j];                                                                   \
        tq += q[j];                                                                   \
    }                                                                                 \
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
static inline void cybn_grad_sums_##SUFFIX(const T *dy, const T *x, Py_ssize_t n,     \
                                           double mean, double *sum_dy,               \
                                           double *sum_dy_xmu)                        \
{                                                                                     \
    double s[CYBN_LANES] = {0}, p[CYBN_LANES] = {0};                                  \
    double ts = 0.0, tp = 0.0;                                                        \
    Py_ssize_t i = 0;                                                                 \
    for (; i + CYBN_LANES <= n; i += CYBN_LANES)                                      \
        for (int j = 0; j < CYBN_LANES; j++) {                                        \
            double g = (double)dy[i + j];                                             \
            s[j] += g;                                                                \
            p[j] += g * ((double)x[i + j] - mean);                                    \
        }                                                                             \
    for (int j = 0; j < CYBN_LANES; j++) {                                            \
        ts += s[j];                                                                   \
        tp += p[j];                                                                   \
    }                                                                                 \
    for (; i < n; i++) {                                                              \
        double g = (double)dy[i];                                                     \
        ts += g;                                                                      \
        tp += g * ((double)x[i] - mean);                                              \
    }                                                                                 \
    *sum_dy += ts;                                                                    \
    *sum_dy_xmu += tp;                                                                \
}                                                                                     \
                                                                                      \
/* y = (x - mean) * scale + shift; y may be x. */                                     \
static inline void cybn_affine_##SUFFIX(const T *x, T *y, Py_ssize_t n, double mean,  \
                                        double scale, double shift)                   \
{                                                                                     \
    CYBN_PRAGMA(omp simd)                                                             \
    for (Py_ssize_t i = 0; i < n; i++)                                                \
        y[i] = (T)(((double)x[i] - mean) * scale + shift);                            \
}                                                                                     \
                                                                                      \
/* dx = ((dy - dy_shift) - (x - mean) * x_coef) * scale; dx may be dy or x. */        \
static inline void cybn_grad_input_##SUFFIX(const T *dy, const T *x, T *dx,           \
                                            Py_ssize_t n, double mean,                \
                                            double dy_shift, double x_coef,           \
                                            double scale)                             \
{                                                                                     \
    CYBN_PRAGMA(omp simd)                                                             \
    for (Py_ssize_t i = 0; i < n; i++)                                                \
        dx[i] = (T)((((double)dy[i] - dy_shift) - ((double)x[i] - mean) * x_coef)     \
                    * scale);                                                         \
}                                                                                     \
                                                                                      \
/* The "rows" layout: n_rows rows of `width` channels, contiguous within a row.      \
 * Sums run down the rows, one accumulator per channel, so they vectorize across     \
 * channels with no reordering. width <= CYBN_BLOCK. */                               \
static inline void cybn_rows_shifted_sums_##SUFFIX(const T *x, Py_ssize_t n_rows,     \
                                                   Py_ssize_t row_stride,             \
                                                   Py_ssize_t width,                  \
                                                   const double *shift, double *sum,  \
                                                   double *sumsq)                     \
{                                                                                     \
    double s[CYBN_BLOCK] = {0}, q[CYBN_BLOCK] = {0}, k[CYBN_BLOCK];                   \
    for (Py_ssize_t j = 0; j < width; j++)                                            \
        k[j] = shift[j];                                                              \
    for (Py_ssize_t r = 0; r < n_rows; r++) {                                         \
        const T *row = x + r * row_stride;                                            \
        CYBN_PRAGMA(omp simd)                                                         \
        for (Py_ssize_t j = 0; j < width; j++) {                                      \
            double d = (double)row[j] - k[j];                                         \
            s[j] += d;                                                                \
            q[j] += d * d;                                                            \
        }                                                                             \
    }                                                                                 \
    for (Py_ssize_t j = 0; j < width; j++) {                                          \
        sum[j] += s[j];                                                               \
        sumsq[j] += q[j];                                                             \
    }                                                                                 \
}                                                                                     \
                                                                                      \
static inline void cybn_rows_grad_sums_##SUFFIX(const T *dy, Py_ssize_t dy_stride,    \
                                                const T *x, Py_ssize_t x_stride,      \
                                                Py_ssize_t n_rows, Py_ssize_t width,  \
                                                const double *mean, double *sum_dy,   \
                                                double *sum_dy_xmu)                   \
{                                                                                     \
    double s[CYBN_BLOCK] = {0}, p[CYBN_BLOCK] = {0}, mu[CYBN_BLOCK];                  \
    for (Py_ssize_t j = 0; j < width; j++)                                            \
        mu[j] = mean[j];                                                              \
    for (Py_ssize_t r = 0; r < n_rows; r++) {                                         \
        const T *g = dy + r * dy_stride, *v = x + r * x_stride;                       \
        CYBN_PRAGMA(omp simd)                                                         \
        for (Py_ssize_t j = 0; j < width; j++) {                                      \
            s[j] += (double)g[j];                                                     \
            p[j] += (double)g[j] * ((double)v[j] - mu[j]);                            \
        }                                                                             \
    }                                                                                 \
    for (Py_ssize_t j = 0; j < width; j++) {                                          \
        sum_dy[j] += s[j];                                                            \
        sum_dy_xmu[j] += p[j];                                                        \
    }                                                                                 \
}                                                                                     \
                                                                                      \
static inline void cybn_rows_affine_##SUFFIX(const T *x, Py_ssize_t x_stride, T *y,   \
                                             Py_ssize_t y_stride, Py_ssize_t n_rows,  \
                                             Py_ssize_t width, const double *mean,    \
                                             const double *scale,                     \
                                             const double *shift)                     \
{                                                                                     \
    for (Py_ssize_t r = 0; r < n_rows; r++) {                                         \
        const T *v = x + r * x_stride;                                                \
        T *out = y + r * y_stride;                                                    \
        CYBN_PRAGMA(omp simd)                                                         \
        for (Py_ssize_t j = 0; j < width; j++)                                        \
            out[j] = (T)(((double)v[j] - mean[j]) * scale[j] + shift[j]);             \
    }                                                                                 \
}                                                                                     \
                                                                                      \
static inline void cybn_rows_grad_input_##SUFFIX(                                     \
    const T *dy, Py_ssize_t dy_stride, const T *x, Py_ssize_t x_stride, T *dx,        \
    Py_ssize_t dx_stride, Py_ssize_t n_rows, Py_ssize_t width, const double *mean,    \
    const double *dy_shift, const double *x_coef, const double *scale)                \
{                                                                                     \
    for (Py_ssize_t r = 0; r < n_rows; r++) {                                         \
        const T *g = dy + r * dy_stride, *v = x + r * x_stride;                       \
        T *out = dx + r * dx_stride;                                                  \
        CYBN_PRAGMA(omp simd)                                                         \
        for (Py_ssize_t j = 0; j < width; j++)                                        \
            out[j] = (T)((((double)g[j] - dy_shift[j])                                \
                          - ((double)v[j] - mean[j]) * x_coef[j]) * scale[j]);        \
    }                                                                                 \
}

CYBN_DEFINE_LOOPS(float, f32)
CYBN_DEFINE_LOOPS(double, f64)

#endif /* CYBN_LOOPS_H */
