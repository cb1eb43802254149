/*
 * The loops of cybn's kernels, in C for four things Cython cannot say:
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
 *  - Outputs too big to stay in the cache go out by streaming stores.
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
#include <math.h>   /* sqrt */
#include <string.h> /* memcpy */

#ifdef _OPENMP
#include <omp.h>
static inline int cybn_max_threads(void) { return omp_get_max_threads(); }
#else
static inline int cybn_max_threads(void) { return 1; }
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__) && !defined(CYBN_NATIVE)
#define CYBN_DISPATCH \
    __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define CYBN_DISPATCH
#endif

#define CYBN_INLINE static inline __attribute__((always_inline))

#define CYBN_PRAGMA(text) _Pragma(#text)

/* The float32 passes compute in double and round once to float; the
 * conversions to and from double take most of their time.  Where the machine
 * has fused multiply-add, the planar float32 passes do each multiply-add as
 * one fma: one rounding fewer in double, and one operation fewer in passes
 * bound by the conversions (measurements: docs/design.md).  Without it, fma()
 * would be a library call per value, so those machines keep the unfused
 * form, and their float32 results may differ in the last bit in rare cases.
 * (The rows passes measured no gain and stay unfused, as do float64 ones,
 * which are bound by memory: their results are the same on every machine.)
 * Set once at import (see _set_fused_form in _kernels.pyx). */
static int cybn_fused = 0;

static void cybn_detect_fma(void)
{
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    cybn_fused = __builtin_cpu_supports("fma") != 0;
#elif defined(FP_FAST_FMA)
    cybn_fused = 1;
#endif
}

/* What the CPU offers of the instruction sets the clones use, for
 * cybn.show_config(): bit 0 AVX2, bit 1 FMA, bit 2 AVX-512F. */
static int cybn_cpu_features(void)
{
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    return (__builtin_cpu_supports("avx2") != 0) | (__builtin_cpu_supports("fma") != 0) << 1
           | (__builtin_cpu_supports("avx512f") != 0) << 2;
#else
    return 0;
#endif
}

/* The build's options, for cybn.show_config(): bit 0 OpenMP, bit 1 run-time
 * clones (else one instance for the compiler's target), bit 2 -march=native. */
static int cybn_build_options(void)
{
    int options = 0;
#ifdef _OPENMP
    options |= 1;
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__) && !defined(CYBN_NATIVE)
    options |= 2;
#endif
#ifdef CYBN_NATIVE
    options |= 4;
#endif
    return options;
}

/* Whether the fused dx (see grad_input_loop) is the unfused one but for
 * rounding, for every float g and x: its coefficients are finite, and so are
 * their products with any g or x - mean (below 2^130).  Not so where var + eps
 * is 0 (an infinite scale) or with huge weights: such channels keep the
 * unfused form. */
CYBN_INLINE int fusable(double coef, double shift)
{
    return isfinite(coef * 0x1p130) && isfinite(shift);
}

/* Non-temporal ("streaming") stores, for outputs that could not stay in the
 * cache anyway (the caller decides, see streamed in _kernels.pyx): a plain
 * store first reads the line it writes from memory and evicts cached inputs;
 * a streaming store does neither.  The element-wise loops compute whole cache
 * lines of values into a buffer, then stream them out with SSE2 stores (part
 * of x86-64, so every clone has them; the write-combining buffers merge them
 * into whole lines). */
#define CYBN_LINE 64
#if defined(__SSE2__)
#include <emmintrin.h>
CYBN_INLINE void stream_line(void *dst, const void *src) /* dst 16-byte aligned */
{
    for (int k = 0; k < CYBN_LINE / 16; k++)
        _mm_stream_si128((__m128i *)dst + k, _mm_loadu_si128((const __m128i *)src + k));
}
/* Streaming stores are weakly ordered: fence them before other threads read. */
CYBN_INLINE void stream_fence(void) { _mm_sfence(); }
#else
CYBN_INLINE void stream_line(void *dst, const void *src) { memcpy(dst, src, CYBN_LINE); }
CYBN_INLINE void stream_fence(void) {}
#endif

/* Values of itemsize bytes before p's first line boundary, at most len (all
 * of len if p is not itemsize-aligned: it is then written plainly). */
CYBN_INLINE Py_ssize_t line_head(const void *p, Py_ssize_t len, size_t itemsize)
{
    size_t offset = (size_t)p % CYBN_LINE;
    Py_ssize_t head;
    if ((size_t)p % itemsize)
        return len;
    head = (Py_ssize_t)(((CYBN_LINE - offset) % CYBN_LINE) / itemsize);
    return head < len ? head : len;
}

/* Compute a run of len values into out (and, for a second output, out2):
 * BODY computes values [I, I + N) into D (and D2).  Values before out's first
 * line boundary and after its last are computed in place; whole lines into a
 * buffer, CYBN_STREAM_LINES at a time (then one at a time; N is a constant
 * either way), which goes out by streaming stores (to out2 too where its
 * lines start where out's do, else by plain copies: streaming stores of parts
 * of two lines each are slow).  D2 is NULL when out2 is. */
#define CYBN_STREAM_LINES 8
#define CYBN_STREAMED(T, out, out2, len, I, N, D, D2, ...)                           \
    {                                                                                \
        enum { LINE_ = CYBN_LINE / sizeof(T), STEP_ = CYBN_STREAM_LINES * LINE_ };   \
        Py_ssize_t I = 0, N = line_head(out, len, sizeof(T));                        \
        T *D = (out), *D2 = (out2);                                                  \
        (void)D2;                                                                    \
        { __VA_ARGS__; }                                                             \
        for (I = N; I + STEP_ <= (len); I += STEP_)                                  \
            CYBN_STREAM_STEP(T, out, out2, I, STEP_, N, D, D2, __VA_ARGS__)          \
        for (; I + LINE_ <= (len); I += LINE_)                                       \
            CYBN_STREAM_STEP(T, out, out2, I, LINE_, N, D, D2, __VA_ARGS__)          \
        N = (len) - I;                                                               \
        D = (out) + I;                                                               \
        D2 = (out2) ? (out2) + I : (out2);                                           \
        { __VA_ARGS__; }                                                             \
    }
/* Whole lines [I, I + SIZE) of CYBN_STREAMED. */
#define CYBN_STREAM_STEP(T, out, out2, I, SIZE, N, D, D2, ...)                       \
    {                                                                                \
        T buffer_[SIZE] __attribute__((aligned(CYBN_LINE)));                         \
        T buffer2_[SIZE] __attribute__((aligned(CYBN_LINE)));                        \
        {                                                                            \
            const Py_ssize_t N = SIZE;                                               \
            T *D = buffer_, *D2 = buffer2_;                                          \
            (void)D2;                                                                \
            __VA_ARGS__;                                                             \
        }                                                                            \
        for (int k_ = 0; k_ < (SIZE); k_ += LINE_) {                                 \
            stream_line((out) + I + k_, buffer_ + k_);                               \
            if ((out2) && (size_t)((out2) + I) % CYBN_LINE == 0)                     \
                stream_line((out2) + I + k_, buffer2_ + k_);                         \
            else if (out2)                                                           \
                memcpy((out2) + I + k_, buffer2_ + k_, CYBN_LINE);                   \
        }                                                                            \
    }

/* Sums keep 16 partial sums in two 8-lane vectors (GCC vector extensions, so
 * the lanes exist whatever the instruction set: 1 AVX-512, 2 AVX2 or 4 SSE2
 * registers each), merged in a fixed order at the end. */
typedef double cybn_v8d __attribute__((vector_size(64)));
typedef long long cybn_v8l __attribute__((vector_size(64)));

/* Element by element, which GCC 12 turns into one vcvtps2pd from memory in
 * the AVX-512 clone; its __builtin_convertvector there took two 256-bit
 * conversions and a shuffle. */
CYBN_INLINE cybn_v8d load8_f32(const float *p)
{
    cybn_v8d v;
    for (int j = 0; j < 8; j++)
        v[j] = (double)p[j];
    return v;
}

CYBN_INLINE cybn_v8d load8_f64(const double *p)
{
    cybn_v8d v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* acc + a * b lane by lane, each as one fma where fused (GCC makes that one
 * vector fma). */
CYBN_INLINE cybn_v8d mul_add8(cybn_v8d a, cybn_v8d b, cybn_v8d acc, const int fused)
{
    if (!fused)
        return acc + a * b;
    for (int j = 0; j < 8; j++)
        acc[j] = fma(a[j], b[j], acc[j]);
    return acc;
}

CYBN_INLINE double lanes_total(const cybn_v8d *v) /* a pointer: no vector ABI */
{
    return (((*v)[0] + (*v)[1]) + ((*v)[2] + (*v)[3]))
           + (((*v)[4] + (*v)[5]) + ((*v)[6] + (*v)[7]));
}

/* Add to *a and *b the two sums a run-by-run loop kept: 16 lanes each in
 * a0|a1 and b0|b1, and the values past the last full 16 in ta and tb, in a
 * fixed order. */
CYBN_INLINE void add_sums(double *a, double *b, cybn_v8d a0, cybn_v8d a1, double ta,
                          cybn_v8d b0, cybn_v8d b1, double tb)
{
    a0 += a1;
    b0 += b1;
    *a += lanes_total(&a0) + ta;
    *b += lanes_total(&b0) + tb;
}

/* Ask for a run of bytes from p into the cache ahead of its use.  The
 * per-channel sums do it `ahead` runs early where the caller says so (short
 * runs): the runs of a channel are far apart, each too short for the hardware
 * prefetcher to pick up. */
CYBN_INLINE void prefetch_run(const void *p, Py_ssize_t bytes)
{
    for (Py_ssize_t o = 0; o < bytes; o += CYBN_LINE)
        __builtin_prefetch((const char *)p + o, 0, 3);
}

/* Rows layout: the sums take CYBN_ROWS_BLOCK rows per step, the element-wise
 * passes CYBN_WRITE_BLOCK, where the caller says so (see _kernels.pyx). */
#define CYBN_ROWS_BLOCK 8
#define CYBN_WRITE_BLOCK 4

/* CALL, with K_ (rows per step) and the flags A_ and B_ as compile-time
 * constants, for k = CYBN_WRITE_BLOCK or 1 and each value of the flags a, b. */
#define CYBN_ROWS_CASES(k, a, b, CALL)                                               \
    if ((k) == CYBN_WRITE_BLOCK) {                                                   \
        enum { K_ = CYBN_WRITE_BLOCK };                                              \
        CYBN_FLAG_CASES(a, b, CALL)                                                  \
    } else {                                                                         \
        enum { K_ = 1 };                                                             \
        CYBN_FLAG_CASES(a, b, CALL)                                                  \
    }
#define CYBN_FLAG_CASES(a, b, CALL)                                                  \
    if ((a) && (b)) { enum { A_ = 1, B_ = 1 }; CALL; }                               \
    else if (a) { enum { A_ = 1, B_ = 0 }; CALL; }                                   \
    else if (b) { enum { A_ = 0, B_ = 1 }; CALL; }                                   \
    else { enum { A_ = 0, B_ = 0 }; CALL; }

/* CALL with F_ a compile-time constant: 1 where the float32 passes use fused
 * multiply-adds (see cybn_fused), 0 elsewhere. */
#define CYBN_FUSED_CASES(T, CALL)                                                    \
    if (sizeof(T) == sizeof(float) && cybn_fused) { enum { F_ = 1 }; CALL; }         \
    else { enum { F_ = 0 }; CALL; }

/* Walk the flat indices [begin, end) of a planar channel run by run: each
 * piece is run N, from position S, LEN values long.  One division in all. */
#define CYBN_FOR_RUNS(begin, end, n_spatial, N, S, LEN, ...)                         \
    {                                                                                \
        Py_ssize_t N = (begin) / (n_spatial), S = (begin) - N * (n_spatial);         \
        for (Py_ssize_t left_ = (end) - (begin); left_ > 0; N++, S = 0) {            \
            Py_ssize_t LEN = (n_spatial) - S < left_ ? (n_spatial) - S : left_;      \
            __VA_ARGS__;                                                             \
            left_ -= LEN;                                                            \
        }                                                                            \
    }

/* A planar operand for the memory-order functions: strides in elements; data
 * is NULL for an absent optional operand. */
typedef struct {
    char *data;
    Py_ssize_t batch_stride;
    Py_ssize_t channel_stride;
} cybn_planar;

/* Walk the runs [run_begin, run_end) of a planar array in memory order: run
 * t is that of batch N = t / n_channels and channel C = t % n_channels. */
#define CYBN_FOR_RUNS_IN_ORDER(run_begin, run_end, n_channels, N, C, ...)            \
    {                                                                                \
        Py_ssize_t N = (run_begin) / (n_channels), C = (run_begin) - N * (n_channels); \
        for (Py_ssize_t t_ = (run_begin); t_ < (run_end); t_++) {                    \
            __VA_ARGS__;                                                             \
            if (++C == (n_channels)) {                                               \
                C = 0;                                                               \
                N++;                                                                 \
            }                                                                        \
        }                                                                            \
    }

#define CYBN_AT(T, v, n, c) ((T *)(v).data + (n) * (v).batch_stride + (c) * (v).channel_stride)

/* The loops of each element type, written once in _loops_impl.h. */
#define T float
#define SUFFIX f32
#include "_loops_impl.h"
#undef T
#undef SUFFIX
#define T double
#define SUFFIX f64
#include "_loops_impl.h"
#undef T
#undef SUFFIX

/* Per-channel scalars, vectorized by the clones (sqrt and division are
 * exact IEEE operations in every one, so all give the same bits). */

/* *var: M2 in, the biased variance out; returns 1/sqrt(var + eps). */
CYBN_INLINE double cybn_batch_invstd(double *var, Py_ssize_t count, double eps)
{
    *var = *var / (double)count;
    return 1.0 / sqrt(*var + eps);
}

/* cybn_batch_invstd of every channel, and scale = weight * invstd. */
static CYBN_DISPATCH void cybn_batch_scales(Py_ssize_t n, Py_ssize_t count, double eps,
                                            const double *restrict weight,
                                            double *restrict var, double *restrict invstd,
                                            double *restrict scale)
{
    CYBN_PRAGMA(omp simd)
    for (Py_ssize_t c = 0; c < n; c++) {
        invstd[c] = cybn_batch_invstd(&var[c], count, eps);
        scale[c] = weight[c] * invstd[c];
    }
}

/* The coefficients of dx = ((g - dy_shift) - (x - mean) * x_coef) * scale per
 * channel, from the gradient sums over count values:
 * dx = w*invstd*(dy - dbias/m - xhat*dweight/m), so that in training
 * dy_shift = sum_dy/m and x_coef = invstd^2 * sum_dy_xmu/m (0 otherwise), and
 * scale = weight * invstd. */
static CYBN_DISPATCH void cybn_grad_coefficients(
    Py_ssize_t n, Py_ssize_t count, int training, const double *restrict sum_dy,
    const double *restrict sum_dy_xmu, const double *restrict invstd,
    const double *restrict weight, double *restrict dy_shift, double *restrict x_coef,
    double *restrict scale)
{
    const double m = (double)count;
    CYBN_PRAGMA(omp simd)
    for (Py_ssize_t c = 0; c < n; c++) {
        dy_shift[c] = training ? sum_dy[c] / m : 0.0;
        x_coef[c] = training ? invstd[c] * invstd[c] * sum_dy_xmu[c] / m : 0.0;
        scale[c] = weight[c] * invstd[c];
    }
}

/* a[c] <- a[c] / sqrt(v[c] + eps): the scales of evaluation. */
static CYBN_DISPATCH void cybn_divide_by_sqrt(double *restrict a, const double *restrict v,
                                              double eps, Py_ssize_t n)
{
    CYBN_PRAGMA(omp simd)
    for (Py_ssize_t c = 0; c < n; c++)
        a[c] = a[c] / sqrt(v[c] + eps);
}

#endif /* CYBN_LOOPS_H */
