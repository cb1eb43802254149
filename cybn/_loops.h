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
 * one fma: one rounding fewer in double, and on Zen 4 at cached ResNet-50
 * shapes 1.14-1.21x on evaluation and the backward's dx pass, then 1.06-1.11x
 * on training and 1.02-1.06x on the backward from the sums.  Without it, fma()
 * would be a library call per value, so those machines keep the unfused
 * form, and their float32 results may differ in the last bit in rare cases.
 * (The rows passes measured no gain and stay unfused, as do float64 ones,
 * which are bound by memory: their results are the same on every machine.)
 * Set once at import by cybn_detect_fma. */
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
 * of two lines each made the backward with grad_residual 1.5x slower).  D2 is
 * NULL when out2 is.  Eight lines per step measured 1.04-1.1x over one on a
 * 100 MB y = a*x + b. */
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
 * conversions and a shuffle, 1.5x the time (measured on Zen 4). */
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

#define CYBN_DEFINE_LOOPS(T, SUFFIX)                                                  \
                                                                                      \
/* Sums over one contiguous run, into accumulators that the caller carries   \
 * across runs (so short runs cost no reduction each): 16 lanes in s0|s1 and     \
 * q0|q1, and the values past the last full 16 in ts, tq. */                      \
CYBN_INLINE void shifted_sums_run_##SUFFIX(const T *x, Py_ssize_t n, double shift,    \
                                           cybn_v8d *s0, cybn_v8d *s1, cybn_v8d *q0,  \
                                           cybn_v8d *q1, double *ts, double *tq,      \
                                           const int fused)                           \
{                                                                                     \
    Py_ssize_t i = 0;                                                                 \
    for (; i + 16 <= n; i += 16) {                                                    \
        cybn_v8d d0 = load8_##SUFFIX(x + i) - shift;                                  \
        cybn_v8d d1 = load8_##SUFFIX(x + i + 8) - shift;                              \
        *s0 += d0;                                                                    \
        *s1 += d1;                                                                    \
        *q0 = mul_add8(d0, d0, *q0, fused);                                           \
        *q1 = mul_add8(d1, d1, *q1, fused);                                           \
    }                                                                                 \
    for (; i < n; i++) {                                                              \
        double d = (double)x[i] - shift;                                              \
        *ts += d;                                                                     \
        *tq = fused ? fma(d, d, *tq) : *tq + d * d;                                   \
    }                                                                                 \
}                                                                                     \
                                                                                      \
/* dy where y > 0 and 0 elsewhere, 8 values widened: a mask of bits (a       \
 * per-element choice compiled to a branch per value in the AVX-512 clone). */    \
CYBN_INLINE cybn_v8d masked8_##SUFFIX(const T *dy, const T *y)                        \
{                                                                                     \
    cybn_v8l keep = load8_##SUFFIX(y) > 0.0;                                          \
    return (cybn_v8d)((cybn_v8l)load8_##SUFFIX(dy) & keep);                           \
}                                                                                     \
                                                                                      \
/* The same for sum(g) and sum(g * (x - mean)), g = dy, or (masked) dy where     \
 * y > 0 and 0 elsewhere: the ReLU's backward. */                                  \
CYBN_INLINE void grad_sums_run_##SUFFIX(const T *dy, const T *y, const T *x,          \
                                        Py_ssize_t n, double mean, cybn_v8d *s0,      \
                                        cybn_v8d *s1, cybn_v8d *p0, cybn_v8d *p1,     \
                                        double *ts, double *tp, const int masked,     \
                                        const int fused)                              \
{                                                                                     \
    Py_ssize_t i = 0;                                                                 \
    for (; i + 16 <= n; i += 16) {                                                    \
        cybn_v8d g0, g1;                                                              \
        if (masked) {                                                                 \
            g0 = masked8_##SUFFIX(dy + i, y + i);                                     \
            g1 = masked8_##SUFFIX(dy + i + 8, y + i + 8);                             \
        } else {                                                                      \
            g0 = load8_##SUFFIX(dy + i);                                              \
            g1 = load8_##SUFFIX(dy + i + 8);                                          \
        }                                                                             \
        *s0 += g0;                                                                    \
        *s1 += g1;                                                                    \
        *p0 = mul_add8(g0, load8_##SUFFIX(x + i) - mean, *p0, fused);                 \
        *p1 = mul_add8(g1, load8_##SUFFIX(x + i + 8) - mean, *p1, fused);             \
    }                                                                                 \
    for (; i < n; i++) {                                                              \
        double g = masked && !(y[i] > 0) ? 0.0 : (double)dy[i];                       \
        *ts += g;                                                                     \
        double d = (double)x[i] - mean;                                               \
        *tp = fused ? fma(g, d, *tp) : *tp + g * d;                                   \
    }                                                                                 \
}                                                                                     \
                                                                                      \
/* ---- planar: one channel's flat indices [begin, end) ---- */                       \
                                                                                      \
/* *sum += sum(x - shift); *sumsq += sum((x - shift)^2).  Each run asks for the       \
 * one `ahead` runs later (0: none; see prefetch_run). */                             \
CYBN_INLINE void planar_sums_body_##SUFFIX(                                           \
    const T *x, Py_ssize_t batch_stride, Py_ssize_t n_spatial, Py_ssize_t begin,      \
    Py_ssize_t end, double shift, double *sum, double *sumsq, Py_ssize_t ahead,       \
    const int fused)                                                                  \
{                                                                                     \
    cybn_v8d s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};                                  \
    double ts = 0.0, tq = 0.0;                                                        \
    CYBN_FOR_RUNS(begin, end, n_spatial, n, s, len, {                                 \
        if (ahead && (n + ahead) * n_spatial < end)                                   \
            prefetch_run(x + (n + ahead) * batch_stride, n_spatial * sizeof(T));      \
        shifted_sums_run_##SUFFIX(x + n * batch_stride + s, len, shift, &s0, &s1, &q0,\
                                  &q1, &ts, &tq, fused);                              \
    })                                                                                \
    add_sums(sum, sumsq, s0, s1, ts, q0, q1, tq);                                     \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_planar_sums_##SUFFIX(                                  \
    const T *x, Py_ssize_t batch_stride, Py_ssize_t n_spatial, Py_ssize_t begin,      \
    Py_ssize_t end, double shift, double *sum, double *sumsq, Py_ssize_t ahead)       \
{                                                                                     \
    CYBN_FUSED_CASES(T, planar_sums_body_##SUFFIX(x, batch_stride, n_spatial, begin,  \
                                                  end, shift, sum, sumsq, ahead, F_));\
}                                                                                     \
                                                                                      \
/* *sum_dy += sum(g); *sum_dy_xmu += sum(g * (x - mean)); y, when not NULL,       \
 * masks dy (the ReLU's backward).  Prefetches as cybn_planar_sums.  */               \
CYBN_INLINE void planar_grad_sums_body_##SUFFIX(                                      \
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,   \
    Py_ssize_t x_stride, Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,      \
    double mean, double *sum_dy, double *sum_dy_xmu, Py_ssize_t ahead,                \
    const int fused)                                                                  \
{                                                                                     \
    cybn_v8d s0 = {0}, s1 = {0}, p0 = {0}, p1 = {0};                                  \
    double ts = 0.0, tp = 0.0;                                                        \
    CYBN_FOR_RUNS(begin, end, n_spatial, n, s, len, {                                 \
        const T *g = dy + n * dy_stride + s, *v = x + n * x_stride + s;               \
        if (ahead && (n + ahead) * n_spatial < end) {                                 \
            prefetch_run(dy + (n + ahead) * dy_stride, n_spatial * sizeof(T));        \
            prefetch_run(x + (n + ahead) * x_stride, n_spatial * sizeof(T));          \
            if (y)                                                                    \
                prefetch_run(y + (n + ahead) * y_stride, n_spatial * sizeof(T));      \
        }                                                                             \
        if (y)                                                                        \
            grad_sums_run_##SUFFIX(g, y + n * y_stride + s, v, len, mean, &s0, &s1,   \
                                   &p0, &p1, &ts, &tp, 1, fused);                     \
        else                                                                          \
            grad_sums_run_##SUFFIX(g, g, v, len, mean, &s0, &s1, &p0, &p1, &ts, &tp,  \
                                   0, fused);                                         \
    })                                                                                \
    add_sums(sum_dy, sum_dy_xmu, s0, s1, ts, p0, p1, tp);                             \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_planar_grad_sums_##SUFFIX(                             \
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,   \
    Py_ssize_t x_stride, Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,      \
    double mean, double *sum_dy, double *sum_dy_xmu, Py_ssize_t ahead)                \
{                                                                                     \
    CYBN_FUSED_CASES(T, planar_grad_sums_body_##SUFFIX(dy, dy_stride, y, y_stride, x, \
                                                       x_stride, n_spatial, begin,    \
                                                       end, mean, sum_dy, sum_dy_xmu, \
                                                       ahead, F_));                   \
}                                                                                     \
                                                                                      \
/* Element-wise passes.  One inline body per pass, with the options as       \
 * arguments that the dispatching functions pass as constants, so that each      \
 * combination compiles to its own branch-free vectorized loop.  Pointers a      \
 * combination does not use point at valid data (never NULL), so that no        \
 * speculative load can fault. */                                                 \
                                                                                      \
/* y = act((x - mean) * scale + shift [+ residual]); act is ReLU or nothing.        \
 * y may be x.  NaN passes through the ReLU.  With fused, the multiply-add is one  \
 * fma: the same but for one rounding fewer. */                                   \
CYBN_INLINE void affine_loop_##SUFFIX(const T *in, const T *res, T *out,              \
                                      Py_ssize_t len, double mean, double scale,      \
                                      double shift, const int add, const int relu,    \
                                      const int fused)                                \
{                                                                                     \
    CYBN_PRAGMA(omp simd)                                                             \
    for (Py_ssize_t i = 0; i < len; i++) {                                            \
        double v = fused ? fma((double)in[i] - mean, scale, shift)                    \
                         : ((double)in[i] - mean) * scale + shift;                    \
        if (add)                                                                      \
            v += (double)res[i];                                                      \
        if (relu)                                                                     \
            v = v < 0.0 ? 0.0 : v;                                                    \
        out[i] = (T)v;                                                                \
    }                                                                                 \
}                                                                                     \
                                                                                      \
/* The fused form's loop or the unfused one, each compiled on its own. */           \
CYBN_INLINE void affine_run_##SUFFIX(const T *in, const T *res, T *out,               \
                                     Py_ssize_t len, double mean, double scale,       \
                                     double shift, const int add, const int relu)     \
{                                                                                     \
    CYBN_FUSED_CASES(T, affine_loop_##SUFFIX(in, res, out, len, mean, scale, shift,   \
                                             add, relu, F_));                         \
}                                                                                     \
                                                                                      \
/* g = dy, or dy where y > 0 and 0 elsewhere (the ReLU's backward);               \
 * dx = ((g - dy_shift) - (x - mean) * x_coef) * scale, and g to g_out;            \
 * with fused, dx = fma(g, scale, fma(x - mean, x_coef, dy_shift)), x_coef and    \
 * dy_shift being the fused ones (see grad_input_run).  dx may be dy or x. */     \
CYBN_INLINE void grad_input_loop_##SUFFIX(const T *dy, const T *y, const T *x, T *dx, \
                                          T *g_out, Py_ssize_t len, double mean,      \
                                          double dy_shift, double x_coef,             \
                                          double scale, const int masked,             \
                                          const int keep_g, const int fused)          \
{                                                                                     \
    CYBN_PRAGMA(omp simd)                                                             \
    for (Py_ssize_t i = 0; i < len; i++) {                                            \
        double g = (double)dy[i];                                                     \
        if (masked)                                                                   \
            g = y[i] > 0 ? g : 0.0;                                                   \
        if (keep_g)                                                                   \
            g_out[i] = (T)g;                                                          \
        dx[i] = fused ? (T)fma(g, scale, fma((double)x[i] - mean, x_coef, dy_shift))  \
                      : (T)(((g - dy_shift) - ((double)x[i] - mean) * x_coef) * scale); \
    }                                                                                 \
}                                                                                     \
                                                                                      \
CYBN_INLINE void grad_input_run_##SUFFIX(const T *dy, const T *y, const T *x, T *dx,  \
                                         T *g_out, Py_ssize_t len, double mean,       \
                                         double dy_shift, double x_coef, double scale,\
                                         const int masked, const int keep_g)          \
{                                                                                     \
    const double fused_coef = -x_coef * scale, fused_shift = -dy_shift * scale;       \
    if (sizeof(T) == sizeof(float) && cybn_fused && fusable(scale, fused_shift)       \
        && fusable(fused_coef, fused_shift))                                          \
        grad_input_loop_##SUFFIX(dy, y, x, dx, g_out, len, mean, fused_shift,         \
                                 fused_coef, scale, masked, keep_g, 1);               \
    else                                                                              \
        grad_input_loop_##SUFFIX(dy, y, x, dx, g_out, len, mean, dy_shift, x_coef,    \
                                 scale, masked, keep_g, 0);                           \
}                                                                                     \
                                                                                      \
/* The runs with their options as constants in each case, the outputs       \
 * written plainly or (stream) by streaming stores. */                             \
CYBN_INLINE void affine_any_##SUFFIX(const T *in, const T *res, T *out,               \
                                     Py_ssize_t len, double mean, double scale,       \
                                     double shift, int add, int relu, int stream)     \
{                                                                                     \
    CYBN_FLAG_CASES(add, relu,                                                        \
        if (stream)                                                                   \
            CYBN_STREAMED(T, out, (T *)NULL, len, i, n, d, d2,                        \
                          affine_run_##SUFFIX(in + i, res + i, d, n, mean, scale,     \
                                              shift, A_, B_))                         \
        else                                                                          \
            affine_run_##SUFFIX(in, res, out, len, mean, scale, shift, A_, B_))       \
}                                                                                     \
                                                                                      \
CYBN_INLINE void grad_input_any_##SUFFIX(const T *dy, const T *y, const T *x, T *dx,  \
                                         T *g_out, Py_ssize_t len, double mean,       \
                                         double dy_shift, double x_coef, double scale,\
                                         int masked, int keep_g, int stream)          \
{                                                                                     \
    CYBN_FLAG_CASES(masked, keep_g,                                                   \
        if (stream)                                                                   \
            CYBN_STREAMED(T, dx, B_ ? g_out : (T *)NULL, len, i, n, d, d2,            \
                          grad_input_run_##SUFFIX(dy + i, y + i, x + i, d,            \
                                                  B_ ? d2 : d, n, mean, dy_shift,     \
                                                  x_coef, scale, A_, B_))             \
        else                                                                          \
            grad_input_run_##SUFFIX(dy, y, x, dx, g_out, len, mean, dy_shift, x_coef, \
                                    scale, A_, B_))                                   \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_planar_affine_##SUFFIX(                                \
    const T *x, Py_ssize_t x_stride, const T *res, Py_ssize_t res_stride, T *y,       \
    Py_ssize_t y_stride, Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,      \
    double mean, double scale, double shift, int relu, int stream)                    \
{                                                                                     \
    CYBN_FOR_RUNS(begin, end, n_spatial, n, s, len, {                                 \
        const T *in = x + n * x_stride + s;                                           \
        affine_any_##SUFFIX(in, res ? res + n * res_stride + s : in,                  \
                            y + n * y_stride + s, len, mean, scale, shift, res != NULL, \
                            relu, stream);                                            \
    })                                                                                \
    if (stream)                                                                       \
        stream_fence();                                                               \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_planar_grad_input_##SUFFIX(                            \
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,   \
    Py_ssize_t x_stride, T *dx, Py_ssize_t dx_stride, T *g_out, Py_ssize_t g_stride,  \
    Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end, double mean,              \
    double dy_shift, double x_coef, double scale, int stream)                         \
{                                                                                     \
    CYBN_FOR_RUNS(begin, end, n_spatial, n, s, len, {                                 \
        const T *g = dy + n * dy_stride + s;                                          \
        T *out = dx + n * dx_stride + s;                                              \
        grad_input_any_##SUFFIX(g, y ? y + n * y_stride + s : g, x + n * x_stride + s, \
                                out, g_out ? g_out + n * g_stride + s : out, len, mean, \
                                dy_shift, x_coef, scale, y != NULL, g_out != NULL,    \
                                stream);                                              \
    })                                                                                \
    if (stream)                                                                       \
        stream_fence();                                                               \
}                                                                                     \
                                                                                      \
/* y of a channel's flat indices [0, count), as cybn_planar_affine, each run      \
 * followed by the sums of the same run of the channel `next` values on, as       \
 * cybn_planar_sums over [0, count) (the same sums in the same order): the next   \
 * channel's values come in from memory while this one's y goes out. */          \
CYBN_INLINE void planar_affine_sums_body_##SUFFIX(                                    \
    const T *x, Py_ssize_t x_stride, const T *res, Py_ssize_t res_stride, T *y,       \
    Py_ssize_t y_stride, Py_ssize_t n_spatial, Py_ssize_t count, double mean,         \
    double scale, double shift, int relu, int stream, Py_ssize_t next,                \
    double next_shift, double *sum, double *sumsq, const int fused)                   \
{                                                                                     \
    cybn_v8d s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};                                  \
    double ts = 0.0, tq = 0.0;                                                        \
    CYBN_FOR_RUNS(0, count, n_spatial, n, s, len, {                                   \
        const T *in = x + n * x_stride + s;                                           \
        affine_any_##SUFFIX(in, res ? res + n * res_stride + s : in,                  \
                            y + n * y_stride + s, len, mean, scale, shift, res != NULL, \
                            relu, stream);                                            \
        shifted_sums_run_##SUFFIX(in + next, len, next_shift, &s0, &s1, &q0, &q1,     \
                                  &ts, &tq, fused);                                   \
    })                                                                                \
    if (stream)                                                                       \
        stream_fence();                                                               \
    add_sums(sum, sumsq, s0, s1, ts, q0, q1, tq);                                     \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_planar_affine_sums_##SUFFIX(                           \
    const T *x, Py_ssize_t x_stride, const T *res, Py_ssize_t res_stride, T *y,       \
    Py_ssize_t y_stride, Py_ssize_t n_spatial, Py_ssize_t count, double mean,         \
    double scale, double shift, int relu, int stream, Py_ssize_t next,                \
    double next_shift, double *sum, double *sumsq)                                    \
{                                                                                     \
    CYBN_FUSED_CASES(T, planar_affine_sums_body_##SUFFIX(                             \
        x, x_stride, res, res_stride, y, y_stride, n_spatial, count, mean, scale,     \
        shift, relu, stream, next, next_shift, sum, sumsq, F_));                      \
}                                                                                     \
                                                                                      \
/* dx (and g_out) of a channel's flat indices [0, count), as                      \
 * cybn_planar_grad_input, each run followed by the gradient sums of the same     \
 * run of the channel next_dy, next_y and next_x values on, as                    \
 * cybn_planar_grad_sums over [0, count) (the same sums in the same order). */    \
CYBN_INLINE void planar_grad_input_sums_body_##SUFFIX(                                \
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,   \
    Py_ssize_t x_stride, T *dx, Py_ssize_t dx_stride, T *g_out, Py_ssize_t g_stride,  \
    Py_ssize_t n_spatial, Py_ssize_t count, double mean, double dy_shift,             \
    double x_coef, double scale, int stream, Py_ssize_t next_dy, Py_ssize_t next_y,   \
    Py_ssize_t next_x, double next_mean, double *sum_dy, double *sum_dy_xmu,          \
    const int fused)                                                                  \
{                                                                                     \
    cybn_v8d s0 = {0}, s1 = {0}, p0 = {0}, p1 = {0};                                  \
    double ts = 0.0, tp = 0.0;                                                        \
    CYBN_FOR_RUNS(0, count, n_spatial, n, s, len, {                                   \
        const T *g = dy + n * dy_stride + s, *v = x + n * x_stride + s;               \
        const T *m = y ? y + n * y_stride + s : g;                                    \
        T *out = dx + n * dx_stride + s;                                              \
        grad_input_any_##SUFFIX(g, m, v, out, g_out ? g_out + n * g_stride + s : out, \
                                len, mean, dy_shift, x_coef, scale, y != NULL,        \
                                g_out != NULL, stream);                               \
        if (y)                                                                        \
            grad_sums_run_##SUFFIX(g + next_dy, m + next_y, v + next_x, len,          \
                                   next_mean, &s0, &s1, &p0, &p1, &ts, &tp, 1, fused);\
        else                                                                          \
            grad_sums_run_##SUFFIX(g + next_dy, g + next_dy, v + next_x, len,         \
                                   next_mean, &s0, &s1, &p0, &p1, &ts, &tp, 0, fused);\
    })                                                                                \
    if (stream)                                                                       \
        stream_fence();                                                               \
    add_sums(sum_dy, sum_dy_xmu, s0, s1, ts, p0, p1, tp);                             \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_planar_grad_input_sums_##SUFFIX(                       \
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,   \
    Py_ssize_t x_stride, T *dx, Py_ssize_t dx_stride, T *g_out, Py_ssize_t g_stride,  \
    Py_ssize_t n_spatial, Py_ssize_t count, double mean, double dy_shift,             \
    double x_coef, double scale, int stream, Py_ssize_t next_dy, Py_ssize_t next_y,   \
    Py_ssize_t next_x, double next_mean, double *sum_dy, double *sum_dy_xmu)          \
{                                                                                     \
    CYBN_FUSED_CASES(T, planar_grad_input_sums_body_##SUFFIX(                         \
        dy, dy_stride, y, y_stride, x, x_stride, dx, dx_stride, g_out, g_stride,      \
        n_spatial, count, mean, dy_shift, x_coef, scale, stream, next_dy, next_y,     \
        next_x, next_mean, sum_dy, sum_dy_xmu, F_));                                  \
}                                                                                     \
                                                                                      \
/* ---- planar in memory order: whole runs [run_begin, run_end), for short       \
 * runs (small H x W), where walking a channel's runs apart would defeat the     \
 * hardware prefetcher.  Sums go to per-channel arrays, each run's sum added     \
 * in run order. ---- */                                                          \
                                                                                      \
CYBN_INLINE void runs_sums_body_##SUFFIX(                                             \
    cybn_planar x, Py_ssize_t n_channels, Py_ssize_t n_spatial, Py_ssize_t run_begin, \
    Py_ssize_t run_end, const double *restrict shift, double *restrict sum,           \
    double *restrict sumsq, const int fused)                                          \
{                                                                                     \
    CYBN_FOR_RUNS_IN_ORDER(run_begin, run_end, n_channels, n, c, {                    \
        cybn_v8d s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};                              \
        double ts = 0.0, tq = 0.0;                                                    \
        shifted_sums_run_##SUFFIX(CYBN_AT(T, x, n, c), n_spatial, shift[c], &s0, &s1, \
                                  &q0, &q1, &ts, &tq, fused);                         \
        add_sums(&sum[c], &sumsq[c], s0, s1, ts, q0, q1, tq);                         \
    })                                                                                \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_runs_sums_##SUFFIX(                                    \
    cybn_planar x, Py_ssize_t n_channels, Py_ssize_t n_spatial, Py_ssize_t run_begin, \
    Py_ssize_t run_end, const double *restrict shift, double *restrict sum,           \
    double *restrict sumsq)                                                           \
{                                                                                     \
    CYBN_FUSED_CASES(T, runs_sums_body_##SUFFIX(x, n_channels, n_spatial, run_begin,  \
                                                run_end, shift, sum, sumsq, F_));     \
}                                                                                     \
                                                                                      \
CYBN_INLINE void runs_grad_sums_body_##SUFFIX(                                        \
    cybn_planar dy, cybn_planar y, cybn_planar x, Py_ssize_t n_channels,              \
    Py_ssize_t n_spatial, Py_ssize_t run_begin, Py_ssize_t run_end,                   \
    const double *restrict mean, double *restrict sum_dy,                             \
    double *restrict sum_dy_xmu, const int fused)                                     \
{                                                                                     \
    CYBN_FOR_RUNS_IN_ORDER(run_begin, run_end, n_channels, n, c, {                    \
        cybn_v8d s0 = {0}, s1 = {0}, p0 = {0}, p1 = {0};                              \
        double ts = 0.0, tp = 0.0;                                                    \
        const T *g = CYBN_AT(T, dy, n, c), *v = CYBN_AT(T, x, n, c);                  \
        if (y.data)                                                                   \
            grad_sums_run_##SUFFIX(g, CYBN_AT(T, y, n, c), v, n_spatial, mean[c], &s0,\
                                   &s1, &p0, &p1, &ts, &tp, 1, fused);                \
        else                                                                          \
            grad_sums_run_##SUFFIX(g, g, v, n_spatial, mean[c], &s0, &s1, &p0, &p1,   \
                                   &ts, &tp, 0, fused);                               \
        add_sums(&sum_dy[c], &sum_dy_xmu[c], s0, s1, ts, p0, p1, tp);                 \
    })                                                                                \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_runs_grad_sums_##SUFFIX(                               \
    cybn_planar dy, cybn_planar y, cybn_planar x, Py_ssize_t n_channels,              \
    Py_ssize_t n_spatial, Py_ssize_t run_begin, Py_ssize_t run_end,                   \
    const double *restrict mean, double *restrict sum_dy,                             \
    double *restrict sum_dy_xmu)                                                      \
{                                                                                     \
    CYBN_FUSED_CASES(T, runs_grad_sums_body_##SUFFIX(dy, y, x, n_channels, n_spatial, \
                                                     run_begin, run_end, mean, sum_dy,\
                                                     sum_dy_xmu, F_));                \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_runs_affine_##SUFFIX(                                  \
    cybn_planar x, cybn_planar res, cybn_planar y, Py_ssize_t n_channels,             \
    Py_ssize_t n_spatial, Py_ssize_t run_begin, Py_ssize_t run_end,                   \
    const double *mean, const double *scale, const double *shift, int relu, int stream) \
{                                                                                     \
    CYBN_FOR_RUNS_IN_ORDER(run_begin, run_end, n_channels, n, c, {                    \
        const T *in = CYBN_AT(T, x, n, c);                                            \
        affine_any_##SUFFIX(in, res.data ? CYBN_AT(T, res, n, c) : in, CYBN_AT(T, y, n, c), \
                            n_spatial, mean[c], scale[c], shift[c], res.data != NULL, \
                            relu, stream);                                            \
    })                                                                                \
    if (stream)                                                                       \
        stream_fence();                                                               \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_runs_grad_input_##SUFFIX(                              \
    cybn_planar dy, cybn_planar y, cybn_planar x, cybn_planar dx, cybn_planar g_out,  \
    Py_ssize_t n_channels, Py_ssize_t n_spatial, Py_ssize_t run_begin,                \
    Py_ssize_t run_end, const double *mean, const double *dy_shift,                   \
    const double *x_coef, const double *scale, int stream)                            \
{                                                                                     \
    CYBN_FOR_RUNS_IN_ORDER(run_begin, run_end, n_channels, n, c, {                    \
        const T *g = CYBN_AT(T, dy, n, c);                                            \
        T *out = CYBN_AT(T, dx, n, c);                                                \
        grad_input_any_##SUFFIX(g, y.data ? CYBN_AT(T, y, n, c) : g, CYBN_AT(T, x, n, c), \
                                out, g_out.data ? CYBN_AT(T, g_out, n, c) : out,      \
                                n_spatial, mean[c], dy_shift[c], x_coef[c], scale[c], \
                                y.data != NULL, g_out.data != NULL, stream);          \
    })                                                                                \
    if (stream)                                                                       \
        stream_fence();                                                               \
}                                                                                     \
                                                                                      \
/* ---- rows: rows [begin, end) of n_channels contiguous values; one              \
 * accumulator per channel, so sums vectorize across channels unreordered.          \
 * `block` rows at a time (1, or CYBN_ROWS_BLOCK / CYBN_WRITE_BLOCK), each       \
 * channel's sums or parameters loaded once per step. ---- */                      \
                                                                                      \
CYBN_INLINE void rows_sums_block_##SUFFIX(const T *x, Py_ssize_t row_stride,          \
                                          Py_ssize_t n_channels, const int k,         \
                                          const double *restrict shift,               \
                                          double *restrict sum,                       \
                                          double *restrict sumsq)                     \
{                                                                                     \
    CYBN_PRAGMA(omp simd)                                                             \
    for (Py_ssize_t c = 0; c < n_channels; c++) {                                     \
        double a = 0.0, b = 0.0;                                                      \
        for (int j = 0; j < k; j++) {                                                 \
            double d = (double)x[j * row_stride + c] - shift[c];                      \
            a += d;                                                                   \
            b += d * d;                                                               \
        }                                                                             \
        sum[c] += a;                                                                  \
        sumsq[c] += b;                                                                \
    }                                                                                 \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_rows_sums_##SUFFIX(                                    \
    const T *x, Py_ssize_t row_stride, Py_ssize_t n_channels, Py_ssize_t begin,       \
    Py_ssize_t end, const double *restrict shift, double *restrict sum,               \
    double *restrict sumsq, int block)                                                \
{                                                                                     \
    Py_ssize_t r = begin;                                                             \
    if (block == CYBN_ROWS_BLOCK)                                                     \
        for (; r + CYBN_ROWS_BLOCK <= end; r += CYBN_ROWS_BLOCK)                      \
            rows_sums_block_##SUFFIX(x + r * row_stride, row_stride, n_channels,      \
                                     CYBN_ROWS_BLOCK, shift, sum, sumsq);             \
    for (; r < end; r++)                                                              \
        rows_sums_block_##SUFFIX(x + r * row_stride, row_stride, n_channels, 1, shift, \
                                 sum, sumsq);                                         \
}                                                                                     \
                                                                                      \
CYBN_INLINE void rows_grad_sums_block_##SUFFIX(                                       \
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,   \
    Py_ssize_t x_stride, Py_ssize_t n_channels, const int k, const int masked,        \
    const double *restrict mean, double *restrict sum_dy,                             \
    double *restrict sum_dy_xmu)                                                      \
{                                                                                     \
    CYBN_PRAGMA(omp simd)                                                             \
    for (Py_ssize_t c = 0; c < n_channels; c++) {                                     \
        double a = 0.0, b = 0.0;                                                      \
        for (int j = 0; j < k; j++) {                                                 \
            double g = (double)dy[j * dy_stride + c];                                 \
            if (masked)                                                               \
                g = y[j * y_stride + c] > 0 ? g : 0.0;                                \
            a += g;                                                                   \
            b += g * ((double)x[j * x_stride + c] - mean[c]);                         \
        }                                                                             \
        sum_dy[c] += a;                                                               \
        sum_dy_xmu[c] += b;                                                           \
    }                                                                                 \
}                                                                                     \
                                                                                      \
/* y, when not NULL, masks dy (the ReLU's backward). */                             \
static CYBN_DISPATCH void cybn_rows_grad_sums_##SUFFIX(                               \
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,   \
    Py_ssize_t x_stride, Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end,     \
    const double *restrict mean, double *restrict sum_dy,                             \
    double *restrict sum_dy_xmu, int block)                                           \
{                                                                                     \
    for (Py_ssize_t r = begin; r < end;) {                                            \
        const int k = end - r >= block ? block : 1;                                   \
        const T *g = dy + r * dy_stride, *v = x + r * x_stride;                       \
        const T *m = y ? y + r * y_stride : g;                                        \
        if (y && k == CYBN_ROWS_BLOCK)                                                \
            rows_grad_sums_block_##SUFFIX(g, dy_stride, m, y_stride, v, x_stride,     \
                                          n_channels, CYBN_ROWS_BLOCK, 1, mean,       \
                                          sum_dy, sum_dy_xmu);                        \
        else if (y)                                                                   \
            rows_grad_sums_block_##SUFFIX(g, dy_stride, m, y_stride, v, x_stride,     \
                                          n_channels, 1, 1, mean, sum_dy, sum_dy_xmu);\
        else if (k == CYBN_ROWS_BLOCK)                                                \
            rows_grad_sums_block_##SUFFIX(g, dy_stride, m, y_stride, v, x_stride,     \
                                          n_channels, CYBN_ROWS_BLOCK, 0, mean,       \
                                          sum_dy, sum_dy_xmu);                        \
        else                                                                          \
            rows_grad_sums_block_##SUFFIX(g, dy_stride, m, y_stride, v, x_stride,     \
                                          n_channels, 1, 0, mean, sum_dy, sum_dy_xmu);\
        r += k;                                                                       \
    }                                                                                 \
}                                                                                     \
                                                                                      \
/* Every value is computed the same way whatever the block.  The k rows' values       \
 * are all loaded before any is stored: a store followed by a load at the same        \
 * address modulo 4 KiB (the next row, for rows of a page) would wait on it. */       \
CYBN_INLINE void rows_affine_run_##SUFFIX(                                            \
    const T *in, Py_ssize_t in_stride, const T *res, Py_ssize_t res_stride, T *out,   \
    Py_ssize_t out_stride, Py_ssize_t n_channels, const int k, const double *mean,    \
    const double *scale, const double *shift, const int add, const int relu)          \
{                                                                                     \
    CYBN_PRAGMA(omp simd)                                                             \
    for (Py_ssize_t c = 0; c < n_channels; c++) {                                     \
        const double m = mean[c], s = scale[c], b = shift[c];                         \
        double v[CYBN_WRITE_BLOCK];                                                   \
        for (int j = 0; j < k; j++) {                                                 \
            v[j] = ((double)in[j * in_stride + c] - m) * s + b;                       \
            if (add)                                                                  \
                v[j] += (double)res[j * res_stride + c];                              \
            if (relu)                                                                 \
                v[j] = v[j] < 0.0 ? 0.0 : v[j];                                       \
        }                                                                             \
        for (int j = 0; j < k; j++)                                                   \
            out[j * out_stride + c] = (T)v[j];                                        \
    }                                                                                 \
}                                                                                     \
static CYBN_DISPATCH void cybn_rows_affine_##SUFFIX(                                  \
    const T *x, Py_ssize_t x_stride, const T *res, Py_ssize_t res_stride, T *y,       \
    Py_ssize_t y_stride, Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end,     \
    const double *mean, const double *scale, const double *shift, int relu, int block, \
    int stream)                                                                       \
{                                                                                     \
    for (Py_ssize_t r = begin; r < end;) {                                            \
        const int k = !stream && end - r >= block ? block : 1;                        \
        const T *in = x + r * x_stride;                                               \
        const T *rr = res ? res + r * res_stride : in;                                \
        T *out = y + r * y_stride;                                                    \
        if (stream)                                                                   \
            CYBN_FLAG_CASES(res, relu, CYBN_STREAMED(T, out, (T *)NULL, n_channels,   \
                i, n, d, d2, rows_affine_run_##SUFFIX(                                \
                    in + i, x_stride, rr + i, res_stride, d, y_stride, n, 1, mean + i, \
                    scale + i, shift + i, A_, B_)))                                   \
        else                                                                          \
            CYBN_ROWS_CASES(k, res, relu, rows_affine_run_##SUFFIX(                   \
                in, x_stride, rr, res_stride, out, y_stride, n_channels, K_, mean,    \
                scale, shift, A_, B_));                                               \
        r += k;                                                                       \
    }                                                                                 \
    if (stream)                                                                       \
        stream_fence();                                                               \
}                                                                                     \
                                                                                      \
CYBN_INLINE void rows_grad_input_run_##SUFFIX(                                        \
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,   \
    Py_ssize_t x_stride, T *dx, Py_ssize_t dx_stride, T *g_out, Py_ssize_t g_stride,  \
    Py_ssize_t n_channels, const int k, const double *mean, const double *dy_shift,   \
    const double *x_coef, const double *scale, const int masked, const int keep_g)    \
{                                                                                     \
    CYBN_PRAGMA(omp simd)                                                             \
    for (Py_ssize_t c = 0; c < n_channels; c++) {                                     \
        const double m = mean[c], h = dy_shift[c], q = x_coef[c], s = scale[c];       \
        double g[CYBN_WRITE_BLOCK], v[CYBN_WRITE_BLOCK];                              \
        for (int j = 0; j < k; j++) {                                                 \
            g[j] = (double)dy[j * dy_stride + c];                                     \
            if (masked)                                                               \
                g[j] = y[j * y_stride + c] > 0 ? g[j] : 0.0;                          \
            v[j] = ((g[j] - h) - ((double)x[j * x_stride + c] - m) * q) * s;          \
        }                                                                             \
        for (int j = 0; j < k; j++) {                                                 \
            if (keep_g)                                                               \
                g_out[j * g_stride + c] = (T)g[j];                                    \
            dx[j * dx_stride + c] = (T)v[j];                                          \
        }                                                                             \
    }                                                                                 \
}                                                                                     \
                                                                                      \
static CYBN_DISPATCH void cybn_rows_grad_input_##SUFFIX(                              \
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,   \
    Py_ssize_t x_stride, T *dx, Py_ssize_t dx_stride, T *g_out, Py_ssize_t g_stride,  \
    Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end, const double *mean,      \
    const double *dy_shift, const double *x_coef, const double *scale, int block,     \
    int stream)                                                                       \
{                                                                                     \
    for (Py_ssize_t r = begin; r < end;) {                                            \
        const int k = !stream && end - r >= block ? block : 1;                        \
        const T *g = dy + r * dy_stride, *v = x + r * x_stride;                       \
        const T *m = y ? y + r * y_stride : g;                                        \
        T *out = dx + r * dx_stride;                                                  \
        T *keep = g_out ? g_out + r * g_stride : out;                                 \
        if (stream)                                                                   \
            CYBN_FLAG_CASES(y, g_out, CYBN_STREAMED(T, out, B_ ? keep : (T *)NULL,    \
                n_channels, i, n, d, d2, rows_grad_input_run_##SUFFIX(                \
                    g + i, dy_stride, m + i, y_stride, v + i, x_stride, d, dx_stride, \
                    B_ ? d2 : d, g_stride, n, 1, mean + i, dy_shift + i, x_coef + i,  \
                    scale + i, A_, B_)))                                              \
        else                                                                          \
            CYBN_ROWS_CASES(k, y, g_out, rows_grad_input_run_##SUFFIX(                \
                g, dy_stride, m, y_stride, v, x_stride, out, dx_stride, keep, g_stride, \
                n_channels, K_, mean, dy_shift, x_coef, scale, A_, B_));              \
        r += k;                                                                       \
    }                                                                                 \
    if (stream)                                                                       \
        stream_fence();                                                               \
}

CYBN_DEFINE_LOOPS(float, f32)
CYBN_DEFINE_LOOPS(double, f64)

/* Per-channel scalars, vectorized by the clones (sqrt and division are
 * exact IEEE operations in every one, so all give the same bits): 2048
 * channels took 3.9 us in the baseline build, 1.8 us so. */

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
