# cython: language_level=3
"""The typed kernels of cybn: loops and nothing else.

Every function here trusts its arguments; cybn._api checks them first.  Data
arrives in one of two layouts, both views of the caller's memory (declared as
strided memoryviews, since `::1` would demand a wholly C-contiguous buffer;
the unit inner stride is guaranteed by cybn._api):

- "planar": (N, C, S) with unit stride along S (NCHW and its relatives);
  a channel is N runs of S contiguous values.
- "rows": (R, C) with unit stride along C ((N, C) batches, N×C×1×1 and
  channels-last data); a channel is a column, so loops vectorize across a
  block of CYBN_BLOCK channels and each thread owns whole blocks.

Channels (or channel blocks) are split across OpenMP threads and every sum of
a channel runs inside one iteration, in a fixed order: results are bitwise
identical for any number of threads.  All statistics and gradient sums are
accumulated in float64, whatever the data type.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt

cdef extern from "_loops.h" nogil:
    enum: CYBN_BLOCK
    int cybn_max_threads()
    void shifted_sums_f32 "cybn_shifted_sums_f32"(
        const float *x, Py_ssize_t n, double shift, double *sum, double *sumsq)
    void shifted_sums_f64 "cybn_shifted_sums_f64"(
        const double *x, Py_ssize_t n, double shift, double *sum, double *sumsq)
    void grad_sums_f32 "cybn_grad_sums_f32"(
        const float *dy, const float *x, Py_ssize_t n, double mean,
        double *sum_dy, double *sum_dy_xmu)
    void grad_sums_f64 "cybn_grad_sums_f64"(
        const double *dy, const double *x, Py_ssize_t n, double mean,
        double *sum_dy, double *sum_dy_xmu)
    void affine_f32 "cybn_affine_f32"(
        const float *x, float *y, Py_ssize_t n, double mean, double scale, double shift)
    void affine_f64 "cybn_affine_f64"(
        const double *x, double *y, Py_ssize_t n, double mean, double scale, double shift)
    void grad_input_f32 "cybn_grad_input_f32"(
        const float *dy, const float *x, float *dx, Py_ssize_t n, double mean,
        double dy_shift, double x_coef, double scale)
    void grad_input_f64 "cybn_grad_input_f64"(
        const double *dy, const double *x, double *dx, Py_ssize_t n, double mean,
        double dy_shift, double x_coef, double scale)
    void rows_shifted_sums_f32 "cybn_rows_shifted_sums_f32"(
        const float *x, Py_ssize_t n_rows, Py_ssize_t row_stride, Py_ssize_t width,
        const double *shift, double *sum, double *sumsq)
    void rows_shifted_sums_f64 "cybn_rows_shifted_sums_f64"(
        const double *x, Py_ssize_t n_rows, Py_ssize_t row_stride, Py_ssize_t width,
        const double *shift, double *sum, double *sumsq)
    void rows_grad_sums_f32 "cybn_rows_grad_sums_f32"(
        const float *dy, Py_ssize_t dy_stride, const float *x, Py_ssize_t x_stride,
        Py_ssize_t n_rows, Py_ssize_t width, const double *mean,
        double *sum_dy, double *sum_dy_xmu)
    void rows_grad_sums_f64 "cybn_rows_grad_sums_f64"(
        const double *dy, Py_ssize_t dy_stride, const double *x, Py_ssize_t x_stride,
        Py_ssize_t n_rows, Py_ssize_t width, const double *mean,
        double *sum_dy, double *sum_dy_xmu)
    void rows_affine_f32 "cybn_rows_affine_f32"(
        const float *x, Py_ssize_t x_stride, float *y, Py_ssize_t y_stride,
        Py_ssize_t n_rows, Py_ssize_t width, const double *mean, const double *scale,
        const double *shift)
    void rows_affine_f64 "cybn_rows_affine_f64"(
        const double *x, Py_ssize_t x_stride, double *y, Py_ssize_t y_stride,
        Py_ssize_t n_rows, Py_ssize_t width, const double *mean, const double *scale,
        const double *shift)
    void rows_grad_input_f32 "cybn_rows_grad_input_f32"(
        const float *dy, Py_ssize_t dy_stride, const float *x, Py_ssize_t x_stride,
        float *dx, Py_ssize_t dx_stride, Py_ssize_t n_rows, Py_ssize_t width,
        const double *mean, const double *dy_shift, const double *x_coef,
        const double *scale)
    void rows_grad_input_f64 "cybn_rows_grad_input_f64"(
        const double *dy, Py_ssize_t dy_stride, const double *x, Py_ssize_t x_stride,
        double *dx, Py_ssize_t dx_stride, Py_ssize_t n_rows, Py_ssize_t width,
        const double *mean, const double *dy_shift, const double *x_coef,
        const double *scale)


# Below this many elements a parallel region costs more than it saves.
cdef Py_ssize_t SERIAL_BELOW = 1 << 15


cdef inline int n_threads_for(Py_ssize_t n_elements) noexcept nogil:
    return 1 if n_elements < SERIAL_BELOW else cybn_max_threads()


def max_threads():
    """The number of threads a large kernel uses now (OpenMP's current limit)."""
    return cybn_max_threads()


# ---------------------------------------------------------------------------
# Per-channel building blocks, "planar" layout: n_batch runs of n_spatial
# contiguous values, batch_stride elements apart.

cdef inline void planar_moments(const floating *x, Py_ssize_t n_batch,
                                Py_ssize_t batch_stride, Py_ssize_t n_spatial,
                                double *mean, double *m2) noexcept nogil:
    """mean and M2 = sum((x - mean)^2) of one channel."""
    cdef double count = <double>n_batch * <double>n_spatial
    # Sums are taken of x - shift, shift being a value of the channel: a
    # constant channel then gives exactly sum = 0, mean = shift and M2 = 0, and
    # an offset such as 1e6 + N(0, 1) costs no precision.
    cdef double shift = x[0], s = 0.0, q = 0.0, mu
    cdef Py_ssize_t n
    for n in range(n_batch):
        if floating is float:
            shifted_sums_f32(x + n * batch_stride, n_spatial, shift, &s, &q)
        else:
            shifted_sums_f64(x + n * batch_stride, n_spatial, shift, &s, &q)
    mu = shift + s / count
    if floating is double:
        # float64 data: a second pass about the mean (the corrected two-pass
        # algorithm), so M2 keeps float64's full precision.  For float32 data
        # the single pass suffices: as shift is a sample, the cancellation in
        # q - s^2/count costs at most ~count * 2^-53 relative, far below 2^-24.
        s = 0.0
        q = 0.0
        for n in range(n_batch):
            shifted_sums_f64(x + n * batch_stride, n_spatial, mu, &s, &q)
    mean[0] = mu
    m2[0] = max(q - s * s / count, 0.0)


cdef inline void planar_affine(const floating *x, Py_ssize_t x_stride, floating *y,
                               Py_ssize_t y_stride, Py_ssize_t n_batch,
                               Py_ssize_t n_spatial, double mean, double scale,
                               double shift) noexcept nogil:
    cdef Py_ssize_t n
    for n in range(n_batch):
        if floating is float:
            affine_f32(x + n * x_stride, y + n * y_stride, n_spatial, mean, scale, shift)
        else:
            affine_f64(x + n * x_stride, y + n * y_stride, n_spatial, mean, scale, shift)


cdef inline void planar_grad_sums(const floating *dy, Py_ssize_t dy_stride,
                                  const floating *x, Py_ssize_t x_stride,
                                  Py_ssize_t n_batch, Py_ssize_t n_spatial, double mean,
                                  double *sum_dy, double *sum_dy_xmu) noexcept nogil:
    cdef Py_ssize_t n
    sum_dy[0] = 0.0
    sum_dy_xmu[0] = 0.0
    for n in range(n_batch):
        if floating is float:
            grad_sums_f32(dy + n * dy_stride, x + n * x_stride, n_spatial, mean,
                          sum_dy, sum_dy_xmu)
        else:
            grad_sums_f64(dy + n * dy_stride, x + n * x_stride, n_spatial, mean,
                          sum_dy, sum_dy_xmu)


cdef inline void planar_grad_input(const floating *dy, Py_ssize_t dy_stride,
                                   const floating *x, Py_ssize_t x_stride,
                                   floating *dx, Py_ssize_t dx_stride,
                                   Py_ssize_t n_batch, Py_ssize_t n_spatial, double mean,
                                   double dy_shift, double x_coef,
                                   double scale) noexcept nogil:
    cdef Py_ssize_t n
    for n in range(n_batch):
        if floating is float:
            grad_input_f32(dy + n * dy_stride, x + n * x_stride, dx + n * dx_stride,
                           n_spatial, mean, dy_shift, x_coef, scale)
        else:
            grad_input_f64(dy + n * dy_stride, x + n * x_stride, dx + n * dx_stride,
                           n_spatial, mean, dy_shift, x_coef, scale)


# Per-block building blocks, "rows" layout: n_rows rows of `width` contiguous
# channels (width <= CYBN_BLOCK), row_stride elements apart.

cdef inline void rows_moments(const floating *x, Py_ssize_t n_rows, Py_ssize_t row_stride,
                              Py_ssize_t width, double *mean, double *m2) noexcept nogil:
    """mean and M2 of `width` channels; the same algorithm as planar_moments."""
    cdef double count = <double>n_rows
    cdef double shift[CYBN_BLOCK]
    cdef double s[CYBN_BLOCK]
    cdef double q[CYBN_BLOCK]
    cdef Py_ssize_t j
    for j in range(width):
        shift[j] = x[j]
        s[j] = 0.0
        q[j] = 0.0
    if floating is float:
        rows_shifted_sums_f32(x, n_rows, row_stride, width, shift, s, q)
    else:
        rows_shifted_sums_f64(x, n_rows, row_stride, width, shift, s, q)
    for j in range(width):
        mean[j] = shift[j] + s[j] / count
    if floating is double:
        for j in range(width):
            s[j] = 0.0
            q[j] = 0.0
        rows_shifted_sums_f64(x, n_rows, row_stride, width, mean, s, q)
    for j in range(width):
        m2[j] = max(q[j] - s[j] * s[j] / count, 0.0)


cdef inline void rows_affine(const floating *x, Py_ssize_t x_stride, floating *y,
                             Py_ssize_t y_stride, Py_ssize_t n_rows, Py_ssize_t width,
                             const double *mean, const double *scale,
                             const double *shift) noexcept nogil:
    if floating is float:
        rows_affine_f32(x, x_stride, y, y_stride, n_rows, width, mean, scale, shift)
    else:
        rows_affine_f64(x, x_stride, y, y_stride, n_rows, width, mean, scale, shift)


cdef inline void rows_grad_sums(const floating *dy, Py_ssize_t dy_stride,
                                const floating *x, Py_ssize_t x_stride, Py_ssize_t n_rows,
                                Py_ssize_t width, const double *mean, double *sum_dy,
                                double *sum_dy_xmu) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(width):
        sum_dy[j] = 0.0
        sum_dy_xmu[j] = 0.0
    if floating is float:
        rows_grad_sums_f32(dy, dy_stride, x, x_stride, n_rows, width, mean,
                           sum_dy, sum_dy_xmu)
    else:
        rows_grad_sums_f64(dy, dy_stride, x, x_stride, n_rows, width, mean,
                           sum_dy, sum_dy_xmu)


cdef inline void rows_grad_input(const floating *dy, Py_ssize_t dy_stride,
                                 const floating *x, Py_ssize_t x_stride, floating *dx,
                                 Py_ssize_t dx_stride, Py_ssize_t n_rows, Py_ssize_t width,
                                 const double *mean, const double *dy_shift,
                                 const double *x_coef, const double *scale) noexcept nogil:
    if floating is float:
        rows_grad_input_f32(dy, dy_stride, x, x_stride, dx, dx_stride, n_rows, width,
                            mean, dy_shift, x_coef, scale)
    else:
        rows_grad_input_f64(dy, dy_stride, x, x_stride, dx, dx_stride, n_rows, width,
                            mean, dy_shift, x_coef, scale)


cdef inline void training_grad_coefficients(double sum_dy, double sum_dy_xmu,
                                            double invstd, double count,
                                            double *dy_shift, double *x_coef) noexcept nogil:
    """dx = w*invstd*(dy - dbias/m - xhat*dweight/m)
          = w*invstd*((dy - dy_shift) - (x - mean)*x_coef)."""
    dy_shift[0] = sum_dy / count
    x_coef[0] = invstd * invstd * sum_dy_xmu / count


# ---------------------------------------------------------------------------
# Fused kernels: each channel's statistics and its element-wise pass run in
# one iteration, while the channel's data is still in cache.

def forward_train_planar(const floating[:, :, :] x, floating[:, :, :] y,
                         const double[::1] weight, const double[::1] bias, double eps,
                         double[::1] mean, double[::1] var, double[::1] invstd):
    """y = (x - mean)*invstd*weight + bias with the batch statistics, which are
    written to mean, var (biased) and invstd."""
    cdef Py_ssize_t n_batch = x.shape[0], n_channels = x.shape[1], n_spatial = x.shape[2]
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t y_stride = y.strides[0] // sizeof(floating)
    cdef double count = <double>n_batch * <double>n_spatial
    cdef int n_threads = n_threads_for(n_batch * n_channels * n_spatial)
    cdef Py_ssize_t c
    with nogil:
        for c in prange(n_channels, schedule='static', num_threads=n_threads):
            planar_moments(&x[0, c, 0], n_batch, x_stride, n_spatial, &mean[c], &var[c])
            var[c] = var[c] / count
            invstd[c] = 1.0 / sqrt(var[c] + eps)
            planar_affine(&x[0, c, 0], x_stride, &y[0, c, 0], y_stride, n_batch,
                          n_spatial, mean[c], weight[c] * invstd[c], bias[c])


def forward_train_rows(const floating[:, :] x, floating[:, :] y,
                       const double[::1] weight, const double[::1] bias, double eps,
                       double[::1] mean, double[::1] var, double[::1] invstd,
                       double[::1] scale):
    """forward_train_planar for the rows layout; scale is (C,) scratch."""
    cdef Py_ssize_t n_rows = x.shape[0], n_channels = x.shape[1]
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t y_stride = y.strides[0] // sizeof(floating)
    cdef Py_ssize_t n_blocks = (n_channels + CYBN_BLOCK - 1) // CYBN_BLOCK
    cdef double count = <double>n_rows
    cdef int n_threads = n_threads_for(n_rows * n_channels)
    cdef Py_ssize_t block, first, width, c
    with nogil:
        for block in prange(n_blocks, schedule='static', num_threads=n_threads):
            first = block * CYBN_BLOCK
            width = min(CYBN_BLOCK, n_channels - first)
            rows_moments(&x[0, first], n_rows, x_stride, width, &mean[first], &var[first])
            for c in range(first, first + width):
                var[c] = var[c] / count
                invstd[c] = 1.0 / sqrt(var[c] + eps)
                scale[c] = weight[c] * invstd[c]
            rows_affine(&x[0, first], x_stride, &y[0, first], y_stride, n_rows, width,
                        &mean[first], &scale[first], &bias[first])


def backward_planar(const floating[:, :, :] dy, const floating[:, :, :] x,
                    floating[:, :, :] dx, const double[::1] mean,
                    const double[::1] invstd, const double[::1] weight, bint training,
                    double[::1] sum_dy, double[::1] sum_dy_xmu):
    """dx, and the sums behind dbias = sum_dy and dweight = sum_dy_xmu*invstd."""
    cdef Py_ssize_t n_batch = x.shape[0], n_channels = x.shape[1], n_spatial = x.shape[2]
    cdef Py_ssize_t dy_stride = dy.strides[0] // sizeof(floating)
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t dx_stride = dx.strides[0] // sizeof(floating)
    cdef double count = <double>n_batch * <double>n_spatial
    cdef int n_threads = n_threads_for(n_batch * n_channels * n_spatial)
    cdef double dy_shift, x_coef
    cdef Py_ssize_t c
    with nogil:
        for c in prange(n_channels, schedule='static', num_threads=n_threads):
            planar_grad_sums(&dy[0, c, 0], dy_stride, &x[0, c, 0], x_stride, n_batch,
                             n_spatial, mean[c], &sum_dy[c], &sum_dy_xmu[c])
            dy_shift = 0.0
            x_coef = 0.0
            if training:
                training_grad_coefficients(sum_dy[c], sum_dy_xmu[c], invstd[c], count,
                                           &dy_shift, &x_coef)
            planar_grad_input(&dy[0, c, 0], dy_stride, &x[0, c, 0], x_stride,
                              &dx[0, c, 0], dx_stride, n_batch, n_spatial, mean[c],
                              dy_shift, x_coef, weight[c] * invstd[c])


def backward_rows(const floating[:, :] dy, const floating[:, :] x,
                  floating[:, :] dx, const double[::1] mean, const double[::1] invstd,
                  const double[::1] weight, bint training, double[::1] sum_dy,
                  double[::1] sum_dy_xmu, double[::1] dy_shift, double[::1] x_coef,
                  double[::1] scale):
    """backward_planar for the rows layout; dy_shift, x_coef, scale are (C,) scratch."""
    cdef Py_ssize_t n_rows = x.shape[0], n_channels = x.shape[1]
    cdef Py_ssize_t dy_stride = dy.strides[0] // sizeof(floating)
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t dx_stride = dx.strides[0] // sizeof(floating)
    cdef Py_ssize_t n_blocks = (n_channels + CYBN_BLOCK - 1) // CYBN_BLOCK
    cdef double count = <double>n_rows
    cdef int n_threads = n_threads_for(n_rows * n_channels)
    cdef Py_ssize_t block, first, width, c
    with nogil:
        for block in prange(n_blocks, schedule='static', num_threads=n_threads):
            first = block * CYBN_BLOCK
            width = min(CYBN_BLOCK, n_channels - first)
            rows_grad_sums(&dy[0, first], dy_stride, &x[0, first], x_stride, n_rows,
                           width, &mean[first], &sum_dy[first], &sum_dy_xmu[first])
            for c in range(first, first + width):
                dy_shift[c] = 0.0
                x_coef[c] = 0.0
                if training:
                    training_grad_coefficients(sum_dy[c], sum_dy_xmu[c], invstd[c],
                                               count, &dy_shift[c], &x_coef[c])
                scale[c] = weight[c] * invstd[c]
            rows_grad_input(&dy[0, first], dy_stride, &x[0, first], x_stride,
                            &dx[0, first], dx_stride, n_rows, width, &mean[first],
                            &dy_shift[first], &x_coef[first], &scale[first])


# ---------------------------------------------------------------------------
# Split kernels, one step each, for callers that combine statistics or
# gradient sums across processes between the steps.

def moments_planar(const floating[:, :, :] x, double[::1] mean, double[::1] m2):
    cdef Py_ssize_t n_batch = x.shape[0], n_channels = x.shape[1], n_spatial = x.shape[2]
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef int n_threads = n_threads_for(n_batch * n_channels * n_spatial)
    cdef Py_ssize_t c
    with nogil:
        for c in prange(n_channels, schedule='static', num_threads=n_threads):
            planar_moments(&x[0, c, 0], n_batch, x_stride, n_spatial, &mean[c], &m2[c])


def moments_rows(const floating[:, :] x, double[::1] mean, double[::1] m2):
    cdef Py_ssize_t n_rows = x.shape[0], n_channels = x.shape[1]
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t n_blocks = (n_channels + CYBN_BLOCK - 1) // CYBN_BLOCK
    cdef int n_threads = n_threads_for(n_rows * n_channels)
    cdef Py_ssize_t block, first
    with nogil:
        for block in prange(n_blocks, schedule='static', num_threads=n_threads):
            first = block * CYBN_BLOCK
            rows_moments(&x[0, first], n_rows, x_stride,
                         min(CYBN_BLOCK, n_channels - first), &mean[first], &m2[first])


def affine_planar(const floating[:, :, :] x, floating[:, :, :] y,
                  const double[::1] mean, const double[::1] scale, const double[::1] shift):
    """y = (x - mean)*scale + shift, per channel."""
    cdef Py_ssize_t n_batch = x.shape[0], n_channels = x.shape[1], n_spatial = x.shape[2]
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t y_stride = y.strides[0] // sizeof(floating)
    cdef int n_threads = n_threads_for(n_batch * n_channels * n_spatial)
    cdef Py_ssize_t c
    with nogil:
        for c in prange(n_channels, schedule='static', num_threads=n_threads):
            planar_affine(&x[0, c, 0], x_stride, &y[0, c, 0], y_stride, n_batch,
                          n_spatial, mean[c], scale[c], shift[c])


def affine_rows(const floating[:, :] x, floating[:, :] y,
                const double[::1] mean, const double[::1] scale, const double[::1] shift):
    cdef Py_ssize_t n_rows = x.shape[0], n_channels = x.shape[1]
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t y_stride = y.strides[0] // sizeof(floating)
    cdef Py_ssize_t n_blocks = (n_channels + CYBN_BLOCK - 1) // CYBN_BLOCK
    cdef int n_threads = n_threads_for(n_rows * n_channels)
    cdef Py_ssize_t block, first
    with nogil:
        for block in prange(n_blocks, schedule='static', num_threads=n_threads):
            first = block * CYBN_BLOCK
            rows_affine(&x[0, first], x_stride, &y[0, first], y_stride, n_rows,
                        min(CYBN_BLOCK, n_channels - first), &mean[first],
                        &scale[first], &shift[first])


def grad_sums_planar(const floating[:, :, :] dy, const floating[:, :, :] x,
                     const double[::1] mean, double[::1] sum_dy, double[::1] sum_dy_xmu):
    cdef Py_ssize_t n_batch = x.shape[0], n_channels = x.shape[1], n_spatial = x.shape[2]
    cdef Py_ssize_t dy_stride = dy.strides[0] // sizeof(floating)
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef int n_threads = n_threads_for(n_batch * n_channels * n_spatial)
    cdef Py_ssize_t c
    with nogil:
        for c in prange(n_channels, schedule='static', num_threads=n_threads):
            planar_grad_sums(&dy[0, c, 0], dy_stride, &x[0, c, 0], x_stride, n_batch,
                             n_spatial, mean[c], &sum_dy[c], &sum_dy_xmu[c])


def grad_sums_rows(const floating[:, :] dy, const floating[:, :] x,
                   const double[::1] mean, double[::1] sum_dy, double[::1] sum_dy_xmu):
    cdef Py_ssize_t n_rows = x.shape[0], n_channels = x.shape[1]
    cdef Py_ssize_t dy_stride = dy.strides[0] // sizeof(floating)
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t n_blocks = (n_channels + CYBN_BLOCK - 1) // CYBN_BLOCK
    cdef int n_threads = n_threads_for(n_rows * n_channels)
    cdef Py_ssize_t block, first
    with nogil:
        for block in prange(n_blocks, schedule='static', num_threads=n_threads):
            first = block * CYBN_BLOCK
            rows_grad_sums(&dy[0, first], dy_stride, &x[0, first], x_stride, n_rows,
                           min(CYBN_BLOCK, n_channels - first), &mean[first],
                           &sum_dy[first], &sum_dy_xmu[first])


def grad_input_planar(const floating[:, :, :] dy, const floating[:, :, :] x,
                      floating[:, :, :] dx, const double[::1] mean,
                      const double[::1] dy_shift, const double[::1] x_coef,
                      const double[::1] scale):
    """dx = ((dy - dy_shift) - (x - mean)*x_coef)*scale, per channel."""
    cdef Py_ssize_t n_batch = x.shape[0], n_channels = x.shape[1], n_spatial = x.shape[2]
    cdef Py_ssize_t dy_stride = dy.strides[0] // sizeof(floating)
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t dx_stride = dx.strides[0] // sizeof(floating)
    cdef int n_threads = n_threads_for(n_batch * n_channels * n_spatial)
    cdef Py_ssize_t c
    with nogil:
        for c in prange(n_channels, schedule='static', num_threads=n_threads):
            planar_grad_input(&dy[0, c, 0], dy_stride, &x[0, c, 0], x_stride,
                              &dx[0, c, 0], dx_stride, n_batch, n_spatial, mean[c],
                              dy_shift[c], x_coef[c], scale[c])


def grad_input_rows(const floating[:, :] dy, const floating[:, :] x,
                    floating[:, :] dx, const double[::1] mean,
                    const double[::1] dy_shift, const double[::1] x_coef,
                    const double[::1] scale):
    cdef Py_ssize_t n_rows = x.shape[0], n_channels = x.shape[1]
    cdef Py_ssize_t dy_stride = dy.strides[0] // sizeof(floating)
    cdef Py_ssize_t x_stride = x.strides[0] // sizeof(floating)
    cdef Py_ssize_t dx_stride = dx.strides[0] // sizeof(floating)
    cdef Py_ssize_t n_blocks = (n_channels + CYBN_BLOCK - 1) // CYBN_BLOCK
    cdef int n_threads = n_threads_for(n_rows * n_channels)
    cdef Py_ssize_t block, first
    with nogil:
        for block in prange(n_blocks, schedule='static', num_threads=n_threads):
            first = block * CYBN_BLOCK
            rows_grad_input(&dy[0, first], dy_stride, &x[0, first], x_stride,
                            &dx[0, first], dx_stride, n_rows,
                            min(CYBN_BLOCK, n_channels - first), &mean[first],
                            &dy_shift[first], &x_coef[first], &scale[first])
