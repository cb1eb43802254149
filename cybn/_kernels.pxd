# The C loops of _loops.h and _loops_impl.h, as _kernels.pyx calls them
# (Cython includes this file into _kernels.pyx).  One declaration per
# instance: the _f32 and _f64 names are the float and double instances of
# the same function in _loops_impl.h.

cdef extern from "_loops.h" nogil:
    ctypedef struct Planar "cybn_planar":
        # One operand in the planar layout; strides in elements.  data is
        # NULL for an optional operand that is absent (residual, ReLU output).
        char *data
        Py_ssize_t batch_stride
        Py_ssize_t channel_stride
    int cybn_max_threads()
    int cybn_fused
    void cybn_detect_fma()
    int cybn_cpu_features()
    int cybn_build_options()
    void cybn_divide_by_sqrt(double *a, const double *v, double eps, Py_ssize_t n)
    double batch_invstd "cybn_batch_invstd"(double *var, Py_ssize_t count, double eps)
    void batch_scales "cybn_batch_scales"(
        Py_ssize_t n_channels, Py_ssize_t count, double eps, const double *weight,
        double *var, double *invstd, double *scale)
    void grad_coefficients "cybn_grad_coefficients"(
        Py_ssize_t n_channels, Py_ssize_t count, int training, const double *sum_dy,
        const double *sum_dy_xmu, const double *invstd, const double *weight,
        double *dy_shift, double *x_coef, double *scale)
    int CYBN_ROWS_BLOCK
    int CYBN_WRITE_BLOCK
    void planar_sums_f32 "cybn_planar_sums_f32"(
        const float *x, Py_ssize_t batch_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
        Py_ssize_t end, double shift, double *sum, double *sumsq, Py_ssize_t ahead)
    void planar_sums_f64 "cybn_planar_sums_f64"(
        const double *x, Py_ssize_t batch_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
        Py_ssize_t end, double shift, double *sum, double *sumsq, Py_ssize_t ahead)
    void planar_grad_sums_f32 "cybn_planar_grad_sums_f32"(
        const float *dy, Py_ssize_t dy_stride, const float *y, Py_ssize_t y_stride,
        const float *x, Py_ssize_t x_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
        Py_ssize_t end, double mean, double *sum_dy, double *sum_dy_xmu, Py_ssize_t ahead)
    void planar_grad_sums_f64 "cybn_planar_grad_sums_f64"(
        const double *dy, Py_ssize_t dy_stride, const double *y, Py_ssize_t y_stride,
        const double *x, Py_ssize_t x_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
        Py_ssize_t end, double mean, double *sum_dy, double *sum_dy_xmu, Py_ssize_t ahead)
    void planar_affine_f32 "cybn_planar_affine_f32"(
        const float *x, Py_ssize_t x_stride, const float *res, Py_ssize_t res_stride,
        float *y, Py_ssize_t y_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
        Py_ssize_t end, double mean, double scale, double shift, int relu, int stream)
    void planar_affine_f64 "cybn_planar_affine_f64"(
        const double *x, Py_ssize_t x_stride, const double *res, Py_ssize_t res_stride,
        double *y, Py_ssize_t y_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
        Py_ssize_t end, double mean, double scale, double shift, int relu, int stream)
    void planar_affine_sums_f32 "cybn_planar_affine_sums_f32"(
        const float *x, Py_ssize_t x_stride, const float *res, Py_ssize_t res_stride,
        float *y, Py_ssize_t y_stride, Py_ssize_t n_spatial, Py_ssize_t count, double mean,
        double scale, double shift, int relu, int stream, Py_ssize_t next,
        double next_shift, double *sum, double *sumsq)
    void planar_affine_sums_f64 "cybn_planar_affine_sums_f64"(
        const double *x, Py_ssize_t x_stride, const double *res, Py_ssize_t res_stride,
        double *y, Py_ssize_t y_stride, Py_ssize_t n_spatial, Py_ssize_t count, double mean,
        double scale, double shift, int relu, int stream, Py_ssize_t next,
        double next_shift, double *sum, double *sumsq)
    void planar_grad_input_sums_f32 "cybn_planar_grad_input_sums_f32"(
        const float *dy, Py_ssize_t dy_stride, const float *y, Py_ssize_t y_stride,
        const float *x, Py_ssize_t x_stride, float *dx, Py_ssize_t dx_stride,
        float *g_out, Py_ssize_t g_stride, Py_ssize_t n_spatial, Py_ssize_t count,
        double mean, double dy_shift, double x_coef, double scale, int stream,
        Py_ssize_t next_dy, Py_ssize_t next_y, Py_ssize_t next_x, double next_mean,
        double *sum_dy, double *sum_dy_xmu)
    void planar_grad_input_sums_f64 "cybn_planar_grad_input_sums_f64"(
        const double *dy, Py_ssize_t dy_stride, const double *y, Py_ssize_t y_stride,
        const double *x, Py_ssize_t x_stride, double *dx, Py_ssize_t dx_stride,
        double *g_out, Py_ssize_t g_stride, Py_ssize_t n_spatial, Py_ssize_t count,
        double mean, double dy_shift, double x_coef, double scale, int stream,
        Py_ssize_t next_dy, Py_ssize_t next_y, Py_ssize_t next_x, double next_mean,
        double *sum_dy, double *sum_dy_xmu)
    void planar_grad_input_f32 "cybn_planar_grad_input_f32"(
        const float *dy, Py_ssize_t dy_stride, const float *y, Py_ssize_t y_stride,
        const float *x, Py_ssize_t x_stride, float *dx, Py_ssize_t dx_stride,
        float *g_out, Py_ssize_t g_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
        Py_ssize_t end, double mean, double dy_shift, double x_coef, double scale, int stream)
    void planar_grad_input_f64 "cybn_planar_grad_input_f64"(
        const double *dy, Py_ssize_t dy_stride, const double *y, Py_ssize_t y_stride,
        const double *x, Py_ssize_t x_stride, double *dx, Py_ssize_t dx_stride,
        double *g_out, Py_ssize_t g_stride, Py_ssize_t n_spatial, Py_ssize_t begin,
        Py_ssize_t end, double mean, double dy_shift, double x_coef, double scale, int stream)
    void runs_sums_f32 "cybn_runs_sums_f32"(
        Planar x, Py_ssize_t n_channels, Py_ssize_t n_spatial, Py_ssize_t run_begin,
        Py_ssize_t run_end, const double *shift, double *sum, double *sumsq)
    void runs_sums_f64 "cybn_runs_sums_f64"(
        Planar x, Py_ssize_t n_channels, Py_ssize_t n_spatial, Py_ssize_t run_begin,
        Py_ssize_t run_end, const double *shift, double *sum, double *sumsq)
    void runs_grad_sums_f32 "cybn_runs_grad_sums_f32"(
        Planar dy, Planar y, Planar x, Py_ssize_t n_channels, Py_ssize_t n_spatial,
        Py_ssize_t run_begin, Py_ssize_t run_end, const double *mean, double *sum_dy,
        double *sum_dy_xmu)
    void runs_grad_sums_f64 "cybn_runs_grad_sums_f64"(
        Planar dy, Planar y, Planar x, Py_ssize_t n_channels, Py_ssize_t n_spatial,
        Py_ssize_t run_begin, Py_ssize_t run_end, const double *mean, double *sum_dy,
        double *sum_dy_xmu)
    void runs_affine_f32 "cybn_runs_affine_f32"(
        Planar x, Planar res, Planar y, Py_ssize_t n_channels, Py_ssize_t n_spatial,
        Py_ssize_t run_begin, Py_ssize_t run_end, const double *mean, const double *scale,
        const double *shift, int relu, int stream)
    void runs_affine_f64 "cybn_runs_affine_f64"(
        Planar x, Planar res, Planar y, Py_ssize_t n_channels, Py_ssize_t n_spatial,
        Py_ssize_t run_begin, Py_ssize_t run_end, const double *mean, const double *scale,
        const double *shift, int relu, int stream)
    void runs_grad_input_f32 "cybn_runs_grad_input_f32"(
        Planar dy, Planar y, Planar x, Planar dx, Planar g_out, Py_ssize_t n_channels,
        Py_ssize_t n_spatial, Py_ssize_t run_begin, Py_ssize_t run_end, const double *mean,
        const double *dy_shift, const double *x_coef, const double *scale, int stream)
    void runs_grad_input_f64 "cybn_runs_grad_input_f64"(
        Planar dy, Planar y, Planar x, Planar dx, Planar g_out, Py_ssize_t n_channels,
        Py_ssize_t n_spatial, Py_ssize_t run_begin, Py_ssize_t run_end, const double *mean,
        const double *dy_shift, const double *x_coef, const double *scale, int stream)
    void rows_sums_f32 "cybn_rows_sums_f32"(
        const float *x, Py_ssize_t row_stride, Py_ssize_t n_channels, Py_ssize_t begin,
        Py_ssize_t end, const double *shift, double *sum, double *sumsq, int block)
    void rows_sums_f64 "cybn_rows_sums_f64"(
        const double *x, Py_ssize_t row_stride, Py_ssize_t n_channels, Py_ssize_t begin,
        Py_ssize_t end, const double *shift, double *sum, double *sumsq, int block)
    void rows_grad_sums_f32 "cybn_rows_grad_sums_f32"(
        const float *dy, Py_ssize_t dy_stride, const float *y, Py_ssize_t y_stride,
        const float *x, Py_ssize_t x_stride, Py_ssize_t n_channels, Py_ssize_t begin,
        Py_ssize_t end, const double *mean, double *sum_dy, double *sum_dy_xmu, int block)
    void rows_grad_sums_f64 "cybn_rows_grad_sums_f64"(
        const double *dy, Py_ssize_t dy_stride, const double *y, Py_ssize_t y_stride,
        const double *x, Py_ssize_t x_stride, Py_ssize_t n_channels, Py_ssize_t begin,
        Py_ssize_t end, const double *mean, double *sum_dy, double *sum_dy_xmu, int block)
    void rows_affine_f32 "cybn_rows_affine_f32"(
        const float *x, Py_ssize_t x_stride, const float *res, Py_ssize_t res_stride,
        float *y, Py_ssize_t y_stride, Py_ssize_t n_channels, Py_ssize_t begin,
        Py_ssize_t end, const double *mean, const double *scale, const double *shift,
        int relu, int block, int stream)
    void rows_affine_f64 "cybn_rows_affine_f64"(
        const double *x, Py_ssize_t x_stride, const double *res, Py_ssize_t res_stride,
        double *y, Py_ssize_t y_stride, Py_ssize_t n_channels, Py_ssize_t begin,
        Py_ssize_t end, const double *mean, const double *scale, const double *shift,
        int relu, int block, int stream)
    void rows_grad_input_f32 "cybn_rows_grad_input_f32"(
        const float *dy, Py_ssize_t dy_stride, const float *y, Py_ssize_t y_stride,
        const float *x, Py_ssize_t x_stride, float *dx, Py_ssize_t dx_stride,
        float *g_out, Py_ssize_t g_stride, Py_ssize_t n_channels, Py_ssize_t begin,
        Py_ssize_t end, const double *mean, const double *dy_shift, const double *x_coef,
        const double *scale, int block, int stream)
    void rows_grad_input_f64 "cybn_rows_grad_input_f64"(
        const double *dy, Py_ssize_t dy_stride, const double *y, Py_ssize_t y_stride,
        const double *x, Py_ssize_t x_stride, double *dx, Py_ssize_t dx_stride,
        double *g_out, Py_ssize_t g_stride, Py_ssize_t n_channels, Py_ssize_t begin,
        Py_ssize_t end, const double *mean, const double *dy_shift, const double *x_coef,
        const double *scale, int block, int stream)
