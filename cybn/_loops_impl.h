/* The loops of one element type, included twice by _loops.h: once with
 * T = float and SUFFIX = f32, once with T = double and SUFFIX = f64.  Each
 * function's name ends in the suffix (SUFFIXED(planar_sums_) is
 * planar_sums_f32 in the float instance), so compiler errors, debuggers and
 * profilers point at these lines. */

#define CYBN_CAT_(a, b) a##b
#define CYBN_CAT(a, b) CYBN_CAT_(a, b)
#define SUFFIXED(name) CYBN_CAT(name, SUFFIX)

/* Sums over one contiguous run, into accumulators that the caller carries
 * across runs (so short runs cost no reduction each): 16 lanes in s0|s1 and
 * q0|q1, and the values past the last full 16 in ts, tq. */
CYBN_INLINE void SUFFIXED(shifted_sums_run_)(const T *x, Py_ssize_t n, double shift,
                                             cybn_v8d *s0, cybn_v8d *s1, cybn_v8d *q0,
                                             cybn_v8d *q1, double *ts, double *tq,
                                             const int fused)
{
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        cybn_v8d d0 = SUFFIXED(load8_)(x + i) - shift;
        cybn_v8d d1 = SUFFIXED(load8_)(x + i + 8) - shift;
        *s0 += d0;
        *s1 += d1;
        *q0 = mul_add8(d0, d0, *q0, fused);
        *q1 = mul_add8(d1, d1, *q1, fused);
    }
    for (; i < n; i++) {
        double d = (double)x[i] - shift;
        *ts += d;
        *tq = fused ? fma(d, d, *tq) : *tq + d * d;
    }
}

/* dy where y > 0 and 0 elsewhere, 8 values widened: a mask of bits (a
 * per-element choice compiled to a branch per value in the AVX-512 clone). */
CYBN_INLINE cybn_v8d SUFFIXED(masked8_)(const T *dy, const T *y)
{
    cybn_v8l keep = SUFFIXED(load8_)(y) > 0.0;
    return (cybn_v8d)((cybn_v8l)SUFFIXED(load8_)(dy) & keep);
}

/* The same for sum(g) and sum(g * (x - mean)), g = dy, or (masked) dy where
 * y > 0 and 0 elsewhere: the ReLU's backward. */
CYBN_INLINE void SUFFIXED(grad_sums_run_)(const T *dy, const T *y, const T *x,
                                          Py_ssize_t n, double mean, cybn_v8d *s0,
                                          cybn_v8d *s1, cybn_v8d *p0, cybn_v8d *p1,
                                          double *ts, double *tp, const int masked,
                                          const int fused)
{
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        cybn_v8d g0, g1;
        if (masked) {
            g0 = SUFFIXED(masked8_)(dy + i, y + i);
            g1 = SUFFIXED(masked8_)(dy + i + 8, y + i + 8);
        } else {
            g0 = SUFFIXED(load8_)(dy + i);
            g1 = SUFFIXED(load8_)(dy + i + 8);
        }
        *s0 += g0;
        *s1 += g1;
        *p0 = mul_add8(g0, SUFFIXED(load8_)(x + i) - mean, *p0, fused);
        *p1 = mul_add8(g1, SUFFIXED(load8_)(x + i + 8) - mean, *p1, fused);
    }
    for (; i < n; i++) {
        double g = masked && !(y[i] > 0) ? 0.0 : (double)dy[i];
        *ts += g;
        double d = (double)x[i] - mean;
        *tp = fused ? fma(g, d, *tp) : *tp + g * d;
    }
}

/* ---- planar: one channel's flat indices [begin, end) ---- */

/* *sum += sum(x - shift); *sumsq += sum((x - shift)^2).  Each run asks for the
 * one `ahead` runs later (0: none; see prefetch_run). */
CYBN_INLINE void SUFFIXED(planar_sums_body_)(
    const T *x, Py_ssize_t batch_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
    Py_ssize_t end, double shift, double *sum, double *sumsq, Py_ssize_t ahead,
    const int fused)
{
    cybn_v8d s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};
    double ts = 0.0, tq = 0.0;
    CYBN_FOR_RUNS(begin, end, n_spatial, n, s, len, {
        if (ahead && (n + ahead) * n_spatial < end)
            prefetch_run(x + (n + ahead) * batch_stride, n_spatial * sizeof(T));
        SUFFIXED(shifted_sums_run_)(x + n * batch_stride + s, len, shift, &s0, &s1, &q0,
                                  &q1, &ts, &tq, fused);
    })
    add_sums(sum, sumsq, s0, s1, ts, q0, q1, tq);
}

static CYBN_DISPATCH void SUFFIXED(cybn_planar_sums_)(
    const T *x, Py_ssize_t batch_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
    Py_ssize_t end, double shift, double *sum, double *sumsq, Py_ssize_t ahead)
{
    CYBN_FUSED_CASES(T, SUFFIXED(planar_sums_body_)(x, batch_stride, n_spatial, begin,
                                                  end, shift, sum, sumsq, ahead, F_));
}

/* *sum_dy += sum(g); *sum_dy_xmu += sum(g * (x - mean)); y, when not NULL,
 * masks dy (the ReLU's backward).  Prefetches as cybn_planar_sums.  */
CYBN_INLINE void SUFFIXED(planar_grad_sums_body_)(
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,
    Py_ssize_t x_stride, Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,
    double mean, double *sum_dy, double *sum_dy_xmu, Py_ssize_t ahead,
    const int fused)
{
    cybn_v8d s0 = {0}, s1 = {0}, p0 = {0}, p1 = {0};
    double ts = 0.0, tp = 0.0;
    CYBN_FOR_RUNS(begin, end, n_spatial, n, s, len, {
        const T *g = dy + n * dy_stride + s, *v = x + n * x_stride + s;
        if (ahead && (n + ahead) * n_spatial < end) {
            prefetch_run(dy + (n + ahead) * dy_stride, n_spatial * sizeof(T));
            prefetch_run(x + (n + ahead) * x_stride, n_spatial * sizeof(T));
            if (y)
                prefetch_run(y + (n + ahead) * y_stride, n_spatial * sizeof(T));
        }
        if (y)
            SUFFIXED(grad_sums_run_)(g, y + n * y_stride + s, v, len, mean, &s0, &s1,
                                   &p0, &p1, &ts, &tp, 1, fused);
        else
            SUFFIXED(grad_sums_run_)(g, g, v, len, mean, &s0, &s1, &p0, &p1, &ts, &tp,
                                   0, fused);
    })
    add_sums(sum_dy, sum_dy_xmu, s0, s1, ts, p0, p1, tp);
}

static CYBN_DISPATCH void SUFFIXED(cybn_planar_grad_sums_)(
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,
    Py_ssize_t x_stride, Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,
    double mean, double *sum_dy, double *sum_dy_xmu, Py_ssize_t ahead)
{
    CYBN_FUSED_CASES(T, SUFFIXED(planar_grad_sums_body_)(dy, dy_stride, y, y_stride, x,
                                                       x_stride, n_spatial, begin,
                                                       end, mean, sum_dy, sum_dy_xmu,
                                                       ahead, F_));
}

/* Element-wise passes.  One inline body per pass, with the options as
 * arguments that the dispatching functions pass as constants, so that each
 * combination compiles to its own branch-free vectorized loop.  Pointers a
 * combination does not use point at valid data (never NULL), so that no
 * speculative load can fault. */

/* y = act((x - mean) * scale + shift [+ residual]); act is ReLU or nothing.
 * y may be x.  NaN passes through the ReLU.  With fused, the multiply-add is one
 * fma: the same but for one rounding fewer. */
CYBN_INLINE void SUFFIXED(affine_loop_)(const T *in, const T *res, T *out,
                                        Py_ssize_t len, double mean, double scale,
                                        double shift, const int add, const int relu,
                                        const int fused)
{
    CYBN_PRAGMA(omp simd)
    for (Py_ssize_t i = 0; i < len; i++) {
        double v = fused ? fma((double)in[i] - mean, scale, shift)
                         : ((double)in[i] - mean) * scale + shift;
        if (add)
            v += (double)res[i];
        if (relu)
            v = v < 0.0 ? 0.0 : v;
        out[i] = (T)v;
    }
}

/* The fused form's loop or the unfused one, each compiled on its own. */
CYBN_INLINE void SUFFIXED(affine_run_)(const T *in, const T *res, T *out,
                                       Py_ssize_t len, double mean, double scale,
                                       double shift, const int add, const int relu)
{
    CYBN_FUSED_CASES(T, SUFFIXED(affine_loop_)(in, res, out, len, mean, scale, shift,
                                             add, relu, F_));
}

/* g = dy, or dy where y > 0 and 0 elsewhere (the ReLU's backward);
 * dx = ((g - dy_shift) - (x - mean) * x_coef) * scale, and g to g_out;
 * with fused, dx = fma(g, scale, fma(x - mean, x_coef, dy_shift)), x_coef and
 * dy_shift being the fused ones (see grad_input_run).  dx may be dy or x. */
CYBN_INLINE void SUFFIXED(grad_input_loop_)(const T *dy, const T *y, const T *x, T *dx,
                                            T *g_out, Py_ssize_t len, double mean,
                                            double dy_shift, double x_coef,
                                            double scale, const int masked,
                                            const int keep_g, const int fused)
{
    CYBN_PRAGMA(omp simd)
    for (Py_ssize_t i = 0; i < len; i++) {
        double g = (double)dy[i];
        if (masked)
            g = y[i] > 0 ? g : 0.0;
        if (keep_g)
            g_out[i] = (T)g;
        dx[i] = fused ? (T)fma(g, scale, fma((double)x[i] - mean, x_coef, dy_shift))
                      : (T)(((g - dy_shift) - ((double)x[i] - mean) * x_coef) * scale);
    }
}

CYBN_INLINE void SUFFIXED(grad_input_run_)(const T *dy, const T *y, const T *x, T *dx,
                                           T *g_out, Py_ssize_t len, double mean,
                                           double dy_shift, double x_coef, double scale,
                                           const int masked, const int keep_g)
{
    const double fused_coef = -x_coef * scale, fused_shift = -dy_shift * scale;
    if (sizeof(T) == sizeof(float) && cybn_fused && fusable(scale, fused_shift)
        && fusable(fused_coef, fused_shift))
        SUFFIXED(grad_input_loop_)(dy, y, x, dx, g_out, len, mean, fused_shift,
                                 fused_coef, scale, masked, keep_g, 1);
    else
        SUFFIXED(grad_input_loop_)(dy, y, x, dx, g_out, len, mean, dy_shift, x_coef,
                                 scale, masked, keep_g, 0);
}

/* The runs with their options as constants in each case, the outputs
 * written plainly or (stream) by streaming stores. */
CYBN_INLINE void SUFFIXED(affine_any_)(const T *in, const T *res, T *out,
                                       Py_ssize_t len, double mean, double scale,
                                       double shift, int add, int relu, int stream)
{
    CYBN_FLAG_CASES(add, relu,
        if (stream)
            CYBN_STREAMED(T, out, (T *)NULL, len, i, n, d, d2,
                          SUFFIXED(affine_run_)(in + i, res + i, d, n, mean, scale,
                                              shift, A_, B_))
        else
            SUFFIXED(affine_run_)(in, res, out, len, mean, scale, shift, A_, B_))
}

CYBN_INLINE void SUFFIXED(grad_input_any_)(const T *dy, const T *y, const T *x, T *dx,
                                           T *g_out, Py_ssize_t len, double mean,
                                           double dy_shift, double x_coef, double scale,
                                           int masked, int keep_g, int stream)
{
    CYBN_FLAG_CASES(masked, keep_g,
        if (stream)
            CYBN_STREAMED(T, dx, B_ ? g_out : (T *)NULL, len, i, n, d, d2,
                          SUFFIXED(grad_input_run_)(dy + i, y + i, x + i, d,
                                                  B_ ? d2 : d, n, mean, dy_shift,
                                                  x_coef, scale, A_, B_))
        else
            SUFFIXED(grad_input_run_)(dy, y, x, dx, g_out, len, mean, dy_shift, x_coef,
                                    scale, A_, B_))
}

static CYBN_DISPATCH void SUFFIXED(cybn_planar_affine_)(
    const T *x, Py_ssize_t x_stride, const T *res, Py_ssize_t res_stride, T *y,
    Py_ssize_t y_stride, Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,
    double mean, double scale, double shift, int relu, int stream)
{
    CYBN_FOR_RUNS(begin, end, n_spatial, n, s, len, {
        const T *in = x + n * x_stride + s;
        SUFFIXED(affine_any_)(in, res ? res + n * res_stride + s : in,
                            y + n * y_stride + s, len, mean, scale, shift, res != NULL,
                            relu, stream);
    })
    if (stream)
        stream_fence();
}

static CYBN_DISPATCH void SUFFIXED(cybn_planar_grad_input_)(
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,
    Py_ssize_t x_stride, T *dx, Py_ssize_t dx_stride, T *g_out, Py_ssize_t g_stride,
    Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end, double mean,
    double dy_shift, double x_coef, double scale, int stream)
{
    CYBN_FOR_RUNS(begin, end, n_spatial, n, s, len, {
        const T *g = dy + n * dy_stride + s;
        T *out = dx + n * dx_stride + s;
        SUFFIXED(grad_input_any_)(g, y ? y + n * y_stride + s : g, x + n * x_stride + s,
                                out, g_out ? g_out + n * g_stride + s : out, len, mean,
                                dy_shift, x_coef, scale, y != NULL, g_out != NULL,
                                stream);
    })
    if (stream)
        stream_fence();
}

/* y of a channel's flat indices [0, count), as cybn_planar_affine, each run
 * followed by the sums of the same run of the channel `next` values on, as
 * cybn_planar_sums over [0, count) (the same sums in the same order): the next
 * channel's values come in from memory while this one's y goes out. */
CYBN_INLINE void SUFFIXED(planar_affine_sums_body_)(
    const T *x, Py_ssize_t x_stride, const T *res, Py_ssize_t res_stride, T *y,
    Py_ssize_t y_stride, Py_ssize_t n_spatial, Py_ssize_t count, double mean,
    double scale, double shift, int relu, int stream, Py_ssize_t next,
    double next_shift, double *sum, double *sumsq, const int fused)
{
    cybn_v8d s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};
    double ts = 0.0, tq = 0.0;
    CYBN_FOR_RUNS(0, count, n_spatial, n, s, len, {
        const T *in = x + n * x_stride + s;
        SUFFIXED(affine_any_)(in, res ? res + n * res_stride + s : in,
                            y + n * y_stride + s, len, mean, scale, shift, res != NULL,
                            relu, stream);
        SUFFIXED(shifted_sums_run_)(in + next, len, next_shift, &s0, &s1, &q0, &q1,
                                  &ts, &tq, fused);
    })
    if (stream)
        stream_fence();
    add_sums(sum, sumsq, s0, s1, ts, q0, q1, tq);
}

static CYBN_DISPATCH void SUFFIXED(cybn_planar_affine_sums_)(
    const T *x, Py_ssize_t x_stride, const T *res, Py_ssize_t res_stride, T *y,
    Py_ssize_t y_stride, Py_ssize_t n_spatial, Py_ssize_t count, double mean,
    double scale, double shift, int relu, int stream, Py_ssize_t next,
    double next_shift, double *sum, double *sumsq)
{
    CYBN_FUSED_CASES(T, SUFFIXED(planar_affine_sums_body_)(
        x, x_stride, res, res_stride, y, y_stride, n_spatial, count, mean, scale,
        shift, relu, stream, next, next_shift, sum, sumsq, F_));
}

/* dx (and g_out) of a channel's flat indices [0, count), as
 * cybn_planar_grad_input, each run followed by the gradient sums of the same
 * run of the channel next_dy, next_y and next_x values on, as
 * cybn_planar_grad_sums over [0, count) (the same sums in the same order). */
CYBN_INLINE void SUFFIXED(planar_grad_input_sums_body_)(
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,
    Py_ssize_t x_stride, T *dx, Py_ssize_t dx_stride, T *g_out, Py_ssize_t g_stride,
    Py_ssize_t n_spatial, Py_ssize_t count, double mean, double dy_shift,
    double x_coef, double scale, int stream, Py_ssize_t next_dy, Py_ssize_t next_y,
    Py_ssize_t next_x, double next_mean, double *sum_dy, double *sum_dy_xmu,
    const int fused)
{
    cybn_v8d s0 = {0}, s1 = {0}, p0 = {0}, p1 = {0};
    double ts = 0.0, tp = 0.0;
    CYBN_FOR_RUNS(0, count, n_spatial, n, s, len, {
        const T *g = dy + n * dy_stride + s, *v = x + n * x_stride + s;
        const T *m = y ? y + n * y_stride + s : g;
        T *out = dx + n * dx_stride + s;
        SUFFIXED(grad_input_any_)(g, m, v, out, g_out ? g_out + n * g_stride + s : out,
                                len, mean, dy_shift, x_coef, scale, y != NULL,
                                g_out != NULL, stream);
        if (y)
            SUFFIXED(grad_sums_run_)(g + next_dy, m + next_y, v + next_x, len,
                                   next_mean, &s0, &s1, &p0, &p1, &ts, &tp, 1, fused);
        else
            SUFFIXED(grad_sums_run_)(g + next_dy, g + next_dy, v + next_x, len,
                                   next_mean, &s0, &s1, &p0, &p1, &ts, &tp, 0, fused);
    })
    if (stream)
        stream_fence();
    add_sums(sum_dy, sum_dy_xmu, s0, s1, ts, p0, p1, tp);
}

static CYBN_DISPATCH void SUFFIXED(cybn_planar_grad_input_sums_)(
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,
    Py_ssize_t x_stride, T *dx, Py_ssize_t dx_stride, T *g_out, Py_ssize_t g_stride,
    Py_ssize_t n_spatial, Py_ssize_t count, double mean, double dy_shift,
    double x_coef, double scale, int stream, Py_ssize_t next_dy, Py_ssize_t next_y,
    Py_ssize_t next_x, double next_mean, double *sum_dy, double *sum_dy_xmu)
{
    CYBN_FUSED_CASES(T, SUFFIXED(planar_grad_input_sums_body_)(
        dy, dy_stride, y, y_stride, x, x_stride, dx, dx_stride, g_out, g_stride,
        n_spatial, count, mean, dy_shift, x_coef, scale, stream, next_dy, next_y,
        next_x, next_mean, sum_dy, sum_dy_xmu, F_));
}

/* ---- planar in memory order: whole runs [run_begin, run_end), for short
 * runs (small H x W), where walking a channel's runs apart would defeat the
 * hardware prefetcher.  Sums go to per-channel arrays, each run's sum added
 * in run order. ---- */

CYBN_INLINE void SUFFIXED(runs_sums_body_)(
    cybn_planar x, Py_ssize_t n_channels, Py_ssize_t n_spatial, Py_ssize_t run_begin,
    Py_ssize_t run_end, const double *restrict shift, double *restrict sum,
    double *restrict sumsq, const int fused)
{
    CYBN_FOR_RUNS_IN_ORDER(run_begin, run_end, n_channels, n, c, {
        cybn_v8d s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};
        double ts = 0.0, tq = 0.0;
        SUFFIXED(shifted_sums_run_)(CYBN_AT(T, x, n, c), n_spatial, shift[c], &s0, &s1,
                                  &q0, &q1, &ts, &tq, fused);
        add_sums(&sum[c], &sumsq[c], s0, s1, ts, q0, q1, tq);
    })
}

static CYBN_DISPATCH void SUFFIXED(cybn_runs_sums_)(
    cybn_planar x, Py_ssize_t n_channels, Py_ssize_t n_spatial, Py_ssize_t run_begin,
    Py_ssize_t run_end, const double *restrict shift, double *restrict sum,
    double *restrict sumsq)
{
    CYBN_FUSED_CASES(T, SUFFIXED(runs_sums_body_)(x, n_channels, n_spatial, run_begin,
                                                run_end, shift, sum, sumsq, F_));
}

CYBN_INLINE void SUFFIXED(runs_grad_sums_body_)(
    cybn_planar dy, cybn_planar y, cybn_planar x, Py_ssize_t n_channels,
    Py_ssize_t n_spatial, Py_ssize_t run_begin, Py_ssize_t run_end,
    const double *restrict mean, double *restrict sum_dy,
    double *restrict sum_dy_xmu, const int fused)
{
    CYBN_FOR_RUNS_IN_ORDER(run_begin, run_end, n_channels, n, c, {
        cybn_v8d s0 = {0}, s1 = {0}, p0 = {0}, p1 = {0};
        double ts = 0.0, tp = 0.0;
        const T *g = CYBN_AT(T, dy, n, c), *v = CYBN_AT(T, x, n, c);
        if (y.data)
            SUFFIXED(grad_sums_run_)(g, CYBN_AT(T, y, n, c), v, n_spatial, mean[c], &s0,
                                   &s1, &p0, &p1, &ts, &tp, 1, fused);
        else
            SUFFIXED(grad_sums_run_)(g, g, v, n_spatial, mean[c], &s0, &s1, &p0, &p1,
                                   &ts, &tp, 0, fused);
        add_sums(&sum_dy[c], &sum_dy_xmu[c], s0, s1, ts, p0, p1, tp);
    })
}

static CYBN_DISPATCH void SUFFIXED(cybn_runs_grad_sums_)(
    cybn_planar dy, cybn_planar y, cybn_planar x, Py_ssize_t n_channels,
    Py_ssize_t n_spatial, Py_ssize_t run_begin, Py_ssize_t run_end,
    const double *restrict mean, double *restrict sum_dy,
    double *restrict sum_dy_xmu)
{
    CYBN_FUSED_CASES(T, SUFFIXED(runs_grad_sums_body_)(dy, y, x, n_channels, n_spatial,
                                                     run_begin, run_end, mean, sum_dy,
                                                     sum_dy_xmu, F_));
}

static CYBN_DISPATCH void SUFFIXED(cybn_runs_affine_)(
    cybn_planar x, cybn_planar res, cybn_planar y, Py_ssize_t n_channels,
    Py_ssize_t n_spatial, Py_ssize_t run_begin, Py_ssize_t run_end,
    const double *mean, const double *scale, const double *shift, int relu, int stream)
{
    CYBN_FOR_RUNS_IN_ORDER(run_begin, run_end, n_channels, n, c, {
        const T *in = CYBN_AT(T, x, n, c);
        SUFFIXED(affine_any_)(in, res.data ? CYBN_AT(T, res, n, c) : in, CYBN_AT(T, y, n, c),
                            n_spatial, mean[c], scale[c], shift[c], res.data != NULL,
                            relu, stream);
    })
    if (stream)
        stream_fence();
}

static CYBN_DISPATCH void SUFFIXED(cybn_runs_grad_input_)(
    cybn_planar dy, cybn_planar y, cybn_planar x, cybn_planar dx, cybn_planar g_out,
    Py_ssize_t n_channels, Py_ssize_t n_spatial, Py_ssize_t run_begin,
    Py_ssize_t run_end, const double *mean, const double *dy_shift,
    const double *x_coef, const double *scale, int stream)
{
    CYBN_FOR_RUNS_IN_ORDER(run_begin, run_end, n_channels, n, c, {
        const T *g = CYBN_AT(T, dy, n, c);
        T *out = CYBN_AT(T, dx, n, c);
        SUFFIXED(grad_input_any_)(g, y.data ? CYBN_AT(T, y, n, c) : g, CYBN_AT(T, x, n, c),
                                out, g_out.data ? CYBN_AT(T, g_out, n, c) : out,
                                n_spatial, mean[c], dy_shift[c], x_coef[c], scale[c],
                                y.data != NULL, g_out.data != NULL, stream);
    })
    if (stream)
        stream_fence();
}

/* ---- rows: rows [begin, end) of n_channels contiguous values; one
 * accumulator per channel, so sums vectorize across channels unreordered.
 * `block` rows at a time (1, or CYBN_ROWS_BLOCK / CYBN_WRITE_BLOCK), each
 * channel's sums or parameters loaded once per step. ---- */

CYBN_INLINE void SUFFIXED(rows_sums_block_)(const T *x, Py_ssize_t row_stride,
                                            Py_ssize_t n_channels, const int k,
                                            const double *restrict shift,
                                            double *restrict sum,
                                            double *restrict sumsq)
{
    CYBN_PRAGMA(omp simd)
    for (Py_ssize_t c = 0; c < n_channels; c++) {
        double a = 0.0, b = 0.0;
        for (int j = 0; j < k; j++) {
            double d = (double)x[j * row_stride + c] - shift[c];
            a += d;
            b += d * d;
        }
        sum[c] += a;
        sumsq[c] += b;
    }
}

static CYBN_DISPATCH void SUFFIXED(cybn_rows_sums_)(
    const T *x, Py_ssize_t row_stride, Py_ssize_t n_channels, Py_ssize_t begin,
    Py_ssize_t end, const double *restrict shift, double *restrict sum,
    double *restrict sumsq, int block)
{
    Py_ssize_t r = begin;
    if (block == CYBN_ROWS_BLOCK)
        for (; r + CYBN_ROWS_BLOCK <= end; r += CYBN_ROWS_BLOCK)
            SUFFIXED(rows_sums_block_)(x + r * row_stride, row_stride, n_channels,
                                     CYBN_ROWS_BLOCK, shift, sum, sumsq);
    for (; r < end; r++)
        SUFFIXED(rows_sums_block_)(x + r * row_stride, row_stride, n_channels, 1, shift,
                                 sum, sumsq);
}

CYBN_INLINE void SUFFIXED(rows_grad_sums_block_)(
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,
    Py_ssize_t x_stride, Py_ssize_t n_channels, const int k, const int masked,
    const double *restrict mean, double *restrict sum_dy,
    double *restrict sum_dy_xmu)
{
    CYBN_PRAGMA(omp simd)
    for (Py_ssize_t c = 0; c < n_channels; c++) {
        double a = 0.0, b = 0.0;
        for (int j = 0; j < k; j++) {
            double g = (double)dy[j * dy_stride + c];
            if (masked)
                g = y[j * y_stride + c] > 0 ? g : 0.0;
            a += g;
            b += g * ((double)x[j * x_stride + c] - mean[c]);
        }
        sum_dy[c] += a;
        sum_dy_xmu[c] += b;
    }
}

/* y, when not NULL, masks dy (the ReLU's backward). */
static CYBN_DISPATCH void SUFFIXED(cybn_rows_grad_sums_)(
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,
    Py_ssize_t x_stride, Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end,
    const double *restrict mean, double *restrict sum_dy,
    double *restrict sum_dy_xmu, int block)
{
    for (Py_ssize_t r = begin; r < end;) {
        const int k = end - r >= block ? block : 1;
        const T *g = dy + r * dy_stride, *v = x + r * x_stride;
        const T *m = y ? y + r * y_stride : g;
        if (y && k == CYBN_ROWS_BLOCK)
            SUFFIXED(rows_grad_sums_block_)(g, dy_stride, m, y_stride, v, x_stride,
                                          n_channels, CYBN_ROWS_BLOCK, 1, mean,
                                          sum_dy, sum_dy_xmu);
        else if (y)
            SUFFIXED(rows_grad_sums_block_)(g, dy_stride, m, y_stride, v, x_stride,
                                          n_channels, 1, 1, mean, sum_dy, sum_dy_xmu);
        else if (k == CYBN_ROWS_BLOCK)
            SUFFIXED(rows_grad_sums_block_)(g, dy_stride, m, y_stride, v, x_stride,
                                          n_channels, CYBN_ROWS_BLOCK, 0, mean,
                                          sum_dy, sum_dy_xmu);
        else
            SUFFIXED(rows_grad_sums_block_)(g, dy_stride, m, y_stride, v, x_stride,
                                          n_channels, 1, 0, mean, sum_dy, sum_dy_xmu);
        r += k;
    }
}

/* Every value is computed the same way whatever the block.  The k rows' values
 * are all loaded before any is stored: a store followed by a load at the same
 * address modulo 4 KiB (the next row, for rows of a page) would wait on it. */
CYBN_INLINE void SUFFIXED(rows_affine_run_)(
    const T *in, Py_ssize_t in_stride, const T *res, Py_ssize_t res_stride, T *out,
    Py_ssize_t out_stride, Py_ssize_t n_channels, const int k, const double *mean,
    const double *scale, const double *shift, const int add, const int relu)
{
    CYBN_PRAGMA(omp simd)
    for (Py_ssize_t c = 0; c < n_channels; c++) {
        const double m = mean[c], s = scale[c], b = shift[c];
        double v[CYBN_WRITE_BLOCK];
        for (int j = 0; j < k; j++) {
            v[j] = ((double)in[j * in_stride + c] - m) * s + b;
            if (add)
                v[j] += (double)res[j * res_stride + c];
            if (relu)
                v[j] = v[j] < 0.0 ? 0.0 : v[j];
        }
        for (int j = 0; j < k; j++)
            out[j * out_stride + c] = (T)v[j];
    }
}
static CYBN_DISPATCH void SUFFIXED(cybn_rows_affine_)(
    const T *x, Py_ssize_t x_stride, const T *res, Py_ssize_t res_stride, T *y,
    Py_ssize_t y_stride, Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end,
    const double *mean, const double *scale, const double *shift, int relu, int block,
    int stream)
{
    for (Py_ssize_t r = begin; r < end;) {
        const int k = !stream && end - r >= block ? block : 1;
        const T *in = x + r * x_stride;
        const T *rr = res ? res + r * res_stride : in;
        T *out = y + r * y_stride;
        if (stream)
            CYBN_FLAG_CASES(res, relu, CYBN_STREAMED(T, out, (T *)NULL, n_channels,
                i, n, d, d2, SUFFIXED(rows_affine_run_)(
                    in + i, x_stride, rr + i, res_stride, d, y_stride, n, 1, mean + i,
                    scale + i, shift + i, A_, B_)))
        else
            CYBN_ROWS_CASES(k, res, relu, SUFFIXED(rows_affine_run_)(
                in, x_stride, rr, res_stride, out, y_stride, n_channels, K_, mean,
                scale, shift, A_, B_));
        r += k;
    }
    if (stream)
        stream_fence();
}

CYBN_INLINE void SUFFIXED(rows_grad_input_run_)(
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,
    Py_ssize_t x_stride, T *dx, Py_ssize_t dx_stride, T *g_out, Py_ssize_t g_stride,
    Py_ssize_t n_channels, const int k, const double *mean, const double *dy_shift,
    const double *x_coef, const double *scale, const int masked, const int keep_g)
{
    CYBN_PRAGMA(omp simd)
    for (Py_ssize_t c = 0; c < n_channels; c++) {
        const double m = mean[c], h = dy_shift[c], q = x_coef[c], s = scale[c];
        double g[CYBN_WRITE_BLOCK], v[CYBN_WRITE_BLOCK];
        for (int j = 0; j < k; j++) {
            g[j] = (double)dy[j * dy_stride + c];
            if (masked)
                g[j] = y[j * y_stride + c] > 0 ? g[j] : 0.0;
            v[j] = ((g[j] - h) - ((double)x[j * x_stride + c] - m) * q) * s;
        }
        for (int j = 0; j < k; j++) {
            if (keep_g)
                g_out[j * g_stride + c] = (T)g[j];
            dx[j * dx_stride + c] = (T)v[j];
        }
    }
}

static CYBN_DISPATCH void SUFFIXED(cybn_rows_grad_input_)(
    const T *dy, Py_ssize_t dy_stride, const T *y, Py_ssize_t y_stride, const T *x,
    Py_ssize_t x_stride, T *dx, Py_ssize_t dx_stride, T *g_out, Py_ssize_t g_stride,
    Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end, const double *mean,
    const double *dy_shift, const double *x_coef, const double *scale, int block,
    int stream)
{
    for (Py_ssize_t r = begin; r < end;) {
        const int k = !stream && end - r >= block ? block : 1;
        const T *g = dy + r * dy_stride, *v = x + r * x_stride;
        const T *m = y ? y + r * y_stride : g;
        T *out = dx + r * dx_stride;
        T *keep = g_out ? g_out + r * g_stride : out;
        if (stream)
            CYBN_FLAG_CASES(y, g_out, CYBN_STREAMED(T, out, B_ ? keep : (T *)NULL,
                n_channels, i, n, d, d2, SUFFIXED(rows_grad_input_run_)(
                    g + i, dy_stride, m + i, y_stride, v + i, x_stride, d, dx_stride,
                    B_ ? d2 : d, g_stride, n, 1, mean + i, dy_shift + i, x_coef + i,
                    scale + i, A_, B_)))
        else
            CYBN_ROWS_CASES(k, y, g_out, SUFFIXED(rows_grad_input_run_)(
                g, dy_stride, m, y_stride, v, x_stride, out, dx_stride, keep, g_stride,
                n_channels, K_, mean, dy_shift, x_coef, scale, A_, B_));
        r += k;
    }
    if (stream)
        stream_fence();
}

#undef SUFFIXED
#undef CYBN_CAT
#undef CYBN_CAT_
