# cython: language_level=3
"""The typed kernels of cybn: loops and nothing else.

Every function here trusts its arguments; cybn._api checks them first.  Data
arrives in one of two layouts, both views of the caller's memory (declared as
strided memoryviews, since `::1` would demand a wholly C-contiguous buffer;
the unit inner stride is guaranteed by cybn._api):

- "planar": (N, C, S) with unit stride along S (NCHW and its relatives);
  a channel is N runs of S contiguous values.
- "rows": (R, C) with unit stride along C ((N, C) batches, N×C×1×1 and
  channels-last data); a channel is a column, and loops run along rows,
  vectorized across channels.

Work is cut into tasks whose boundaries depend on the shape only, never on
the number of threads, and partial sums are merged in task order: results
are bitwise identical for any number of threads.  With many channels a
planar task is a whole channel, whose statistics and element-wise pass then
run back to back while its data is still in cache; with few channels each
channel is cut into parts so that every thread has work.  All statistics and
gradient sums are accumulated in float64, whatever the data type.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

cdef extern from "_loops.h" nogil:
    int cybn_max_threads()
    void planar_sums_f32 "cybn_planar_sums_f32"(
        const float *x, Py_ssize_t batch_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
        Py_ssize_t end, double shift, double *sum, double *sumsq)
    void planar_sums_f64 "cybn_planar_sums_f64"(
        const double *x, Py_ssize_t batch_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
        Py_ssize_t end, double shift, double *sum, double *sumsq)
    void planar_grad_sums_f32 "cybn_planar_grad_sums_f32"(
        const float *dy, Py_ssize_t dy_stride, const float *x, Py_ssize_t x_stride,
        Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end, double mean,
        double *sum_dy, double *sum_dy_xmu)
    void planar_grad_sums_f64 "cybn_planar_grad_sums_f64"(
        const double *dy, Py_ssize_t dy_stride, const double *x, Py_ssize_t x_stride,
        Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end, double mean,
        double *sum_dy, double *sum_dy_xmu)
    void planar_affine_f32 "cybn_planar_affine_f32"(
        const float *x, Py_ssize_t x_stride, float *y, Py_ssize_t y_stride,
        Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end, double mean,
        double scale, double shift)
    void planar_affine_f64 "cybn_planar_affine_f64"(
        const double *x, Py_ssize_t x_stride, double *y, Py_ssize_t y_stride,
        Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end, double mean,
        double scale, double shift)
    void planar_grad_input_f32 "cybn_planar_grad_input_f32"(
        const float *dy, Py_ssize_t dy_stride, const float *x, Py_ssize_t x_stride,
        float *dx, Py_ssize_t dx_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
        Py_ssize_t end, double mean, double dy_shift, double x_coef, double scale)
    void planar_grad_input_f64 "cybn_planar_grad_input_f64"(
        const double *dy, Py_ssize_t dy_stride, const double *x, Py_ssize_t x_stride,
        double *dx, Py_ssize_t dx_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
        Py_ssize_t end, double mean, double dy_shift, double x_coef, double scale)
    void rows_sums_f32 "cybn_rows_sums_f32"(
        const float *x, Py_ssize_t row_stride, Py_ssize_t n_channels, Py_ssize_t begin,
        Py_ssize_t end, const double *shift, double *sum, double *sumsq)
    void rows_sums_f64 "cybn_rows_sums_f64"(
        const double *x, Py_ssize_t row_stride, Py_ssize_t n_channels, Py_ssize_t begin,
        Py_ssize_t end, const double *shift, double *sum, double *sumsq)
    void rows_grad_sums_f32 "cybn_rows_grad_sums_f32"(
        const float *dy, Py_ssize_t dy_stride, const float *x, Py_ssize_t x_stride,
        Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end, const double *mean,
        double *sum_dy, double *sum_dy_xmu)
    void rows_grad_sums_f64 "cybn_rows_grad_sums_f64"(
        const double *dy, Py_ssize_t dy_stride, const double *x, Py_ssize_t x_stride,
        Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end, const double *mean,
        double *sum_dy, double *sum_dy_xmu)
    void rows_affine_f32 "cybn_rows_affine_f32"(
        const float *x, Py_ssize_t x_stride, float *y, Py_ssize_t y_stride,
        Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end, const double *mean,
        const double *scale, const double *shift)
    void rows_affine_f64 "cybn_rows_affine_f64"(
        const double *x, Py_ssize_t x_stride, double *y, Py_ssize_t y_stride,
        Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end, const double *mean,
        const double *scale, const double *shift)
    void rows_grad_input_f32 "cybn_rows_grad_input_f32"(
        const float *dy, Py_ssize_t dy_stride, const float *x, Py_ssize_t x_stride,
        float *dx, Py_ssize_t dx_stride, Py_ssize_t n_channels, Py_ssize_t begin,
        Py_ssize_t end, const double *mean, const double *dy_shift, const double *x_coef,
        const double *scale)
    void rows_grad_input_f64 "cybn_rows_grad_input_f64"(
        const double *dy, Py_ssize_t dy_stride, const double *x, Py_ssize_t x_stride,
        double *dx, Py_ssize_t dx_stride, Py_ssize_t n_channels, Py_ssize_t begin,
        Py_ssize_t end, const double *mean, const double *dy_shift, const double *x_coef,
        const double *scale)


# Below this many values a parallel region costs more than it saves.
cdef Py_ssize_t SERIAL_BELOW = 1 << 15
# Planar data with fewer channels than this is cut into parts per channel,
# each of at least PART_MIN values, so that many threads have work.
cdef Py_ssize_t MIN_TASKS = 64
cdef Py_ssize_t PART_MIN = 1 << 14
# Rows data is cut into at most ROWS_TASKS ranges of at least ROWS_MIN rows;
# each range keeps 2 x C partial sums.
cdef Py_ssize_t ROWS_TASKS = 32
cdef Py_ssize_t ROWS_MIN = 16


def max_threads():
    """The number of threads a large kernel uses now (OpenMP's current limit)."""
    return cybn_max_threads()


cdef inline int threads_for(Py_ssize_t n_values) noexcept nogil:
    return 1 if n_values < SERIAL_BELOW else cybn_max_threads()


cdef inline Py_ssize_t planar_parts(Py_ssize_t n_channels, Py_ssize_t count) noexcept nogil:
    """Parts per channel: a function of the shape alone."""
    if n_channels >= MIN_TASKS:
        return 1
    return max(1, min((MIN_TASKS + n_channels - 1) // n_channels, count // PART_MIN))


cdef inline Py_ssize_t rows_parts(Py_ssize_t n_rows) noexcept nogil:
    return max(1, min(ROWS_TASKS, n_rows // ROWS_MIN))


cdef inline Py_ssize_t part_start(Py_ssize_t part, Py_ssize_t n_parts,
                                  Py_ssize_t size) noexcept nogil:
    return part * size // n_parts


cdef inline double centered_m2(double s, double q, double count) noexcept nogil:
    """M2 = sum((x - mean)^2) from s = sum(x - shift), q = sum((x - shift)^2)."""
    return max(q - s * s / count, 0.0)


cdef double *scratch(Py_ssize_t n_doubles) except NULL:
    cdef double *p = <double *>malloc(max(n_doubles, 1) * sizeof(double))
    if p == NULL:
        raise MemoryError(f"cybn: cannot allocate {n_doubles} doubles of scratch")
    return p


# ---------------------------------------------------------------------------
# Typed dispatch to the C loops.

cdef inline void planar_sums(const floating *x, Py_ssize_t batch_stride,
                             Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,
                             double shift, double *s, double *q) noexcept nogil:
    if floating is float:
        planar_sums_f32(x, batch_stride, n_spatial, begin, end, shift, s, q)
    else:
        planar_sums_f64(x, batch_stride, n_spatial, begin, end, shift, s, q)


cdef inline void planar_grad_sums(const floating *dy, Py_ssize_t dy_stride,
                                  const floating *x, Py_ssize_t x_stride,
                                  Py_ssize_t n_spatial, Py_ssize_t begin, Py_ssize_t end,
                                  double mean, double *sum_dy,
                                  double *sum_dy_xmu) noexcept nogil:
    if floating is float:
        planar_grad_sums_f32(dy, dy_stride, x, x_stride, n_spatial, begin, end, mean,
                             sum_dy, sum_dy_xmu)
    else:
        planar_grad_sums_f64(dy, dy_stride, x, x_stride, n_spatial, begin, end, mean,
                             sum_dy, sum_dy_xmu)


cdef inline void planar_affine(const floating *x, Py_ssize_t x_stride, floating *y,
                               Py_ssize_t y_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
                               Py_ssize_t end, double mean, double scale,
                               double shift) noexcept nogil:
    if floating is float:
        planar_affine_f32(x, x_stride, y, y_stride, n_spatial, begin, end, mean, scale, shift)
    else:
        planar_affine_f64(x, x_stride, y, y_stride, n_spatial, begin, end, mean, scale, shift)


cdef inline void planar_grad_input(const floating *dy, Py_ssize_t dy_stride,
                                   const floating *x, Py_ssize_t x_stride, floating *dx,
                                   Py_ssize_t dx_stride, Py_ssize_t n_spatial,
                                   Py_ssize_t begin, Py_ssize_t end, double mean,
                                   double dy_shift, double x_coef,
                                   double scale) noexcept nogil:
    if floating is float:
        planar_grad_input_f32(dy, dy_stride, x, x_stride, dx, dx_stride, n_spatial,
                              begin, end, mean, dy_shift, x_coef, scale)
    else:
        planar_grad_input_f64(dy, dy_stride, x, x_stride, dx, dx_stride, n_spatial,
                              begin, end, mean, dy_shift, x_coef, scale)


cdef inline void rows_sums(const floating *x, Py_ssize_t row_stride, Py_ssize_t n_channels,
                           Py_ssize_t begin, Py_ssize_t end, const double *shift,
                           double *s, double *q) noexcept nogil:
    if floating is float:
        rows_sums_f32(x, row_stride, n_channels, begin, end, shift, s, q)
    else:
        rows_sums_f64(x, row_stride, n_channels, begin, end, shift, s, q)


cdef inline void rows_grad_sums(const floating *dy, Py_ssize_t dy_stride,
                                const floating *x, Py_ssize_t x_stride,
                                Py_ssize_t n_channels, Py_ssize_t begin, Py_ssize_t end,
                                const double *mean, double *sum_dy,
                                double *sum_dy_xmu) noexcept nogil:
    if floating is float:
        rows_grad_sums_f32(dy, dy_stride, x, x_stride, n_channels, begin, end, mean,
                           sum_dy, sum_dy_xmu)
    else:
        rows_grad_sums_f64(dy, dy_stride, x, x_stride, n_channels, begin, end, mean,
                           sum_dy, sum_dy_xmu)


cdef inline void rows_affine(const floating *x, Py_ssize_t x_stride, floating *y,
                             Py_ssize_t y_stride, Py_ssize_t n_channels, Py_ssize_t begin,
                             Py_ssize_t end, const double *mean, const double *scale,
                             const double *shift) noexcept nogil:
    if floating is float:
        rows_affine_f32(x, x_stride, y, y_stride, n_channels, begin, end, mean, scale, shift)
    else:
        rows_affine_f64(x, x_stride, y, y_stride, n_channels, begin, end, mean, scale, shift)


cdef inline void rows_grad_input(const floating *dy, Py_ssize_t dy_stride,
                                 const floating *x, Py_ssize_t x_stride, floating *dx,
                                 Py_ssize_t dx_stride, Py_ssize_t n_channels,
                                 Py_ssize_t begin, Py_ssize_t end, const double *mean,
                                 const double *dy_shift, const double *x_coef,
                                 const double *scale) noexcept nogil:
    if floating is float:
        rows_grad_input_f32(dy, dy_stride, x, x_stride, dx, dx_stride, n_channels, begin,
                            end, mean, dy_shift, x_coef, scale)
    else:
        rows_grad_input_f64(dy, dy_stride, x, x_stride, dx, dx_stride, n_channels, begin,
                            end, mean, dy_shift, x_coef, scale)


# ---------------------------------------------------------------------------
# Statistics.  Sums are taken of x - shift, shift being the channel's first
# value: a constant channel then gives exactly s = 0, mean = shift and M2 = 0,
# and an offset such as 1e6 + N(0, 1) costs no precision.  For float32 data
# one pass suffices: as the shift is a sample of the channel, the cancellation
# in q - s^2/count costs at most ~count * 2^-53 relative, far below float32's
# 2^-24.  float64 data gets a second pass about the mean (the corrected
# two-pass algorithm), to keep float64's own precision.

cdef void channel_moments(const floating *x, Py_ssize_t batch_stride,
                          Py_ssize_t n_spatial, Py_ssize_t count, double *mean,
                          double *m2) noexcept nogil:
    """mean and M2 of one planar channel, in one task."""
    cdef double s = 0.0, q = 0.0
    planar_sums(x, batch_stride, n_spatial, 0, count, x[0], &s, &q)
    mean[0] = x[0] + s / count
    if floating is double:
        s = 0.0
        q = 0.0
        planar_sums(x, batch_stride, n_spatial, 0, count, mean[0], &s, &q)
    m2[0] = centered_m2(s, q, count)


cdef void planar_moments(const floating *x, Py_ssize_t batch_stride,
                         Py_ssize_t channel_stride, Py_ssize_t n_channels,
                         Py_ssize_t n_spatial, Py_ssize_t count, Py_ssize_t n_parts,
                         double *partial, double *mean, double *m2,
                         int n_threads) noexcept nogil:
    """mean and M2 of every planar channel, n_parts tasks per channel;
    partial holds 2 * n_channels * n_parts doubles."""
    cdef Py_ssize_t task, c, p, n_passes = 2 if floating is double else 1, pass_
    cdef double s, q
    for c in range(n_channels):
        mean[c] = x[c * channel_stride]  # the first pass's shift
    for pass_ in range(n_passes):
        for task in prange(n_channels * n_parts, schedule='static', num_threads=n_threads):
            c = task // n_parts
            p = task % n_parts
            partial[2 * task] = 0.0
            partial[2 * task + 1] = 0.0
            planar_sums(x + c * channel_stride, batch_stride, n_spatial,
                        part_start(p, n_parts, count), part_start(p + 1, n_parts, count),
                        mean[c], &partial[2 * task], &partial[2 * task + 1])
        for c in range(n_channels):
            s = 0.0
            q = 0.0
            for p in range(n_parts):
                s = s + partial[2 * (c * n_parts + p)]
                q = q + partial[2 * (c * n_parts + p) + 1]
            if pass_ == 0:
                mean[c] = mean[c] + s / count
            m2[c] = centered_m2(s, q, count)


cdef void rows_moments(const floating *x, Py_ssize_t row_stride, Py_ssize_t n_rows,
                       Py_ssize_t n_channels, Py_ssize_t n_parts, double *partial,
                       double *mean, double *m2, int n_threads) noexcept nogil:
    """mean and M2 of every channel of rows data in n_parts row ranges;
    partial holds 2 * n_parts * n_channels doubles."""
    cdef Py_ssize_t p, c, n_passes = 2 if floating is double else 1, pass_
    cdef double *sums
    cdef double s, q
    for c in range(n_channels):
        mean[c] = x[c]  # the first pass's shift
    for pass_ in range(n_passes):
        for p in prange(n_parts, schedule='static', num_threads=n_threads):
            sums = partial + 2 * p * n_channels
            for c in range(2 * n_channels):
                sums[c] = 0.0
            rows_sums(x, row_stride, n_channels, part_start(p, n_parts, n_rows),
                      part_start(p + 1, n_parts, n_rows), mean, sums, sums + n_channels)
        for c in range(n_channels):
            s = 0.0
            q = 0.0
            for p in range(n_parts):
                s = s + partial[2 * p * n_channels + c]
                q = q + partial[(2 * p + 1) * n_channels + c]
            if pass_ == 0:
                mean[c] = mean[c] + s / n_rows
            m2[c] = centered_m2(s, q, n_rows)


cdef inline void training_grad_coefficients(double sum_dy, double sum_dy_xmu,
                                            double invstd, double count,
                                            double *dy_shift, double *x_coef) noexcept nogil:
    """dx = w*invstd*(dy - dbias/m - xhat*dweight/m)
          = w*invstd*((dy - dy_shift) - (x - mean)*x_coef)."""
    dy_shift[0] = sum_dy / count
    x_coef[0] = invstd * invstd * sum_dy_xmu / count


# ---------------------------------------------------------------------------
# Element-wise passes over all tasks.

cdef void planar_affine_all(const floating *x, Py_ssize_t x_bs, Py_ssize_t x_cs,
                            floating *y, Py_ssize_t y_bs, Py_ssize_t y_cs,
                            Py_ssize_t n_channels, Py_ssize_t n_spatial, Py_ssize_t count,
                            Py_ssize_t n_parts, const double *mean, const double *scale,
                            const double *shift, int n_threads) noexcept nogil:
    cdef Py_ssize_t task, c, p
    for task in prange(n_channels * n_parts, schedule='static', num_threads=n_threads):
        c = task // n_parts
        p = task % n_parts
        planar_affine(x + c * x_cs, x_bs, y + c * y_cs, y_bs, n_spatial,
                      part_start(p, n_parts, count), part_start(p + 1, n_parts, count),
                      mean[c], scale[c], shift[c])


cdef void planar_grad_input_all(const floating *dy, Py_ssize_t dy_bs, Py_ssize_t dy_cs,
                                const floating *x, Py_ssize_t x_bs, Py_ssize_t x_cs,
                                floating *dx, Py_ssize_t dx_bs, Py_ssize_t dx_cs,
                                Py_ssize_t n_channels, Py_ssize_t n_spatial,
                                Py_ssize_t count, Py_ssize_t n_parts, const double *mean,
                                const double *dy_shift, const double *x_coef,
                                const double *scale, int n_threads) noexcept nogil:
    cdef Py_ssize_t task, c, p
    for task in prange(n_channels * n_parts, schedule='static', num_threads=n_threads):
        c = task // n_parts
        p = task % n_parts
        planar_grad_input(dy + c * dy_cs, dy_bs, x + c * x_cs, x_bs, dx + c * dx_cs, dx_bs,
                          n_spatial, part_start(p, n_parts, count),
                          part_start(p + 1, n_parts, count), mean[c], dy_shift[c],
                          x_coef[c], scale[c])


cdef void rows_affine_all(const floating *x, Py_ssize_t x_stride, floating *y,
                          Py_ssize_t y_stride, Py_ssize_t n_rows, Py_ssize_t n_channels,
                          const double *mean, const double *scale, const double *shift,
                          int n_threads) noexcept nogil:
    cdef Py_ssize_t p, n_parts = rows_parts(n_rows)
    for p in prange(n_parts, schedule='static', num_threads=n_threads):
        rows_affine(x, x_stride, y, y_stride, n_channels, part_start(p, n_parts, n_rows),
                    part_start(p + 1, n_parts, n_rows), mean, scale, shift)


cdef void rows_grad_input_all(const floating *dy, Py_ssize_t dy_stride, const floating *x,
                              Py_ssize_t x_stride, floating *dx, Py_ssize_t dx_stride,
                              Py_ssize_t n_rows, Py_ssize_t n_channels, const double *mean,
                              const double *dy_shift, const double *x_coef,
                              const double *scale, int n_threads) noexcept nogil:
    cdef Py_ssize_t p, n_parts = rows_parts(n_rows)
    for p in prange(n_parts, schedule='static', num_threads=n_threads):
        rows_grad_input(dy, dy_stride, x, x_stride, dx, dx_stride, n_channels,
                        part_start(p, n_parts, n_rows), part_start(p + 1, n_parts, n_rows),
                        mean, dy_shift, x_coef, scale)


# ---------------------------------------------------------------------------
# The kernels cybn._api calls.  Stride arguments are in elements.

def forward_train_planar(const floating[:, :, :] x, floating[:, :, :] y,
                         const double[::1] weight, const double[::1] bias, double eps,
                         double[::1] mean, double[::1] var, double[::1] invstd):
    """y = (x - mean)*invstd*weight + bias with the batch statistics, which are
    written to mean, var (biased) and invstd."""
    cdef Py_ssize_t n_channels = x.shape[1], n_spatial = x.shape[2]
    cdef Py_ssize_t count = x.shape[0] * n_spatial
    cdef Py_ssize_t x_bs = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t x_cs = x.strides[1] // sizeof(floating)
    cdef Py_ssize_t y_bs = y.strides[0] // sizeof(floating)
    cdef Py_ssize_t y_cs = y.strides[1] // sizeof(floating)
    cdef Py_ssize_t n_parts = planar_parts(n_channels, count), c
    cdef int n_threads = threads_for(count * n_channels)
    cdef double *work = NULL
    if n_parts > 1:
        work = scratch(n_channels * (2 * n_parts + 1))
    try:
        with nogil:
            if n_parts == 1:
                # one task per channel: statistics, then y while x is in cache
                for c in prange(n_channels, schedule='static', num_threads=n_threads):
                    channel_moments(&x[0, c, 0], x_bs, n_spatial, count, &mean[c], &var[c])
                    var[c] = var[c] / count
                    invstd[c] = 1.0 / sqrt(var[c] + eps)
                    planar_affine(&x[0, c, 0], x_bs, &y[0, c, 0], y_bs, n_spatial, 0, count,
                                  mean[c], weight[c] * invstd[c], bias[c])
            else:
                planar_moments(&x[0, 0, 0], x_bs, x_cs, n_channels, n_spatial, count,
                               n_parts, work, &mean[0], &var[0], n_threads)
                for c in range(n_channels):
                    var[c] = var[c] / count
                    invstd[c] = 1.0 / sqrt(var[c] + eps)
                    work[c] = weight[c] * invstd[c]
                planar_affine_all(&x[0, 0, 0], x_bs, x_cs, &y[0, 0, 0], y_bs, y_cs,
                                  n_channels, n_spatial, count, n_parts, &mean[0], work,
                                  &bias[0], n_threads)
    finally:
        free(work)


def forward_train_rows(const floating[:, :] x, floating[:, :] y,
                       const double[::1] weight, const double[::1] bias, double eps,
                       double[::1] mean, double[::1] var, double[::1] invstd):
    """forward_train_planar for the rows layout."""
    cdef Py_ssize_t n_rows = x.shape[0], n_channels = x.shape[1]
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t y_stride = y.strides[0] // sizeof(floating)
    cdef Py_ssize_t n_parts = rows_parts(n_rows), c
    cdef int n_threads = threads_for(n_rows * n_channels)
    cdef double *work = scratch(n_channels * (2 * n_parts + 1))
    try:
        with nogil:
            rows_moments(&x[0, 0], x_stride, n_rows, n_channels, n_parts, work,
                         &mean[0], &var[0], n_threads)
            for c in range(n_channels):
                var[c] = var[c] / n_rows
                invstd[c] = 1.0 / sqrt(var[c] + eps)
                work[c] = weight[c] * invstd[c]
            rows_affine_all(&x[0, 0], x_stride, &y[0, 0], y_stride, n_rows, n_channels,
                            &mean[0], work, &bias[0], n_threads)
    finally:
        free(work)


def backward_planar(const floating[:, :, :] dy, const floating[:, :, :] x,
                    floating[:, :, :] dx, const double[::1] mean,
                    const double[::1] invstd, const double[::1] weight, bint training,
                    double[::1] sum_dy, double[::1] sum_dy_xmu):
    """dx, and the sums behind dbias = sum_dy and dweight = sum_dy_xmu*invstd."""
    cdef Py_ssize_t n_channels = x.shape[1], n_spatial = x.shape[2]
    cdef Py_ssize_t count = x.shape[0] * n_spatial
    cdef Py_ssize_t dy_bs = dy.strides[0] // sizeof(floating)
    cdef Py_ssize_t dy_cs = dy.strides[1] // sizeof(floating)
    cdef Py_ssize_t x_bs = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t x_cs = x.strides[1] // sizeof(floating)
    cdef Py_ssize_t dx_bs = dx.strides[0] // sizeof(floating)
    cdef Py_ssize_t dx_cs = dx.strides[1] // sizeof(floating)
    cdef Py_ssize_t n_parts = planar_parts(n_channels, count), c
    cdef int n_threads = threads_for(count * n_channels)
    cdef double dy_shift, x_coef
    cdef double *work = NULL
    if n_parts > 1:
        work = scratch(n_channels * (2 * n_parts + 3))
    try:
        with nogil:
            if n_parts == 1:
                # one task per channel: sums, then dx while x and dy are in cache
                for c in prange(n_channels, schedule='static', num_threads=n_threads):
                    sum_dy[c] = 0.0
                    sum_dy_xmu[c] = 0.0
                    planar_grad_sums(&dy[0, c, 0], dy_bs, &x[0, c, 0], x_bs, n_spatial, 0,
                                     count, mean[c], &sum_dy[c], &sum_dy_xmu[c])
                    dy_shift = 0.0
                    x_coef = 0.0
                    if training:
                        training_grad_coefficients(sum_dy[c], sum_dy_xmu[c], invstd[c],
                                                   count, &dy_shift, &x_coef)
                    planar_grad_input(&dy[0, c, 0], dy_bs, &x[0, c, 0], x_bs, &dx[0, c, 0],
                                      dx_bs, n_spatial, 0, count, mean[c], dy_shift,
                                      x_coef, weight[c] * invstd[c])
            else:
                planar_grad_sums_all(&dy[0, 0, 0], dy_bs, dy_cs, &x[0, 0, 0], x_bs, x_cs,
                                     n_channels, n_spatial, count, n_parts, &mean[0], work,
                                     &sum_dy[0], &sum_dy_xmu[0], n_threads)
                grad_coefficients(n_channels, count, training, &sum_dy[0], &sum_dy_xmu[0],
                                  &invstd[0], &weight[0], work, work + n_channels,
                                  work + 2 * n_channels)
                planar_grad_input_all(&dy[0, 0, 0], dy_bs, dy_cs, &x[0, 0, 0], x_bs, x_cs,
                                      &dx[0, 0, 0], dx_bs, dx_cs, n_channels, n_spatial,
                                      count, n_parts, &mean[0], work, work + n_channels,
                                      work + 2 * n_channels, n_threads)
    finally:
        free(work)


def backward_rows(const floating[:, :] dy, const floating[:, :] x, floating[:, :] dx,
                  const double[::1] mean, const double[::1] invstd,
                  const double[::1] weight, bint training, double[::1] sum_dy,
                  double[::1] sum_dy_xmu):
    """backward_planar for the rows layout."""
    cdef Py_ssize_t n_rows = x.shape[0], n_channels = x.shape[1]
    cdef Py_ssize_t dy_stride = dy.strides[0] // sizeof(floating)
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t dx_stride = dx.strides[0] // sizeof(floating)
    cdef Py_ssize_t n_parts = rows_parts(n_rows)
    cdef int n_threads = threads_for(n_rows * n_channels)
    cdef double *work = scratch(n_channels * (2 * n_parts + 3))
    try:
        with nogil:
            rows_grad_sums_all(&dy[0, 0], dy_stride, &x[0, 0], x_stride, n_rows, n_channels,
                               n_parts, &mean[0], work, &sum_dy[0], &sum_dy_xmu[0],
                               n_threads)
            grad_coefficients(n_channels, n_rows, training, &sum_dy[0], &sum_dy_xmu[0],
                              &invstd[0], &weight[0], work, work + n_channels,
                              work + 2 * n_channels)
            rows_grad_input_all(&dy[0, 0], dy_stride, &x[0, 0], x_stride, &dx[0, 0],
                                dx_stride, n_rows, n_channels, &mean[0], work,
                                work + n_channels, work + 2 * n_channels, n_threads)
    finally:
        free(work)


cdef void grad_coefficients(Py_ssize_t n_channels, Py_ssize_t count, bint training,
                            const double *sum_dy, const double *sum_dy_xmu,
                            const double *invstd, const double *weight, double *dy_shift,
                            double *x_coef, double *scale) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(n_channels):
        dy_shift[c] = 0.0
        x_coef[c] = 0.0
        if training:
            training_grad_coefficients(sum_dy[c], sum_dy_xmu[c], invstd[c], count,
                                       &dy_shift[c], &x_coef[c])
        scale[c] = weight[c] * invstd[c]


cdef void planar_grad_sums_all(const floating *dy, Py_ssize_t dy_bs, Py_ssize_t dy_cs,
                               const floating *x, Py_ssize_t x_bs, Py_ssize_t x_cs,
                               Py_ssize_t n_channels, Py_ssize_t n_spatial,
                               Py_ssize_t count, Py_ssize_t n_parts, const double *mean,
                               double *partial, double *sum_dy, double *sum_dy_xmu,
                               int n_threads) noexcept nogil:
    """Gradient sums of every planar channel in n_parts tasks per channel;
    partial holds 2 * n_channels * n_parts doubles."""
    cdef Py_ssize_t task, c, p
    for task in prange(n_channels * n_parts, schedule='static', num_threads=n_threads):
        c = task // n_parts
        p = task % n_parts
        partial[2 * task] = 0.0
        partial[2 * task + 1] = 0.0
        planar_grad_sums(dy + c * dy_cs, dy_bs, x + c * x_cs, x_bs, n_spatial,
                         part_start(p, n_parts, count), part_start(p + 1, n_parts, count),
                         mean[c], &partial[2 * task], &partial[2 * task + 1])
    for c in range(n_channels):
        sum_dy[c] = 0.0
        sum_dy_xmu[c] = 0.0
        for p in range(n_parts):
            sum_dy[c] = sum_dy[c] + partial[2 * (c * n_parts + p)]
            sum_dy_xmu[c] = sum_dy_xmu[c] + partial[2 * (c * n_parts + p) + 1]


cdef void rows_grad_sums_all(const floating *dy, Py_ssize_t dy_stride, const floating *x,
                             Py_ssize_t x_stride, Py_ssize_t n_rows, Py_ssize_t n_channels,
                             Py_ssize_t n_parts, const double *mean, double *partial,
                             double *sum_dy, double *sum_dy_xmu,
                             int n_threads) noexcept nogil:
    """Gradient sums of rows data in n_parts row ranges; partial holds
    2 * n_parts * n_channels doubles."""
    cdef Py_ssize_t p, c
    cdef double *sums
    for p in prange(n_parts, schedule='static', num_threads=n_threads):
        sums = partial + 2 * p * n_channels
        for c in range(2 * n_channels):
            sums[c] = 0.0
        rows_grad_sums(dy, dy_stride, x, x_stride, n_channels,
                       part_start(p, n_parts, n_rows), part_start(p + 1, n_parts, n_rows),
                       mean, sums, sums + n_channels)
    for c in range(n_channels):
        sum_dy[c] = 0.0
        sum_dy_xmu[c] = 0.0
        for p in range(n_parts):
            sum_dy[c] = sum_dy[c] + partial[2 * p * n_channels + c]
            sum_dy_xmu[c] = sum_dy_xmu[c] + partial[(2 * p + 1) * n_channels + c]


def update_running(floating[::1] running_mean, floating[::1] running_var,
                   const double[::1] mean, const double[::1] var, Py_ssize_t count,
                   double momentum):
    """running <- (1 - momentum)*running + momentum*batch, the variance unbiased
    by count/(count - 1).  Returns False, changing nothing, when a batch
    statistic is not finite in the dtype (NaN, Inf, or beyond its range)."""
    cdef Py_ssize_t c, n_channels = mean.shape[0]
    cdef double largest = 3.4028234663852886e38 if floating is float else 1.7976931348623157e308
    cdef double unbias = <double>count / (count - 1)
    for c in range(n_channels):
        # written so that NaN fails the test
        if not (-largest <= mean[c] <= largest and var[c] * unbias <= largest):
            return False
    for c in range(n_channels):
        running_mean[c] = <floating>((1.0 - momentum) * running_mean[c] + momentum * mean[c])
        running_var[c] = <floating>((1.0 - momentum) * running_var[c]
                                    + momentum * (var[c] * unbias))
    return True


# ---------------------------------------------------------------------------
# Split kernels, one step each, for callers that combine statistics or
# gradient sums across processes between the steps.

def moments_planar(const floating[:, :, :] x, double[::1] mean, double[::1] m2):
    cdef Py_ssize_t n_channels = x.shape[1], n_spatial = x.shape[2]
    cdef Py_ssize_t count = x.shape[0] * n_spatial
    cdef Py_ssize_t n_parts = planar_parts(n_channels, count)
    cdef double *work = scratch(2 * n_channels * n_parts)
    try:
        with nogil:
            planar_moments(&x[0, 0, 0], x.strides[0] // sizeof(floating),
                           x.strides[1] // sizeof(floating), n_channels, n_spatial, count,
                           n_parts, work, &mean[0], &m2[0], threads_for(count * n_channels))
    finally:
        free(work)


def moments_rows(const floating[:, :] x, double[::1] mean, double[::1] m2):
    cdef Py_ssize_t n_rows = x.shape[0], n_channels = x.shape[1]
    cdef Py_ssize_t n_parts = rows_parts(n_rows)
    cdef double *work = scratch(2 * n_channels * n_parts)
    try:
        with nogil:
            rows_moments(&x[0, 0], x.strides[0] // sizeof(floating), n_rows, n_channels,
                         n_parts, work, &mean[0], &m2[0], threads_for(n_rows * n_channels))
    finally:
        free(work)


def affine_planar(const floating[:, :, :] x, floating[:, :, :] y,
                  const double[::1] mean, const double[::1] scale, const double[::1] shift):
    """y = (x - mean)*scale + shift, per channel."""
    cdef Py_ssize_t n_channels = x.shape[1], n_spatial = x.shape[2]
    cdef Py_ssize_t count = x.shape[0] * n_spatial
    with nogil:
        planar_affine_all(&x[0, 0, 0], x.strides[0] // sizeof(floating),
                          x.strides[1] // sizeof(floating), &y[0, 0, 0],
                          y.strides[0] // sizeof(floating), y.strides[1] // sizeof(floating),
                          n_channels, n_spatial, count, planar_parts(n_channels, count),
                          &mean[0], &scale[0], &shift[0], threads_for(count * n_channels))


def affine_rows(const floating[:, :] x, floating[:, :] y,
                const double[::1] mean, const double[::1] scale, const double[::1] shift):
    with nogil:
        rows_affine_all(&x[0, 0], x.strides[0] // sizeof(floating), &y[0, 0],
                        y.strides[0] // sizeof(floating), x.shape[0], x.shape[1], &mean[0],
                        &scale[0], &shift[0], threads_for(x.shape[0] * x.shape[1]))


def grad_sums_planar(const floating[:, :, :] dy, const floating[:, :, :] x,
                     const double[::1] mean, double[::1] sum_dy, double[::1] sum_dy_xmu):
    cdef Py_ssize_t n_channels = x.shape[1], n_spatial = x.shape[2]
    cdef Py_ssize_t count = x.shape[0] * n_spatial
    cdef Py_ssize_t n_parts = planar_parts(n_channels, count)
    cdef double *work = scratch(2 * n_channels * n_parts)
    try:
        with nogil:
            planar_grad_sums_all(&dy[0, 0, 0], dy.strides[0] // sizeof(floating),
                                 dy.strides[1] // sizeof(floating), &x[0, 0, 0],
                                 x.strides[0] // sizeof(floating),
                                 x.strides[1] // sizeof(floating), n_channels, n_spatial,
                                 count, n_parts, &mean[0], work, &sum_dy[0], &sum_dy_xmu[0],
                                 threads_for(count * n_channels))
    finally:
        free(work)


def grad_sums_rows(const floating[:, :] dy, const floating[:, :] x,
                   const double[::1] mean, double[::1] sum_dy, double[::1] sum_dy_xmu):
    cdef Py_ssize_t n_rows = x.shape[0], n_channels = x.shape[1]
    cdef Py_ssize_t n_parts = rows_parts(n_rows)
    cdef double *work = scratch(2 * n_channels * n_parts)
    try:
        with nogil:
            rows_grad_sums_all(&dy[0, 0], dy.strides[0] // sizeof(floating), &x[0, 0],
                               x.strides[0] // sizeof(floating), n_rows, n_channels, n_parts,
                               &mean[0], work, &sum_dy[0], &sum_dy_xmu[0],
                               threads_for(n_rows * n_channels))
    finally:
        free(work)


def grad_input_planar(const floating[:, :, :] dy, const floating[:, :, :] x,
                      floating[:, :, :] dx, const double[::1] mean,
                      const double[::1] dy_shift, const double[::1] x_coef,
                      const double[::1] scale):
    """dx = ((dy - dy_shift) - (x - mean)*x_coef)*scale, per channel."""
    cdef Py_ssize_t n_channels = x.shape[1], n_spatial = x.shape[2]
    cdef Py_ssize_t count = x.shape[0] * n_spatial
    with nogil:
        planar_grad_input_all(&dy[0, 0, 0], dy.strides[0] // sizeof(floating),
                              dy.strides[1] // sizeof(floating), &x[0, 0, 0],
                              x.strides[0] // sizeof(floating),
                              x.strides[1] // sizeof(floating), &dx[0, 0, 0],
                              dx.strides[0] // sizeof(floating),
                              dx.strides[1] // sizeof(floating), n_channels, n_spatial,
                              count, planar_parts(n_channels, count), &mean[0],
                              &dy_shift[0], &x_coef[0], &scale[0],
                              threads_for(count * n_channels))


def grad_input_rows(const floating[:, :] dy, const floating[:, :] x, floating[:, :] dx,
                    const double[::1] mean, const double[::1] dy_shift,
                    const double[::1] x_coef, const double[::1] scale):
    with nogil:
        rows_grad_input_all(&dy[0, 0], dy.strides[0] // sizeof(floating), &x[0, 0],
                            x.strides[0] // sizeof(floating), &dx[0, 0],
                            dx.strides[0] // sizeof(floating), x.shape[0], x.shape[1],
                            &mean[0], &dy_shift[0], &x_coef[0], &scale[0],
                            threads_for(x.shape[0] * x.shape[1]))
