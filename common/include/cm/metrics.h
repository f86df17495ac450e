/*
 * cm/metrics.h: a Prometheus registry rendered in the text exposition format 0.0.4
 * (https://prometheus.io/docs/instrumenting/exposition_formats/).
 *
 * Single-threaded (one loop per daemon). Series are registered once at startup; the hot path
 * is a plain add on a double through the handle obtained then (no lookup per request).
 * Rendering groups the series of one family under one `# HELP` and one `# TYPE` line, in
 * registration order, and never emits a series twice: asking again for the same name and
 * labels returns the same handle (labels are compared after sorting them by name, so
 * `a="1",b="2"` and `b="2",a="1"` are one series).
 *
 *     cm_metric_t *hits = cm_metrics_counter(m, "price_cache_lookups_total",
 *                                            "Cache lookups by result.", "result=\"hit\"");
 *     ...
 *     cm_counter_inc(hits);
 */
#ifndef CM_METRICS_H
#define CM_METRICS_H

#include <stddef.h>

#include "cm/buf.h"

typedef struct cm_metrics cm_metrics_t;
typedef struct cm_metric cm_metric_t;

/* Content-Type of the rendered text (for the /metrics response). */
#define CM_METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

/* A new, empty registry (caller frees with cm_metrics_free), or NULL on ENOMEM. */
cm_metrics_t *cm_metrics_new(void);
/* Frees the registry and every series handle it gave out; NULL is a no-op. */
void cm_metrics_free(cm_metrics_t *m);

/*
 * Registration. `name` must match [a-zA-Z_:][a-zA-Z0-9_:]*; `help` is required (any text,
 * escaped on output). `labels` is NULL/"" or preformatted label pairs without braces, e.g.
 * "result=\"hit\"" or built with cm_metrics_labels(): names [a-zA-Z_][a-zA-Z0-9_]* not starting
 * with "__", values with `\\`, `\"` and `\n` escaped, each name once. The registry copies
 * name, help and labels.
 *
 * Returns a series handle owned by the registry (valid until cm_metrics_free), or NULL on: bad
 * name, malformed labels, an existing family of that name with another type, another help
 * text or (histograms) other bounds, or ENOMEM. Same name + same labels + same kind returns
 * the existing handle.
 */
cm_metric_t *cm_metrics_counter(cm_metrics_t *m, const char *name, const char *help,
                                const char *labels);
cm_metric_t *cm_metrics_gauge(cm_metrics_t *m, const char *name, const char *help,
                              const char *labels);
/* Gauge computed at scrape time (price_cache_hit_ratio, ws_connections): fn(ud) is called by
 * cm_metrics_render and cm_metric_value; `ud` is borrowed and must outlive the registry (or
 * the last render). It shares a family with plain gauges of the same name. Registering the
 * same name + labels again returns the existing handle only if fn and ud are the same. */
cm_metric_t *cm_metrics_gauge_fn(cm_metrics_t *m, const char *name, const char *help,
                                 const char *labels, double (*fn)(void *ud), void *ud);
/* Histogram with `nbounds` finite upper bounds (seconds for durations), strictly ascending;
 * +Inf is added. Renders `<name>_bucket{...,le="..."}` (cumulative), `<name>_sum`,
 * `<name>_count`. The bounds are copied; all series of a family must use the same bounds.
 * `labels` must not use the name "le". nbounds may be 0 (only the +Inf bucket). */
cm_metric_t *cm_metrics_histogram(cm_metrics_t *m, const char *name, const char *help,
                                  const char *labels, const double *bounds, size_t nbounds);

/* Default latency bounds in seconds, 50 us .. 10 s, roughly 1-2.5-5 per decade, for daemons
 * whose requests take tens of microseconds on a hit and milliseconds on a miss. */
extern const double cm_metrics_latency_bounds[];
extern const size_t cm_metrics_latency_nbounds;

/* Hot-path updates: a plain add, no allocation, no lookup. NULL handles are not accepted. */
void cm_counter_inc(cm_metric_t *c);
/* Adds v (>= 0; a negative or NaN v is ignored, counters only go up). */
void cm_counter_add(cm_metric_t *c, double v);
void cm_gauge_set(cm_metric_t *g, double v);
void cm_gauge_add(cm_metric_t *g, double v); /* v may be negative */
/* Counts v into the first bucket whose upper bound is >= v (a value equal to a bound goes in
 * that bucket, as `le` means "less or equal"); binary search over the bounds. NaN counts
 * toward _count and _sum but only the +Inf bucket. */
void cm_histogram_observe(cm_metric_t *h, double v);
/* Current value of a counter or gauge (gauge_fn: calls fn now); for a histogram, the number of
 * observations (_count). For tests and ratios. */
double cm_metric_value(const cm_metric_t *c);

/* Builds `k1="v1",k2="v2"` into out (outsz bytes including the NUL), escaping `\`, `"` and
 * newline in values as the format requires; the pairs end with a NULL key. Returns the length
 * written (without the NUL) or UV_E2BIG when it does not fit (out is then ""). Names are not
 * validated here; the registry validates them on registration. */
int cm_metrics_labels(char *out, size_t outsz, const char *k1, const char *v1, ...)
    __attribute__((sentinel));

/* Appends the whole exposition text to `out` (borrowed). Doubles are rendered the Prometheus
 * way: `+Inf`, `-Inf`, `NaN`, integers up to 2^53 without exponent, others in the shortest
 * form that reads back exactly. Returns 0 or UV_ENOMEM (out may then hold part of the text). */
int cm_metrics_render(const cm_metrics_t *m, cm_buf_t *out);

#endif
