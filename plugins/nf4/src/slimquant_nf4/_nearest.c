/* Nearest codebook values in one pass over the weights, the codes slimquant's CodebookGrid.quantize gives (about
 * ten tensor passes and two table reads per weight there): code = low + the number of midpoints strictly below
 * x = w / scale, NaN counting as 0. Two ways to the same count:
 *   - counting: compare x with every midpoint; branch-free, vectorized by the compiler (an AVX2 clone on x86-64);
 *   - the grid's 32-cell table (MidpointCells), on AVX-512 CPUs: cell = trunc(clamp(x * 16 + 16, 0, 31)), count =
 *     below[cell] + (cell_midpoint[cell] < x), both tables held in registers (vpermt2ps); about half the work.
 *
 * nearest(w, scale, out, groups, size, low, threads, lookup)
 *     float codes; groups of `size` consecutive weights share a scale: w and out hold groups * size floats, scale
 *     one per group, or one per weight when size is 1.
 * absmax_nearest(w, scale, codes, rows, cols, size, low, eps, threads, lookup)
 *     int8 codes of a row-major rows x cols weight, and the scales they are for, written to scale [rows, ceil(cols /
 *     size)]: each group of `size` consecutive columns of a row (the last may be shorter) has its largest |w| as
 *     scale, at least eps, NaN if the group holds a NaN.
 * lookup = (midpoints, count, below, cell_midpoint, cells): count <= 15 sorted float32 midpoints; the table (two
 * float32 [cells] arrays, or address 0) is used when cells is 32. Addresses are of contiguous CPU memory. Work is
 * cut into runs of groups (or rows), one per thread, with the GIL released. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define SLOTS 15
#define TABLE_CELLS 32
#define MAX_THREADS 64
#define TILE 256

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#define HAVE_AVX512_TABLE 1
#else
#define VECTOR_CLONES
#define HAVE_AVX512_TABLE 0
#endif

typedef struct {
    const float *w;
    float *scale, *out;
    int8_t *codes;
    float midpoints[SLOTS];
    float below[TABLE_CELLS], cell_midpoint[TABLE_CELLS];
    int table;
    int64_t first, last, size, cols;
    float low, eps;
    int find_scale;
} Run;

static int cpu_has_avx512f;

static inline int32_t midpoints_below(float x, const float *m) {
    x = x == x ? x : 0.0f;
    int32_t above = 0;
    for (int k = 0; k < SLOTS; k++) above += x > m[k];
    return above;
}

#if HAVE_AVX512_TABLE
/* Counts of the first whole 16s of w / s through the table; returns how many it did (the rest are counted). */
__attribute__((target("avx512f"))) static int64_t table_counts(const float *w, float s, int32_t *out, int64_t n,
                                                                const Run *r) {
    const __m512 below_lo = _mm512_loadu_ps(r->below), below_hi = _mm512_loadu_ps(r->below + 16);
    const __m512 mid_lo = _mm512_loadu_ps(r->cell_midpoint), mid_hi = _mm512_loadu_ps(r->cell_midpoint + 16);
    const __m512 half = _mm512_set1_ps(TABLE_CELLS / 2), last = _mm512_set1_ps(TABLE_CELLS - 1);
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), scale = _mm512_set1_ps(s);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_div_ps(_mm512_loadu_ps(w + i), scale);
        x = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), x);
        const __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(_mm512_mul_ps(x, half), half), zero), last);
        const __m512i cell = _mm512_cvttps_epi32(t);
        const __m512 below = _mm512_permutex2var_ps(below_lo, cell, below_hi);
        const __m512 mid = _mm512_permutex2var_ps(mid_lo, cell, mid_hi);
        const __m512 count = _mm512_mask_add_ps(below, _mm512_cmp_ps_mask(mid, x, _CMP_LT_OQ), below, one);
        _mm512_storeu_si512(out + i, _mm512_cvttps_epi32(count));
    }
    return i;
}
#endif

/* counts[i] = midpoints below w[i] / s, for n <= TILE weights. */
VECTOR_CLONES
static void count_below(const float *restrict w, float s, int32_t *restrict counts, int64_t n, const Run *r) {
    int64_t done = 0;
#if HAVE_AVX512_TABLE
    if (r->table) done = table_counts(w, s, counts, n, r);
#endif
    float m[SLOTS];
    for (int k = 0; k < SLOTS; k++) m[k] = r->midpoints[k];
    for (int64_t i = done; i < n; i++) counts[i] = midpoints_below(w[i] / s, m);
}

VECTOR_CLONES
static void group_codes(const Run *r) {
    float m[SLOTS];
    for (int k = 0; k < SLOTS; k++) m[k] = r->midpoints[k];
    const float *restrict w = r->w, *restrict scale = r->scale;
    float *restrict out = r->out;
    const int64_t size = r->size, first = r->first, last = r->last;
    const float low = r->low;
    if (size == 1) {  /* a scale per weight */
        for (int64_t i = first; i < last; i++) out[i] = (float)midpoints_below(w[i] / scale[i], m) + low;
        return;
    }
    int32_t counts[TILE];
    for (int64_t g = first; g < last; g++) {
        for (int64_t a = g * size; a < (g + 1) * size; a += TILE) {
            const int64_t n = (g + 1) * size - a < TILE ? (g + 1) * size - a : TILE;
            count_below(w + a, scale[g], counts, n, r);
            for (int64_t i = 0; i < n; i++) out[a + i] = (float)counts[i] + low;
        }
    }
}

/* The largest |w| through the bits of |w| as unsigned integers (their order is the floats' order; any NaN is above
 * infinity): an integer maximum, which vectorizes where a float one does not. */
VECTOR_CLONES
static void row_absmax_codes(const Run *r) {
    const float *restrict weights = r->w;
    float *restrict scale = r->scale;
    int8_t *restrict codes = r->codes;
    const int64_t cols = r->cols, size = r->size, groups = (cols + size - 1) / size;
    const int64_t first = r->first, last = r->last;
    const int32_t low = (int32_t)r->low;
    const float eps = r->eps;
    int32_t counts[TILE];
    for (int64_t row = first; row < last; row++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t start = row * cols + g * size;
            const int64_t n = (g + 1) * size <= cols ? size : cols - g * size;
            const float *w = weights + start;
            uint32_t largest = 0;
            for (int64_t i = 0; i < n; i++) {
                uint32_t magnitude;
                memcpy(&magnitude, w + i, sizeof magnitude);
                magnitude &= 0x7fffffffu;
                largest = magnitude > largest ? magnitude : largest;
            }
            float s;
            memcpy(&s, &largest, sizeof s);
            s = largest > 0x7f800000u ? NAN : (s > eps ? s : eps);
            scale[row * groups + g] = s;
            /* counted in int32, narrowed in a loop of its own: narrowing while counting makes the counting loop four
             * times wider, and its registers spill */
            for (int64_t a = 0; a < n; a += TILE) {
                const int64_t e = n - a < TILE ? n - a : TILE;
                count_below(w + a, s, counts, e, r);
                for (int64_t i = 0; i < e; i++) codes[start + a + i] = (int8_t)(counts[i] + low);
            }
        }
    }
}

static void *run(void *arg) {
    const Run *r = (const Run *)arg;
    if (r->find_scale) row_absmax_codes(r);
    else group_codes(r);
    return NULL;
}

/* Runs `units` units of work (groups or rows) cut into `threads` equal runs. */
static void run_all(Run *proto, int64_t units, long long threads) {
    Run runs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > units) threads = units > 0 ? units : 1;
    if (threads < 1) threads = 1;
    for (long long t = 0; t < threads; t++) {
        runs[t] = *proto;
        runs[t].first = units * t / threads;
        runs[t].last = units * (t + 1) / threads;
    }
    Py_BEGIN_ALLOW_THREADS
    for (long long t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, run, &runs[t]) == 0;
    run(&runs[0]);
    for (long long t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run(&runs[t]);
    }
    Py_END_ALLOW_THREADS
}

/* Fills the run's midpoints and table from a lookup tuple (see the top of this file). */
static int set_lookup(Run *r, PyObject *lookup) {
    unsigned long long midpoints, below, cell_midpoint;
    long long count, cells;
    if (!PyArg_ParseTuple(lookup, "KLKKL", &midpoints, &count, &below, &cell_midpoint, &cells)) return -1;
    if (count < 0 || count > SLOTS) {
        PyErr_SetString(PyExc_ValueError, "at most 15 midpoints");
        return -1;
    }
    for (int k = 0; k < SLOTS; k++) r->midpoints[k] = k < count ? ((const float *)(uintptr_t)midpoints)[k] : INFINITY;
    r->table = HAVE_AVX512_TABLE && cpu_has_avx512f && cells == TABLE_CELLS && below && cell_midpoint;
    if (r->table) {
        memcpy(r->below, (const float *)(uintptr_t)below, sizeof r->below);
        memcpy(r->cell_midpoint, (const float *)(uintptr_t)cell_midpoint, sizeof r->cell_midpoint);
    }
    return 0;
}

static PyObject *nearest(PyObject *self, PyObject *args) {
    unsigned long long w, scale, out;
    long long groups, size, threads;
    float low;
    PyObject *lookup;
    if (!PyArg_ParseTuple(args, "KKKLLfLO!", &w, &scale, &out, &groups, &size, &low, &threads, &PyTuple_Type,
                          &lookup))
        return NULL;
    if (groups < 0 || size < 1) {
        PyErr_SetString(PyExc_ValueError, "nearest: negative groups or a group of no weights");
        return NULL;
    }
    Run r = {.w = (const float *)(uintptr_t)w, .scale = (float *)(uintptr_t)scale, .out = (float *)(uintptr_t)out,
             .size = size, .low = low, .find_scale = 0};
    if (set_lookup(&r, lookup)) return NULL;
    run_all(&r, groups, threads);
    Py_RETURN_NONE;
}

static PyObject *absmax_nearest(PyObject *self, PyObject *args) {
    unsigned long long w, scale, codes;
    long long rows, cols, size, threads;
    float low, eps;
    PyObject *lookup;
    if (!PyArg_ParseTuple(args, "KKKLLLffLO!", &w, &scale, &codes, &rows, &cols, &size, &low, &eps, &threads,
                          &PyTuple_Type, &lookup))
        return NULL;
    if (rows < 0 || cols < 0 || size < 1) {
        PyErr_SetString(PyExc_ValueError, "absmax_nearest: negative size or a group of no columns");
        return NULL;
    }
    Run r = {.w = (const float *)(uintptr_t)w, .scale = (float *)(uintptr_t)scale, .codes = (int8_t *)(uintptr_t)codes,
             .size = size, .cols = cols, .low = low, .eps = eps, .find_scale = 1};
    if (set_lookup(&r, lookup)) return NULL;
    run_all(&r, rows, threads);
    Py_RETURN_NONE;
}

static PyObject *uses_table(PyObject *self, PyObject *lookup) {
    Run r;
    if (!PyTuple_Check(lookup)) {
        PyErr_SetString(PyExc_TypeError, "uses_table: a lookup tuple");
        return NULL;
    }
    if (set_lookup(&r, lookup)) return NULL;
    return PyBool_FromLong(r.table);
}

static PyMethodDef methods[] = {
    {"nearest", nearest, METH_VARARGS, "Codes of the nearest codebook values for given scales (see the source)."},
    {"absmax_nearest", absmax_nearest, METH_VARARGS, "Absmax scales per group and the codes for them."},
    {"uses_table", uses_table, METH_O, "Whether this lookup goes through the AVX-512 table on this CPU."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_nearest", NULL, -1, methods};

PyMODINIT_FUNC PyInit__nearest(void) {
#if HAVE_AVX512_TABLE
    __builtin_cpu_init();
    cpu_has_avx512f = __builtin_cpu_supports("avx512f");
#endif
    return PyModule_Create(&module);
}
