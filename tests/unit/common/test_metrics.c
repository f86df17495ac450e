#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <uv.h>

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/json.h"
#include "cm/metrics.h"

static long live_at_start;

static int setup(void **state)
{
    (void)state;
    live_at_start = cm_alloc_live();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    cm_alloc_fail_after(0);
    assert_int_equal(cm_alloc_live(), live_at_start);
    return 0;
}

/* Renders m and compares the whole text. */
static void assert_render(const cm_metrics_t *m, const char *want)
{
    cm_buf_t out = CM_BUF_INIT;
    assert_int_equal(cm_metrics_render(m, &out), 0);
    assert_string_equal(out.data ? out.data : "", want);
    cm_buf_free(&out);
}

/* ------------------------------------------------------------------------------------------ */
/* Rendering                                                                                   */
/* ------------------------------------------------------------------------------------------ */

static void counters_and_gauges(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    assert_non_null(m);
    assert_render(m, ""); /* an empty registry renders nothing */
    cm_metric_t *ok = cm_metrics_counter(m, "http_requests_total", "HTTP requests.",
                                         "route=\"/api/markets/price\",code=\"200\"");
    cm_metric_t *up = cm_metrics_gauge(m, "redis_up", "1 when Redis answers.", NULL);
    cm_metric_t *nf = cm_metrics_counter(m, "http_requests_total", "HTTP requests.",
                                         "route=\"/api/markets/price\",code=\"404\"");
    assert_non_null(ok);
    assert_non_null(up);
    assert_non_null(nf);
    cm_counter_inc(ok);
    cm_counter_inc(ok);
    cm_counter_add(ok, 3);
    cm_counter_add(ok, -1);  /* counters never go down */
    cm_counter_add(ok, NAN); /* nor become NaN */
    cm_counter_inc(nf);
    cm_gauge_set(up, 1);
    cm_gauge_add(up, 0.5);
    cm_gauge_add(up, -1);
    assert_true(cm_metric_value(ok) == 5);
    assert_true(cm_metric_value(up) == 0.5);
    /* Series of one family stay together under one HELP/TYPE even when registered
     * interleaved with another family; labels are rendered sorted by name. */
    assert_render(m, "# HELP http_requests_total HTTP requests.\n"
                     "# TYPE http_requests_total counter\n"
                     "http_requests_total{code=\"200\",route=\"/api/markets/price\"} 5\n"
                     "http_requests_total{code=\"404\",route=\"/api/markets/price\"} 1\n"
                     "# HELP redis_up 1 when Redis answers.\n"
                     "# TYPE redis_up gauge\n"
                     "redis_up 0.5\n");
    cm_metrics_free(m);
}

static void histograms(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    static const double bounds[] = {0.25, 0.5, 1};
    cm_metric_t *h = cm_metrics_histogram(m, "origin_request_duration_seconds",
                                          "Origin query latency.", NULL, bounds, 3);
    cm_metric_t *h2 = cm_metrics_histogram(m, "origin_request_duration_seconds",
                                           "Origin query latency.", "result=\"error\"", bounds, 3);
    assert_non_null(h);
    assert_non_null(h2);
    cm_histogram_observe(h, 0.25); /* equal to a bound: in that bucket (le is inclusive) */
    cm_histogram_observe(h, 0.5);
    cm_histogram_observe(h, 0.75);
    cm_histogram_observe(h, 2);
    cm_histogram_observe(h, 0);
    cm_histogram_observe(h2, 1);
    assert_true(cm_metric_value(h) == 5);
    assert_render(m, "# HELP origin_request_duration_seconds Origin query latency.\n"
                     "# TYPE origin_request_duration_seconds histogram\n"
                     "origin_request_duration_seconds_bucket{le=\"0.25\"} 2\n"
                     "origin_request_duration_seconds_bucket{le=\"0.5\"} 3\n"
                     "origin_request_duration_seconds_bucket{le=\"1\"} 4\n"
                     "origin_request_duration_seconds_bucket{le=\"+Inf\"} 5\n"
                     "origin_request_duration_seconds_sum 3.5\n"
                     "origin_request_duration_seconds_count 5\n"
                     "origin_request_duration_seconds_bucket{result=\"error\",le=\"0.25\"} 0\n"
                     "origin_request_duration_seconds_bucket{result=\"error\",le=\"0.5\"} 0\n"
                     "origin_request_duration_seconds_bucket{result=\"error\",le=\"1\"} 1\n"
                     "origin_request_duration_seconds_bucket{result=\"error\",le=\"+Inf\"} 1\n"
                     "origin_request_duration_seconds_sum{result=\"error\"} 1\n"
                     "origin_request_duration_seconds_count{result=\"error\"} 1\n");
    cm_metrics_free(m);
}

static void histogram_bucket_edges(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    cm_metric_t *h = cm_metrics_histogram(m, "lat_seconds", "Latency.", NULL,
                                          cm_metrics_latency_bounds, cm_metrics_latency_nbounds);
    assert_non_null(h);
    /* Every bound itself, and the next double above it, land on either side of the edge. */
    for (size_t i = 0; i < cm_metrics_latency_nbounds; i++) {
        cm_histogram_observe(h, cm_metrics_latency_bounds[i]);
        cm_histogram_observe(h, nextafter(cm_metrics_latency_bounds[i], INFINITY));
    }
    cm_histogram_observe(h, -1); /* below every bound: the first bucket */
    cm_histogram_observe(h, INFINITY);
    cm_buf_t out = CM_BUF_INIT;
    assert_int_equal(cm_metrics_render(m, &out), 0);
    /* Bucket i (cumulative) holds: -1, bound 0, and 2 per earlier bound, plus bound i. */
    assert_non_null(strstr(out.data, "lat_seconds_bucket{le=\"5e-05\"} 2\n"));
    assert_non_null(strstr(out.data, "lat_seconds_bucket{le=\"0.0001\"} 4\n"));
    assert_non_null(strstr(out.data, "lat_seconds_bucket{le=\"0.00025\"} 6\n"));
    assert_non_null(strstr(out.data, "lat_seconds_bucket{le=\"1\"} 28\n"));
    assert_non_null(strstr(out.data, "lat_seconds_bucket{le=\"2.5\"} 30\n"));
    assert_non_null(strstr(out.data, "lat_seconds_bucket{le=\"10\"} 34\n"));
    assert_non_null(strstr(out.data, "lat_seconds_bucket{le=\"+Inf\"} 36\n"));
    assert_non_null(strstr(out.data, "lat_seconds_sum +Inf\n"));
    assert_non_null(strstr(out.data, "lat_seconds_count 36\n"));
    cm_buf_free(&out);

    /* No bounds at all: only +Inf. NaN is counted but only in +Inf. */
    cm_metric_t *z = cm_metrics_histogram(m, "z_seconds", "Z.", NULL, NULL, 0);
    assert_non_null(z);
    cm_histogram_observe(z, NAN);
    assert_int_equal(cm_metrics_render(m, &out), 0);
    assert_non_null(strstr(out.data, "# TYPE z_seconds histogram\n"
                                     "z_seconds_bucket{le=\"+Inf\"} 1\n"
                                     "z_seconds_sum NaN\n"
                                     "z_seconds_count 1\n"));
    cm_buf_free(&out);
    cm_metrics_free(m);
}

static void doubles_the_prometheus_way(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    static const struct {
        double v;
        const char *text;
    } cases[] = {
        {0, "0"},
        {-0.0, "0"},
        {1, "1"},
        {-3, "-3"},
        {123456789, "123456789"},
        {9007199254740992.0, "9007199254740992"},
        {1e21, "1e+21"},
        {0.1, "0.1"},
        {0.5, "0.5"},
        {1.0 / 3, "0.3333333333333333"},
        {2.5e-7, "2.5e-07"},
        {-1.25, "-1.25"},
    };
    size_t n = sizeof cases / sizeof cases[0];
    char want[2048];
    size_t w = (size_t)snprintf(want, sizeof want, "# HELP g G.\n# TYPE g gauge\n");
    for (size_t i = 0; i < n; i++) {
        char labels[32];
        assert_true(cm_metrics_labels(labels, sizeof labels, "i", i < 10 ? "0" : "1", "j",
                                      (const char[]){(char)('0' + (char)(i % 10)), 0}, NULL) > 0);
        cm_metric_t *g = cm_metrics_gauge(m, "g", "G.", labels);
        assert_non_null(g);
        cm_gauge_set(g, cases[i].v);
        w += (size_t)snprintf(want + w, sizeof want - w, "g{%s} %s\n", labels, cases[i].text);
    }
    cm_metric_t *inf = cm_metrics_gauge(m, "g", "G.", "s=\"inf\"");
    cm_metric_t *ninf = cm_metrics_gauge(m, "g", "G.", "s=\"ninf\"");
    cm_metric_t *nan = cm_metrics_gauge(m, "g", "G.", "s=\"nan\"");
    cm_gauge_set(inf, INFINITY);
    cm_gauge_set(ninf, -INFINITY);
    cm_gauge_set(nan, NAN);
    snprintf(want + w, sizeof want - w,
             "g{s=\"inf\"} +Inf\ng{s=\"ninf\"} -Inf\ng{s=\"nan\"} NaN\n");
    assert_render(m, want);
    cm_metrics_free(m);
}

static double ratio_fn(void *ud)
{
    const double *hm = ud;
    return hm[0] + hm[1] > 0 ? hm[0] / (hm[0] + hm[1]) : 0;
}

static void gauge_fn(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    double hm[2] = {0, 0};
    cm_metric_t *r =
        cm_metrics_gauge_fn(m, "price_cache_hit_ratio", "Cache hit ratio.", NULL, ratio_fn, hm);
    assert_non_null(r);
    assert_true(cm_metric_value(r) == 0);
    assert_render(m, "# HELP price_cache_hit_ratio Cache hit ratio.\n"
                     "# TYPE price_cache_hit_ratio gauge\n"
                     "price_cache_hit_ratio 0\n");
    hm[0] = 3;
    hm[1] = 1;
    assert_true(cm_metric_value(r) == 0.75);
    assert_render(m, "# HELP price_cache_hit_ratio Cache hit ratio.\n"
                     "# TYPE price_cache_hit_ratio gauge\n"
                     "price_cache_hit_ratio 0.75\n");
    /* Same name + labels + fn + ud: the same series; anything else there is a clash. */
    assert_ptr_equal(
        cm_metrics_gauge_fn(m, "price_cache_hit_ratio", "Cache hit ratio.", NULL, ratio_fn, hm), r);
    assert_null(cm_metrics_gauge_fn(m, "price_cache_hit_ratio", "Cache hit ratio.", NULL, ratio_fn,
                                    &hm[1]));
    assert_null(cm_metrics_gauge(m, "price_cache_hit_ratio", "Cache hit ratio.", NULL));
    assert_null(cm_metrics_gauge_fn(m, "x", "X.", NULL, NULL, NULL));
    /* A plain gauge may share the family under other labels. */
    cm_metric_t *g =
        cm_metrics_gauge(m, "price_cache_hit_ratio", "Cache hit ratio.", "tier=\"memory\"");
    assert_non_null(g);
    cm_gauge_set(g, 1);
    assert_render(m, "# HELP price_cache_hit_ratio Cache hit ratio.\n"
                     "# TYPE price_cache_hit_ratio gauge\n"
                     "price_cache_hit_ratio 0.75\n"
                     "price_cache_hit_ratio{tier=\"memory\"} 1\n");
    cm_metrics_free(m);
}

/* ------------------------------------------------------------------------------------------ */
/* Labels and help escaping                                                                    */
/* ------------------------------------------------------------------------------------------ */

static void label_building_and_escaping(void **state)
{
    (void)state;
    char out[64];
    assert_int_equal(cm_metrics_labels(out, sizeof out, "route", "/a", "code", "200", NULL),
                     (int)strlen("route=\"/a\",code=\"200\""));
    assert_string_equal(out, "route=\"/a\",code=\"200\"");
    assert_int_equal(cm_metrics_labels(out, sizeof out, "v", "a\"b\\c\nd", NULL),
                     (int)strlen("v=\"a\\\"b\\\\c\\nd\""));
    assert_string_equal(out, "v=\"a\\\"b\\\\c\\nd\"");
    assert_int_equal(cm_metrics_labels(out, sizeof out, "k", NULL, NULL), 4);
    assert_string_equal(out, "k=\"\"");
    /* Exactly fitting and one byte short. */
    char small[8];
    assert_int_equal(cm_metrics_labels(small, sizeof small, "ab", "cd", NULL), 7);
    assert_string_equal(small, "ab=\"cd\"");
    assert_int_equal(cm_metrics_labels(small, sizeof small, "ab", "cde", NULL), UV_E2BIG);
    assert_string_equal(small, "");
    assert_int_equal(cm_metrics_labels(small, sizeof small, "a", "\"\"\"", NULL), UV_E2BIG);
    assert_int_equal(cm_metrics_labels(small, 0, "a", "b", NULL), UV_E2BIG);

    /* Escaped values round-trip through the registry into the exposition. */
    cm_metrics_t *m = cm_metrics_new();
    assert_true(cm_metrics_labels(out, sizeof out, "path", "C:\\dir \"x\"\nnext", NULL) > 0);
    cm_metric_t *c =
        cm_metrics_counter(m, "odd_total", "Help with \\ backslash\nand \"quotes\".", out);
    assert_non_null(c);
    assert_render(m, "# HELP odd_total Help with \\\\ backslash\\nand \"quotes\".\n"
                     "# TYPE odd_total counter\n"
                     "odd_total{path=\"C:\\\\dir \\\"x\\\"\\nnext\"} 0\n");
    cm_metrics_free(m);
}

static void malformed_labels_rejected(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    static const char *const bad[] = {
        "k=v",
        "k=\"v",
        "k=\"v\",",
        ",k=\"v\"",
        "k=\"v\"x=\"w\"",
        "__k=\"v\"",
        "0k=\"v\"",
        "k-x=\"v\"",
        "k=\"a\\qb\"",
        "k=\"a\nb\"",
        "k=\"v\\\"",
        "k=\"1\",k=\"2\"",
        "k=\"\xff\"",
        "k =\"v\"",
        "{k=\"v\"}",
        "k=\"\xc3\"",
        "k=\"\xed\xa0\x80\"",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (cm_metrics_counter(m, "c_total", "C.", bad[i]) != NULL)
            fail_msg("accepted labels %s", bad[i]);
    }
    /* UTF-8 is fine. */
    assert_non_null(cm_metrics_counter(m, "c_total", "C.", "k=\"\xc3\xa9\xe2\x82\xac\""));
    assert_null(cm_metrics_counter(m, "bad_help_total", "\xff", NULL));
    /* Histograms reserve "le". */
    static const double b[] = {1};
    assert_null(cm_metrics_histogram(m, "h_seconds", "H.", "le=\"1\"", b, 1));
    assert_non_null(cm_metrics_histogram(m, "h_seconds", "H.", "lex=\"1\"", b, 1));
    cm_metrics_free(m);
}

/* ------------------------------------------------------------------------------------------ */
/* Identity: same series, clashes, no duplicates                                               */
/* ------------------------------------------------------------------------------------------ */

static void same_series_returned(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    cm_metric_t *a = cm_metrics_counter(m, "x_total", "X.", "a=\"1\",b=\"2\"");
    assert_non_null(a);
    assert_ptr_equal(cm_metrics_counter(m, "x_total", "X.", "a=\"1\",b=\"2\""), a);
    assert_ptr_equal(cm_metrics_counter(m, "x_total", "X.", "b=\"2\",a=\"1\""), a);
    cm_metric_t *plain = cm_metrics_counter(m, "x_total", "X.", NULL);
    assert_non_null(plain);
    assert_ptr_equal(cm_metrics_counter(m, "x_total", "X.", ""), plain);
    assert_ptr_not_equal(plain, a);
    static const double b[] = {0.1, 1};
    cm_metric_t *h = cm_metrics_histogram(m, "h_seconds", "H.", NULL, b, 2);
    assert_ptr_equal(cm_metrics_histogram(m, "h_seconds", "H.", NULL, b, 2), h);
    cm_counter_inc(a);
    cm_counter_inc(cm_metrics_counter(m, "x_total", "X.", "b=\"2\",a=\"1\""));
    assert_render(m, "# HELP x_total X.\n"
                     "# TYPE x_total counter\n"
                     "x_total{a=\"1\",b=\"2\"} 2\n"
                     "x_total 0\n"
                     "# HELP h_seconds H.\n"
                     "# TYPE h_seconds histogram\n"
                     "h_seconds_bucket{le=\"0.1\"} 0\n"
                     "h_seconds_bucket{le=\"1\"} 0\n"
                     "h_seconds_bucket{le=\"+Inf\"} 0\n"
                     "h_seconds_sum 0\n"
                     "h_seconds_count 0\n");
    cm_metrics_free(m);
}

static void clashes_return_null(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    static const double b1[] = {0.1, 1}, b2[] = {0.1, 2}, unsorted[] = {1, 0.1}, dup[] = {1, 1},
                        inf[] = {1, INFINITY};
    assert_non_null(cm_metrics_counter(m, "c_total", "C.", NULL));
    assert_null(cm_metrics_gauge(m, "c_total", "C.", NULL));            /* other type */
    assert_null(cm_metrics_gauge(m, "c_total", "C.", "x=\"1\""));       /* even other labels */
    assert_null(cm_metrics_counter(m, "c_total", "Other help.", NULL)); /* other help */
    assert_null(cm_metrics_histogram(m, "c_total", "C.", NULL, b1, 2));
    assert_non_null(cm_metrics_histogram(m, "h_seconds", "H.", NULL, b1, 2));
    assert_null(cm_metrics_histogram(m, "h_seconds", "H.", "x=\"1\"", b2, 2)); /* other bounds */
    assert_null(cm_metrics_histogram(m, "h_seconds", "H.", "x=\"1\"", b1, 1));
    assert_null(cm_metrics_histogram(m, "u_seconds", "U.", NULL, unsorted, 2));
    assert_null(cm_metrics_histogram(m, "u_seconds", "U.", NULL, dup, 2));
    assert_null(cm_metrics_histogram(m, "u_seconds", "U.", NULL, inf, 2));
    /* The names a histogram emits are taken, in both orders of registration. */
    assert_null(cm_metrics_counter(m, "h_seconds_count", "C.", NULL));
    assert_null(cm_metrics_gauge(m, "h_seconds_sum", "S.", NULL));
    assert_null(cm_metrics_gauge(m, "h_seconds_bucket", "B.", NULL));
    assert_non_null(cm_metrics_gauge(m, "g_count", "G.", NULL));
    assert_null(cm_metrics_histogram(m, "g", "G.", NULL, b1, 2));
    /* Bad names and arguments. */
    assert_null(cm_metrics_counter(m, "", "E.", NULL));
    assert_null(cm_metrics_counter(m, "1abc", "E.", NULL));
    assert_null(cm_metrics_counter(m, "a-b", "E.", NULL));
    assert_null(cm_metrics_counter(m, "a b", "E.", NULL));
    assert_null(cm_metrics_counter(m, NULL, "E.", NULL));
    assert_null(cm_metrics_counter(m, "no_help_total", NULL, NULL));
    assert_null(cm_metrics_counter(NULL, "x_total", "X.", NULL));
    assert_non_null(cm_metrics_counter(m, "ns:sub_total", "Colons are allowed.", NULL));
    assert_non_null(cm_metrics_counter(m, "_under_total", "Underscore start.", NULL));
    cm_metrics_free(m);
    cm_metrics_free(NULL);
}

static void no_duplicate_series(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    static const char *const results[] = {"hit", "miss", "error", "bypass"};
    /* Registered repeatedly (as a daemon that re-wires a component would). */
    for (int round = 0; round < 3; round++) {
        for (size_t i = 0; i < 4; i++) {
            char labels[64];
            assert_true(cm_metrics_labels(labels, sizeof labels, "result", results[i], NULL) > 0);
            cm_metric_t *c = cm_metrics_counter(m, "price_cache_lookups_total",
                                                "Cache lookups by result.", labels);
            assert_non_null(c);
            cm_counter_inc(c);
        }
    }
    cm_buf_t out = CM_BUF_INIT;
    assert_int_equal(cm_metrics_render(m, &out), 0);
    assert_string_equal(out.data, "# HELP price_cache_lookups_total Cache lookups by result.\n"
                                  "# TYPE price_cache_lookups_total counter\n"
                                  "price_cache_lookups_total{result=\"hit\"} 3\n"
                                  "price_cache_lookups_total{result=\"miss\"} 3\n"
                                  "price_cache_lookups_total{result=\"error\"} 3\n"
                                  "price_cache_lookups_total{result=\"bypass\"} 3\n");
    /* Every sample line (name + labels) is unique. */
    size_t lines = 0;
    char *copy = cm_strdup(out.data);
    char *seen[16];
    for (char *save = NULL, *line = strtok_r(copy, "\n", &save); line;
         line = strtok_r(NULL, "\n", &save)) {
        if (line[0] == '#')
            continue;
        *strrchr(line, ' ') = '\0';
        for (size_t k = 0; k < lines; k++)
            assert_string_not_equal(seen[k], line);
        seen[lines++] = line;
    }
    assert_int_equal(lines, 4);
    cm_free(copy);
    cm_buf_free(&out);
    cm_metrics_free(m);
}

/* ------------------------------------------------------------------------------------------ */
/* Allocation failures                                                                         */
/* ------------------------------------------------------------------------------------------ */

static void out_of_memory(void **state)
{
    (void)state;
    static const double b[] = {0.1, 1};
    /* Each allocation of a registration fails in turn without leaking or half-registering. */
    for (long k = 1; k < 30; k++) {
        cm_metrics_t *m = cm_metrics_new();
        assert_non_null(cm_metrics_counter(m, "a_total", "A.", "x=\"1\""));
        cm_alloc_fail_after(k);
        cm_metric_t *h = cm_metrics_histogram(m, "h_seconds", "H.", "b=\"2\",a=\"1\"", b, 2);
        cm_metric_t *c = cm_metrics_counter(m, "a_total", "A.", "x=\"2\"");
        cm_alloc_fail_after(0);
        cm_buf_t out = CM_BUF_INIT;
        assert_int_equal(cm_metrics_render(m, &out), 0);
        if (!h)
            assert_null(strstr(out.data, "h_seconds"));
        if (!c)
            assert_null(strstr(out.data, "x=\"2\""));
        cm_buf_free(&out);
        /* Rendering into a buffer that cannot grow reports ENOMEM. */
        cm_alloc_fail_after(1);
        assert_int_equal(cm_metrics_render(m, &out), UV_ENOMEM);
        cm_alloc_fail_after(0);
        cm_buf_free(&out);
        cm_metrics_free(m);
        if (h && c)
            break;
    }
    cm_alloc_fail_after(1);
    assert_null(cm_metrics_new());
}

/* ------------------------------------------------------------------------------------------ */
/* promtool                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static double one(void *ud)
{
    (void)ud;
    return 1;
}

/*
 * Builds a registry shaped like the daemons' (the metric names of docs/openapi.yaml), writes its
 * exposition to $METRICS_SAMPLE_OUT (default unit_metrics_sample.prom in the working directory,
 * i.e. the build's tests/ folder) and, when promtool is installed (Debian package `prometheus`),
 * checks it with `promtool check metrics`: exit 0 means no format error and no lint problem. The
 * e2e suite does the same with the real /metrics of the running daemons.
 */
static void promtool_accepts_sample(void **state)
{
    (void)state;
    cm_metrics_t *m = cm_metrics_new();
    static const char *const results[] = {"hit", "miss", "error", "bypass"};
    char labels[128];
    for (size_t i = 0; i < 4; i++) {
        cm_metrics_labels(labels, sizeof labels, "result", results[i], NULL);
        cm_counter_add(
            cm_metrics_counter(m, "price_cache_lookups_total", "Cache lookups by result.", labels),
            (double)(i + 1));
    }
    cm_metrics_gauge_fn(m, "price_cache_hit_ratio", "Hits over hits and misses.", NULL, one, NULL);
    cm_gauge_set(cm_metrics_gauge(m, "redis_up", "1 when Redis answers a PING.", NULL), 1);
    cm_metrics_counter(m, "redis_reconnects_total", "Redis reconnections.", NULL);
    cm_metrics_counter(m, "redis_command_timeouts_total", "Redis commands timed out.", NULL);
    cm_metrics_labels(labels, sizeof labels, "result", "ok", NULL);
    cm_counter_inc(cm_metrics_counter(m, "origin_requests_total", "Origin queries.", labels));
    cm_metric_t *h =
        cm_metrics_histogram(m, "origin_request_duration_seconds", "Origin query latency.", NULL,
                             cm_metrics_latency_bounds, cm_metrics_latency_nbounds);
    cm_histogram_observe(h, 0.0012);
    cm_histogram_observe(h, 0.25);
    cm_metrics_labels(labels, sizeof labels, "route", "/api/markets/price", "code", "200", NULL);
    cm_counter_inc(cm_metrics_counter(m, "http_requests_total", "HTTP requests.", labels));
    cm_metrics_labels(labels, sizeof labels, "route", "odd \"quoted\"\\path\n", "code", "404",
                      NULL);
    cm_counter_inc(cm_metrics_counter(m, "http_requests_total", "HTTP requests.", labels));
    cm_metrics_labels(labels, sizeof labels, "route", "/api/markets/price", NULL);
    cm_histogram_observe(cm_metrics_histogram(m, "http_request_duration_seconds",
                                              "HTTP request latency.\nEscaped \\ help.", labels,
                                              cm_metrics_latency_bounds,
                                              cm_metrics_latency_nbounds),
                         0.00004);
    cm_gauge_set(cm_metrics_gauge(m, "ws_connections", "Open WebSocket connections.", NULL), NAN);
    cm_gauge_set(cm_metrics_gauge(m, "notifier_leader", "1 when holding the lock.", NULL),
                 INFINITY);

    cm_buf_t out = CM_BUF_INIT;
    assert_int_equal(cm_metrics_render(m, &out), 0);
    const char *path = getenv("METRICS_SAMPLE_OUT");
    if (!path || !*path)
        path = "unit_metrics_sample.prom";
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(out.data, 1, out.len, f), out.len);
    assert_int_equal(fclose(f), 0);
    cm_buf_free(&out);
    cm_metrics_free(m);

    if (system("command -v promtool >/dev/null 2>&1") != 0) {
        print_message("promtool not installed (apt-get install prometheus): %s not checked\n",
                      path);
        return;
    }
    char cmd[512];
    snprintf(cmd, sizeof cmd, "promtool check metrics < '%s'", path);
    int status = system(cmd);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(counters_and_gauges, setup, teardown),
        cmocka_unit_test_setup_teardown(histograms, setup, teardown),
        cmocka_unit_test_setup_teardown(histogram_bucket_edges, setup, teardown),
        cmocka_unit_test_setup_teardown(doubles_the_prometheus_way, setup, teardown),
        cmocka_unit_test_setup_teardown(gauge_fn, setup, teardown),
        cmocka_unit_test_setup_teardown(label_building_and_escaping, setup, teardown),
        cmocka_unit_test_setup_teardown(malformed_labels_rejected, setup, teardown),
        cmocka_unit_test_setup_teardown(same_series_returned, setup, teardown),
        cmocka_unit_test_setup_teardown(clashes_return_null, setup, teardown),
        cmocka_unit_test_setup_teardown(no_duplicate_series, setup, teardown),
        cmocka_unit_test_setup_teardown(out_of_memory, setup, teardown),
        cmocka_unit_test_setup_teardown(promtool_accepts_sample, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
